"""Does AttnRes help? A small, honest reproduction on 2 CPU cores.

A character-level GPT (the built-in ``residual_rewriter.models.GPT``; bytes as tokens) is trained on the
Python standard library's own source text three ways from the same initial weights and the same
batches: with its standard residuals, converted in place to Block AttnRes (8 blocks) and to Full
AttnRes. Then a standard model is trained, converted, and trained on, against continuing it as it is.

    python -m examples.reproduce            # ~20 min on 2 CPU cores: from scratch + fine-tuning
    python -m examples.reproduce --quick    # ~2 min, smaller: to see that it works
    python -m examples.reproduce --sweep    # the depth / learning-rate search ("where does it win?")
    python examples/reproduce/run.py ...    # the same

Writes results.json (every run's curves, settings, versions), results.md (the tables) and
loss_curves.png to --out (default examples/reproduce/results/, .../quick/ or .../sweep/). The stdlib
text is read once and cached (--cache, default ~/.cache/residual_rewriter). Training uses ONE thread
by default (--threads), so that a second core stays free; tokens/s are for that.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.reproduce` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.reproduce"

HERE = Path(__file__).resolve().parent

PRESETS = {  # every option not given on the command line comes from here
    # default: the shape and learning rates where the --sweep found Block AttnRes winning (RESULTS.md)
    "default": dict(layers=8, width=64, heads=4, seq=64, batch=16, steps=400, seeds=3, lr=3e-3, query_lr=3e-2,
                    finetune_steps=(300, 200), eval_every=50, curve_batches=8, val_batches=32, warmup=50,
                    out=HERE / "results"),
    "quick": dict(layers=6, width=32, heads=4, seq=64, batch=8, steps=150, seeds=3, lr=3e-3, query_lr=3e-2,
                  finetune_steps=(100, 60), eval_every=25, curve_batches=4, val_batches=16, warmup=20,
                  out=HERE / "results" / "quick"),
    "sweep": dict(layers=8, width=64, heads=4, seq=64, batch=16, steps=400, seeds=3, lr=3e-3, query_lr=None,
                  finetune_steps=None, eval_every=100, curve_batches=4, val_batches=32, warmup=50,
                  out=HERE / "results" / "sweep",
                  sweep_shapes="4x96,8x64,16x48", sweep_screen_shape="8x64", sweep_lrs="1e-3,3e-3",
                  sweep_query_mults="1,10", sweep_screen_steps=250),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a small model and few steps (~2 min)")
    mode.add_argument("--sweep", action="store_true", help="search depth and learning rates instead (see --sweep-*)")
    p.add_argument("--out", type=Path, help="output folder (default: examples/reproduce/results[/quick|/sweep])")
    p.add_argument("--cache", type=Path, help="cache folder for the stdlib text (default ~/.cache/residual_rewriter)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, help="transformer layers (2 residual sublayers each)")
    g.add_argument("--width", type=int, help="hidden size")
    g.add_argument("--heads", type=int)
    g.add_argument("--seq", type=int, help="context length in bytes")
    g.add_argument("--blocks", type=int, default=8, help="num_blocks of the Block AttnRes variant (default 8)")
    g.add_argument("--variants", default="standard,block,full", help="comma-separated, from standard,block,full")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="training steps per run (from scratch)")
    g.add_argument("--seeds", type=int, help="seeds per variant (0, 1, ...)")
    g.add_argument("--batch", type=int, help="sequences per step")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW, warmup then cosine to 10%%)")
    g.add_argument("--query-lr", type=float, help="peak learning rate of the AttnRes queries and key-norm gains "
                                                  "(default 0.03, with --sweep: screened)")
    g.add_argument("--warmup", type=int, help="warmup steps")
    g.add_argument("--finetune-steps", type=int, nargs=2, metavar=("PRE", "CONT"),
                   help="fine-tuning: standard steps before converting, steps after")
    g.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning comparison")
    g.add_argument("--no-scratch", action="store_true", help="skip the from-scratch comparison (fine-tuning only)")
    g.add_argument("--eval-every", type=int, help="steps between validation points of the curves")
    g.add_argument("--curve-batches", type=int, help="validation batches per curve point")
    g.add_argument("--val-batches", type=int, help="validation batches for the final loss")
    g = p.add_argument_group("sweep (with --sweep)")
    g.add_argument("--sweep-shapes", help="LAYERSxWIDTH,... compared at their chosen learning rates")
    g.add_argument("--sweep-screen-shape", help="LAYERSxWIDTH where the learning rates are screened")
    g.add_argument("--sweep-lrs", help="learning rates screened (comma-separated)")
    g.add_argument("--sweep-query-mults", help="query lr = lr x each of these, screened for AttnRes variants")
    g.add_argument("--sweep-screen-steps", type=int, help="steps of each screening run (one seed)")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "sweep" if args.sweep else "default"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.no_finetune:
        args.finetune_steps = None
    if args.no_scratch and not args.finetune_steps:
        p.error("--no-scratch with --no-finetune leaves nothing to run")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from .train import VARIANTS

    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or "standard" not in args.variants:
        p.error(f"--variants must include standard and name only {', '.join(VARIANTS)} (got {args.variants})")
    args.variants = [v for v in VARIANTS if v in args.variants]
    return args


def command_line(argv) -> str:
    if __name__ == "__main__" and Path(sys.argv[0]).name == "run.py":
        head = "python examples/reproduce/run.py"
    else:
        head = "python -m examples.reproduce"
    return " ".join([head, *argv])


def environment(args) -> dict:
    import torch

    import residual_rewriter

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "residual_rewriter": getattr(residual_rewriter, "__version__", "?"),
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def shape(text: str) -> tuple[int, int]:
    layers, width = text.lower().split("x")
    return int(layers), int(width)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from . import data, experiments as E, report, train as T

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = data.load(args.cache, log=lambda s: print(s, flush=True))
    m = corpus.meta
    print(f"data: {m['files']['train']} train files ({m['bytes']['train']:,} bytes), {m['files']['val']} validation "
          f"files ({m['bytes']['val']:,} bytes) from {m['stdlib']}", flush=True)
    mcfg = T.ModelCfg(layers=args.layers, width=args.width, heads=args.heads, seq=args.seq, blocks=args.blocks)
    ocfg = T.OptCfg(lr=args.lr, query_lr=args.query_lr, warmup=args.warmup, batch=args.batch)

    def val_of(mc):
        return E.Val(corpus, mc, args.batch, args.curve_batches, args.val_batches)

    result = {"command": command_line(argv), "environment": environment(args), "data": m,
              "settings": {"model": asdict(mcfg), "optimizer": asdict(ocfg), "seeds": args.seeds, "steps": args.steps,
                           "finetune_steps": args.finetune_steps, "variants": args.variants,
                           "eval_every": args.eval_every, "curve_batches": args.curve_batches,
                           "val_batches": args.val_batches}}
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    md = [f"Command: `{result['command']}`  ", f"{result['environment']['date']}, torch {result['environment']['torch']},"
          f" {args.threads} thread(s), {result['environment']['cpu']} ({result['environment']['cpu_count']} cores)", ""]
    if args.sweep:
        shapes = [shape(s) for s in args.sweep_shapes.split(",")]
        screen_shape = shape(args.sweep_screen_shape)
        lrs = [float(x) for x in args.sweep_lrs.split(",")]
        qms = [float(x) for x in args.sweep_query_mults.split(",")]
        n_screen = sum(len(lrs) * (1 if v == "standard" else len(qms)) for v in args.variants) * args.sweep_screen_steps
        n_main = sum(len(seeds) * args.steps * sum(1 for v in args.variants
                                                   if not (v == "full" and 2 * l <= args.blocks)) for l, _ in shapes)
        progress = E.Progress(n_screen + n_main, args.quiet)
        res = E.sweep(corpus, mcfg, ocfg, shapes=shapes, screen_shape=screen_shape, lrs=lrs, query_mults=qms,
                      screen_steps=args.sweep_screen_steps, steps=args.steps, seeds=seeds, variants=args.variants,
                      val_of=val_of, eval_every=args.eval_every, progress=progress)
        progress.close()
        result["sweep"] = res
        md += report.sweep_md(res)
        report.plot_sweep(out / "sweep.png", res)
        md += ["![where does it win](sweep.png)", ""]
    else:
        n = 0 if args.no_scratch else len(seeds) * len(args.variants) * args.steps
        if args.finetune_steps:
            pre, cont = args.finetune_steps
            n += len(seeds) * (pre + len(args.variants) * cont)
        progress = E.Progress(n, args.quiet)
        val = val_of(mcfg)
        if not args.no_scratch:
            result["compare"] = E.compare(corpus, mcfg, ocfg, seeds=seeds, steps=args.steps, variants=args.variants,
                                          val=val, eval_every=args.eval_every, progress=progress)
            md += report.compare_md(result["compare"], asdict(mcfg), asdict(ocfg))
        if args.finetune_steps:
            pre, cont = args.finetune_steps
            result["finetune"] = E.finetune(corpus, mcfg, ocfg, seeds=seeds, pre_steps=pre, cont_steps=cont,
                                            variants=args.variants, val=val, eval_every=args.eval_every,
                                            progress=progress)
            md += report.finetune_md(result["finetune"])
        progress.close()
        title = (f"GPT {args.layers} layers × {args.width}, stdlib text, lr {args.lr:g}, "
                 f"query lr {ocfg.qlr():g}, {len(seeds)} seeds")
        if result.get("compare") or result.get("finetune"):
            report.plot(out / "loss_curves.png", result.get("compare"), result.get("finetune"), title)
        md += ["![loss curves](loss_curves.png)", ""]
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    md.append(f"Wall time: {result['wall_seconds'] / 60:.1f} min.")
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and the picture(s) in {out}")
    return result


if __name__ == "__main__":
    main()
