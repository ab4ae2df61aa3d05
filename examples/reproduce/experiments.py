"""The three experiments: from scratch (``compare``), fine-tuning a trained baseline (``finetune``),
and the depth / learning-rate search (``sweep``). Each returns plain dicts (written to JSON)."""
from __future__ import annotations

import statistics
from dataclasses import replace

from . import train as T
from .data import Corpus, TrainBatches, val_batches


class Progress:
    """One tqdm bar over every training step of the whole command."""

    def __init__(self, total: int, quiet: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=quiet, smoothing=0.05)

    def run(self, desc: str):
        self.bar.set_description(desc)
        return lambda loss: (self.bar.update(1), self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False))

    def write(self, text: str):
        self.bar.write(text)

    def close(self):
        self.bar.close()


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


class Val:
    def __init__(self, corpus: Corpus, mcfg: T.ModelCfg, batch: int, curve_batches: int, final_batches: int):
        self.final = val_batches(corpus.val, final_batches, batch, mcfg.seq)
        self.curve = self.final[:curve_batches]


# ---- from scratch ---------------------------------------------------------------------------------

def compare(corpus, mcfg, ocfg, *, seeds, steps, variants, val: Val, eval_every, progress) -> dict:
    runs = []
    for seed in seeds:
        checksums = {}
        for variant in variants:
            model = T.build(variant, mcfg, seed)
            checksums[variant] = T.init_checksum(model)
            opt = T.make_optimizer(model, ocfg)
            log = T.RunLog(variant, seed)
            T.train(model, opt, TrainBatches(corpus.train, ocfg.batch, mcfg.seq, seed), start=0, stop=steps,
                    total=steps, ocfg=ocfg, val_curve=val.curve, eval_every=eval_every, log=log,
                    tick=progress.run(f"{T.LABELS[variant]} seed {seed}"))
            d = log.to_dict()
            d["final_val"] = round(T.evaluate(model, val.final), 5)
            d["init_checksum"] = checksums[variant]
            runs.append(d)
            progress.write(f"  {T.LABELS[variant]:<18} seed {seed}: final val loss {d['final_val']:.4f}, "
                           f"{d['tokens_per_s']:.0f} tokens/s")
        same = max(checksums.values()) - min(checksums.values())
        assert abs(same) <= 1e-9 * max(1.0, abs(checksums[variants[0]])), f"initial weights differ: {checksums}"
    return {"steps": steps, "seeds": list(seeds), "variants": list(variants), "runs": runs,
            "summary": summarize(runs, variants, key="final_val")}


def summarize(runs, variants, key: str, baseline: str = "standard") -> dict:
    by = {v: {r["seed"]: r for r in runs if r["variant"] == v} for v in variants}
    out = {}
    for v in variants:
        rs = list(by[v].values())
        s = {"final_val": mean_std(r[key] for r in rs), "tokens_per_s": mean_std(r["tokens_per_s"] for r in rs)}
        if v != baseline and baseline in by:
            diffs = [by[v][seed][key] - by[baseline][seed][key] for seed in by[v] if seed in by[baseline]]
            s["paired_diff"] = mean_std(diffs)
            s["paired_diffs"] = [round(d, 5) for d in diffs]
            s["seeds_better"] = sum(d < 0 for d in diffs)
            spread = max(s["final_val"]["std"], out[baseline]["final_val"]["std"])
            gap = out[baseline]["final_val"]["mean"] - s["final_val"]["mean"]
            s["wins_beyond_seed_spread"] = bool(gap > spread)
        out[v] = s
    return out


# ---- fine-tuning ----------------------------------------------------------------------------------

