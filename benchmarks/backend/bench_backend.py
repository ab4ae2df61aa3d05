"""What the ``attnres`` compile backend costs, and what each of its passes is worth.

Llama-like model (Hugging Face ``LlamaForCausalLM``, random weights); for each variant, a training
step (forward + backward) and an inference forward (``torch.no_grad``), all variants timed
interleaved in ONE run and reported as ratios to ``original + inductor``:

    original+inductor      the baseline
    converted+inductor     Block AttnRes, the aggregation op opaque to inductor
    converted+attnres      all passes
    attnres-batch          two-phase batching off
    attnres-fuse_norm      RMSNorm fusion off (and with it fuse_add)
    attnres-fuse_add       the partial block's add left out of the merge
    attnres-fuse_head      each block's first merge left out of its phase-1 call
    attnres-accumulate_in_gemm  (no_grad forward) the partial block's add not done by the output GEMM
    attnres-lower          CPU: library ops kept (their eager reference); CUDA: lower="decompose"
                           (inductor-generated code instead of the hand-written Triton kernels)
    attnres+ept16          the Triton kernels with 16 elements per thread (the launch
                           configuration before session 2; CPU: same as converted+attnres)
(names without spaces, for ``--only``)

Prints a table, and under it the FLOOR: the ratio converted+attnres would have if its only cost were
its extra memory traffic (``traffic_model.py``) at the copy bandwidth measured in the same run; the
gap between the measured ratio and the floor is what faster kernels can still win.
Writes ``benchmarks/results/backend-<device>-<date>-L<layers>-D<hidden>.json``.

    python benchmarks/backend/bench_backend.py                  # small CPU size (a few minutes on 2 cores)
    python benchmarks/backend/bench_backend.py --gpu-size       # H100 preset: hidden 2048, 8 blocks, bf16
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import residual_rewriter as rr
from residual_rewriter.backend import make_attnres_backend
from residual_rewriter.kernels.attn_res._launch import elements_per_thread as launch_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_timing import copy_bandwidth_gbs, sync  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"

CPU_SIZE = dict(layers=4, hidden=256, seq=128, batch=4, num_blocks=4, dtype="float32", device="cpu")
GPU_SIZE = dict(layers=16, hidden=2048, seq=2048, batch=4, num_blocks=8, dtype="bfloat16", device="cuda")


def llama_like(layers: int, hidden: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
    )
    return transformers.LlamaForCausalLM(cfg)


def variants(device: str) -> dict:
    """name -> (which model, backend)."""
    alt_lower = "decompose" if device == "cuda" else None
    return {
        "original+inductor": ("original", "inductor"),
        "converted+inductor": ("converted", "inductor"),
        "converted+attnres": ("converted", make_attnres_backend()),
        "attnres-batch": ("converted", make_attnres_backend(batch_two_phase=False)),
        "attnres-fuse_norm": ("converted", make_attnres_backend(fuse_norm=False)),
        "attnres-fuse_add": ("converted", make_attnres_backend(fuse_add=False)),
        "attnres-fuse_head": ("converted", make_attnres_backend(fuse_head=False)),
        "attnres-fuse_block_end": ("converted", make_attnres_backend(fuse_block_end=False)),
        "attnres-fold_grad_sums": ("converted", make_attnres_backend(fold_grad_sums=False)),
        "attnres-accumulate_in_gemm": ("converted", make_attnres_backend(accumulate_in_gemm=False)),
        "attnres-lower": ("converted", make_attnres_backend(lower=alt_lower)),
        # the kernels' previous launch configuration (kernels/attn_res/_launch.py), for comparison
        "attnres+ept16": ("converted", make_attnres_backend(), 16),
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def traffic_floor(size: dict, copy_gbs: float) -> dict:
    """The least time converted+attnres can add at this size: the extra memory passes its graphs make
    (``traffic_model.py``) at the copy bandwidth measured in this run."""
    from traffic_model import extra_passes

    c = extra_passes(size["layers"], size["num_blocks"])
    pass_ms = size["batch"] * size["seq"] * size["hidden"] * getattr(torch, size["dtype"]).itemsize / (copy_gbs * 1e9) * 1e3
    return {"copy_gbs": copy_gbs, "extra_fwd_passes": c["extra_fwd"], "extra_train_passes": c["extra_train"],
            "fwd_ms": c["extra_fwd"] * pass_ms, "train_ms": c["extra_train"] * pass_ms}


def interleaved_ms(fns: dict, repeats: int, iters: int, device: str) -> dict:
    """Median ms per call of each fn; the variants take turns so drift hits them alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3 / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-size", action="store_true", help="the H100 preset: " + str(GPU_SIZE))
    for k, v in CPU_SIZE.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the results JSON")
    args = p.parse_args(argv)
    size = dict(GPU_SIZE if args.gpu_size else CPU_SIZE)
    size.update({k: getattr(args, k) for k in size if getattr(args, k) is not None})
    device, dtype = size["device"], getattr(torch, size["dtype"])

    # Every variant adds a train and a no_grad cache entry to the SAME forward code object; past the
    # default limit (8) Dynamo would silently run later variants eagerly.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    torch.manual_seed(0)
    original = llama_like(size["layers"], size["hidden"]).to(device=device, dtype=dtype).train()
    converted = rr.convert(original, num_blocks=size["num_blocks"])
    converted.train()
    with torch.no_grad():  # nonzero queries: a real mixture, not the uniform one of initialisation.
        # std 1/sqrt(D) gives scores ~ N(0, 1) (keys are RMS-normalised): a soft mixture. Much larger
        # queries make it a near-argmax, where bf16 rounding flips choices and eager-vs-compiled
        # differences say nothing (std 0.5 at D=2048 gave a 128% logits difference on an H100).
        for m in converted.attn_res.values():
            m.query.normal_(0, size["hidden"] ** -0.5)
    ids = torch.randint(0, 4096, (size["batch"], size["seq"]), device=device)
    models = {"original": original, "converted": converted}

    chosen = {k: v for k, v in variants(device).items() if not args.only or k in args.only}
    with torch.no_grad():  # eager outputs: every compiled variant is checked against its own model's
        eager_logits = {k: m(ids).logits.float() for k, m in models.items()}
    train_fns, fwd_fns, compile_s, pass_logs, max_rel_err = {}, {}, {}, {}, {}
    for name, (which, backend, *knob) in chosen.items():
        model = models[which]
        compiled = torch.compile(model, backend=backend)
        ept = knob[0] if knob else None

        def train_step(compiled=compiled, model=model, ept=ept):
            model.zero_grad(set_to_none=True)
            with launch_config(ept):
                compiled(ids).logits.float().mean().backward()

        def forward(compiled=compiled, ept=ept):
            with torch.no_grad(), launch_config(ept):
                compiled(ids)

        t0 = time.perf_counter()
        train_step()  # compiles the training graph
        forward()  # and the inference graph
        sync(device)
        compile_s[name] = time.perf_counter() - t0
        with torch.no_grad():
            got, want = compiled(ids).logits.float(), eager_logits[which]
        max_rel_err[name] = ((got - want).abs().max() / want.abs().max()).item()
        for _ in range(2):
            train_step(), forward()
        train_fns[name], fwd_fns[name] = train_step, forward
        if not isinstance(backend, str):
            pass_logs[name] = [log.passes for log in backend.logs]
        print(f"compiled {name} in {compile_s[name]:.1f} s; logits max rel err vs eager {max_rel_err[name]:.2e}", flush=True)

    train = interleaved_ms(train_fns, args.repeats, args.iters, device)
    fwd = interleaved_ms(fwd_fns, args.repeats, args.iters, device)
    base = "original+inductor"
    rows = []
    for name in chosen:
        row = {"variant": name, "train_ms": train[name], "forward_ms": fwd[name], "compile_s": compile_s[name],
               "logits_max_rel_err_vs_eager": max_rel_err[name]}
        if base in train:
            row["train_ratio"], row["forward_ratio"] = train[name] / train[base], fwd[name] / fwd[base]
        rows.append(row)

    print(f"\nLlama-like {size}: {len(converted.attn_res_report.plan.sites)} sublayers")
    print(f"{'variant':24} {'train ms':>10} {'ratio':>7} {'fwd ms':>10} {'ratio':>7} {'compile s':>10}")
    for r in rows:
        print(f"{r['variant']:24} {r['train_ms']:10.2f} {r.get('train_ratio', float('nan')):7.3f} "
              f"{r['forward_ms']:10.2f} {r.get('forward_ratio', float('nan')):7.3f} {r['compile_s']:10.1f}")
    # the floor under converted+attnres: what its extra memory traffic costs at copy bandwidth
    floor = traffic_floor(size, copy_bandwidth_gbs(device, (1 << 30) if device == "cuda" else (64 << 20)))
    if base in train:
        floor["fwd_ratio"] = 1 + floor["fwd_ms"] / fwd[base]
        floor["train_ratio"] = 1 + floor["train_ms"] / train[base]
        print(f"{'floor (traffic model)':24} {'':>10} {floor['train_ratio']:7.3f} {'':>10} {floor['fwd_ratio']:7.3f}"
              f"   (+{floor['extra_train_passes']} / +{floor['extra_fwd_passes']} passes at {floor['copy_gbs']:.0f} GB/s)")

    dev_name = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    out = {
        "benchmark": "backend",
        "date": datetime.date.today().isoformat(),
        "device": dev_name,
        "versions": versions(),
        "size": size,
        "repeats": args.repeats,
        "iters": args.iters,
        "results": rows,
        "pass_logs": pass_logs,
        "traffic_floor": floor,
        "note": "ratios are to original+inductor measured in the same run (interleaved medians)",
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"backend-{dev_name}-{out['date']}-L{size['layers']}-D{size['hidden']}.json"  # sizes: no overwrite
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