def finetune(corpus, mcfg, ocfg, *, seeds, pre_steps, cont_steps, variants, val: Val, eval_every, progress) -> dict:
    """Train the standard model for pre_steps, then continue it cont_steps more as it is ("standard")
    and, from the same weights, optimizer state and batches, converted in place to each AttnRes variant.
    One learning-rate schedule spans pre_steps + cont_steps for all of them."""
    assert variants[0] == "standard", "the fine-tuning comparison needs the baseline continuation first"
    total = pre_steps + cont_steps
    pre_runs, runs, exact = [], [], []
    for seed in seeds:
        model = T.build("standard", mcfg, seed)
        opt = T.make_optimizer(model, ocfg)
        batches = TrainBatches(corpus.train, ocfg.batch, mcfg.seq, seed)
        log = T.RunLog("pretrain", seed)
        T.train(model, opt, batches, start=0, stop=pre_steps, total=total, ocfg=ocfg, val_curve=val.curve,
                eval_every=eval_every, log=log, tick=progress.run(f"pretrain seed {seed}"))
        pre_runs.append(log.to_dict())
        state, opt_state, data_state = T.snapshot(model, opt, batches)
        val_at_convert = {}
        for variant in variants:
            m = T.build("standard", mcfg, seed)
            m.load_state_dict(state)
            o = T.make_optimizer(m, ocfg)
            o.load_state_dict(opt_state)  # AdamW moments of the shared parameters carry over
            T.convert(m, variant, mcfg)  # in place: the optimizer's parameters are the model's own
            owned = {id(p) for g in o.param_groups for p in g["params"]}
            new = [p for n, p in m.named_parameters() if T.is_attn_res(n)]
            assert all(id(p) in owned for n, p in m.named_parameters() if not T.is_attn_res(n))
            if new:
                o.add_param_group(T.attn_res_group(new, ocfg))
            val_at_convert[variant] = T.evaluate(m, val.curve)
            b = TrainBatches(corpus.train, ocfg.batch, mcfg.seq, seed)
            b.set_state(data_state)  # the same batches after the conversion point
            clog = T.RunLog(variant, seed)
            clog.val.append([pre_steps, val_at_convert[variant]])
            T.train(m, o, b, start=pre_steps, stop=total, total=total, ocfg=ocfg, val_curve=val.curve,
                    eval_every=eval_every, log=clog, tick=progress.run(f"continue {T.LABELS[variant]} seed {seed}"))
            d = clog.to_dict()
            d["final_val"] = round(T.evaluate(m, val.final), 5)
            runs.append(d)
            progress.write(f"  continue {T.LABELS[variant]:<18} seed {seed}: first step loss {d['train_loss'][0]:.5f}, "
                           f"final val loss {d['final_val']:.4f}")
        by = {r["variant"]: r for r in runs if r["seed"] == seed}
        base_first = by["standard"]["train_loss"][0]
        for v in variants:
            if v == "standard":
                continue
            exact.append({"seed": seed, "variant": v,
                          "first_step_loss": by[v]["train_loss"][0], "baseline_first_step_loss": base_first,
                          "abs_diff": abs(by[v]["train_loss"][0] - base_first),
                          "val_at_conversion": val_at_convert[v], "baseline_val_at_conversion": val_at_convert["standard"],
                          "val_abs_diff": abs(val_at_convert[v] - val_at_convert["standard"])})
    return {"pre_steps": pre_steps, "cont_steps": cont_steps, "seeds": list(seeds), "variants": list(variants),
            "pretrain_runs": pre_runs, "runs": runs, "exactness": exact,
            "summary": summarize(runs, variants, key="final_val")}


# ---- where does it win? ---------------------------------------------------------------------------

def sweep(corpus, mcfg, ocfg, *, shapes, screen_shape, lrs, query_mults, screen_steps, steps, seeds, variants,
          val_of, eval_every, progress) -> dict:
    """Stage 1 (one seed, screen_steps, at screen_shape): each variant's best (lr, query lr) among
    lrs x query_mults. Stage 2: every shape (layers, width) at its variants' chosen settings, all seeds,
    ``steps`` steps. A shape whose sublayers are no more than the blocks has Block == Full: Full is skipped."""
    screen = []
    smcfg = replace(mcfg, layers=screen_shape[0], width=screen_shape[1])
    sval = val_of(smcfg)
    for variant in variants:
        for lr in lrs:
            for qm in (query_mults if variant != "standard" else [1.0]):
                o = replace(ocfg, lr=lr, query_lr=lr * qm)
                r = compare(corpus, smcfg, o, seeds=[seeds[0]], steps=screen_steps, variants=[variant], val=sval,
                            eval_every=eval_every, progress=progress)["runs"][0]
                screen.append({"variant": variant, "lr": lr, "query_lr": lr * qm, "final_val": r["final_val"],
                               "tokens_per_s": r["tokens_per_s"]})
    chosen = {v: min((s for s in screen if s["variant"] == v), key=lambda s: s["final_val"]) for v in variants}
    progress.write("chosen settings: " + ", ".join(f"{v}: lr {c['lr']:g}, query lr {c['query_lr']:g}"
                                                   for v, c in chosen.items()))
    results = []
    for layers, width in shapes:
        m = replace(mcfg, layers=layers, width=width)
        vs = [v for v in variants if not (v == "full" and m.sublayers <= m.blocks)]
        runs = []
        for v in vs:
            o = replace(ocfg, lr=chosen[v]["lr"], query_lr=chosen[v]["query_lr"])
            runs += compare(corpus, m, o, seeds=seeds, steps=steps, variants=[v], val=val_of(m),
                            eval_every=eval_every, progress=progress)["runs"]
        params = sum(p.numel() for p in T.build("standard", m, 0).parameters())
        results.append({"layers": layers, "width": width, "sublayers": m.sublayers, "params": params,
                        "variants": vs, "runs": runs, "summary": summarize(runs, vs, key="final_val")})
    return {"screen_shape": list(screen_shape), "screen_steps": screen_steps, "screen": screen,
            "chosen": chosen, "steps": steps, "seeds": list(seeds), "shapes": results}
