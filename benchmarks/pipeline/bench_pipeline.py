"""Cross-stage caching under pipeline parallelism: step time and bytes moved per step, naive vs cached,
as the number of ranks P and of chunks per rank V grow (CPU processes over gloo).

A converted GPT with one AttnRes block per layer (``block_size=2``: attention + MLP) is split into
C = P x V chunks of ``--layers-per-chunk`` layers each (so Np = layers-per-chunk block sums per chunk),
run by ``ScheduleInterleaved1F1B`` (``Schedule1F1B`` when V = 1) on P processes; with ``--styles v``, also two
chunks per rank in a V (``build_stages(style="v")``) run by ``ScheduleZBVZeroBubble``. Both schemes run
in the same process group, alternating steps. Bytes are what the stages hand to ``dist.isend``
(activations and gradients, all microbatches, one step); the paper's formula is printed next to the
measured forward bytes per microbatch (it leaves out the embedding output b_0, see the README).

    python benchmarks/pipeline/bench_pipeline.py [--ranks 2 4] [--virtual 1 2 4] [--styles loop v] [--hidden 256] [--seq 64] [--layers-per-chunk 2]

Writes benchmarks/results/pipeline-cpu-<date>.json and .md. The machine is shared and has 2 cores:
with P = 4 the processes share them, so step times are for orientation (compare naive with cached in
the same row, measured alternately in the same processes).
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parents[1] / "results"
WORKER_DEADLINE_S = 600


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _model(layers, hidden, seq):
    import residual_rewriter as rr
    from residual_rewriter.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 64), vocab_size=256, block_size=seq))
    rr.convert_(model.train(), block_size=2)
    return model


def _worker(rank, P, V, style, args, port, queue):
    faulthandler.dump_traceback_later(WORKER_DEADLINE_S, exit=True)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=P, timeout=datetime.timedelta(seconds=300))
    from torch.distributed import pipelining as tp

    import residual_rewriter as rr
    from residual_rewriter import pipelining as rp

    C = P * V
    layers = C * args.layers_per_chunk
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (args.microbatches * args.mb_size, args.seq), generator=g)
    y = torch.randint(0, 256, x.shape, generator=g)
    splits = [c * args.layers_per_chunk for c in range(1, C)]
    runs = {}
    for cache in (False, True):
        model = _model(layers, args.hidden, args.seq)
        stages = rr.build_stages(model, splits, rank=rank, num_ranks=P, example_kwargs={"idx": x},
                                 num_microbatches=args.microbatches, cache=cache, style=style)
        cls = tp.ScheduleZBVZeroBubble if style == "v" else tp.ScheduleInterleaved1F1B if V > 1 else tp.Schedule1F1B
        sched = cls(stages if V > 1 else stages[0], n_microbatches=args.microbatches, loss_fn=loss_fn)
        runs[cache] = (model, stages, sched)
    times = {False: [], True: []}
    sent = {}
    for step in range(args.warmup + args.steps):
        for cache in (False, True):
            model, stages, sched = runs[cache]
            model.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            sched.step(idx=x, target=y)
            dist.barrier()
            if step >= args.warmup:
                times[cache].append(time.perf_counter() - t0)
            sent[cache] = rp.transition_bytes(stages)
    gathered = [None] * P
    dist.all_gather_object(gathered, {c: dict(sent[c]) for c in sent})
    if rank == 0:
        merged = {c: {} for c in (False, True)}
        for part in gathered:
            for c in (False, True):
                merged[c].update(part[c])
        queue.put({"times": {c: statistics.median(t) for c, t in times.items()}, "sent": merged})
    dist.barrier()
    os._exit(0)  # no teardown (the gloo/GIL teardown deadlock, see tests/test_distributed.py)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(P, V, style, args):
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_worker, args=(P, V, style, args, _free_port(), queue), nprocs=P, start_method="spawn",
                             join=False)
    deadline = time.monotonic() + WORKER_DEADLINE_S + 30
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise RuntimeError(f"P={P} V={V}: still running after the deadline; killed")
    return queue.get()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--virtual", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--styles", nargs="+", choices=["loop", "v"], default=["loop", "v"],
                   help="v: two chunks per rank in a V (ScheduleZBVZeroBubble), whatever --virtual says")
    p.add_argument("--layers-per-chunk", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--mb-size", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)

    rows = []
    d = args.mb_size * args.seq * args.hidden * 4  # bytes of one block sum of one microbatch (float32)
    Np = args.layers_per_chunk
    runs = [(P, V, "loop") for P in args.ranks for V in args.virtual if "loop" in args.styles]
    runs += [(P, 2, "v") for P in args.ranks if "v" in args.styles]
    for P, V, style in runs:
        C = P * V
        out = run(P, V, style, args)
        row = {"P": P, "V": V, "style": style, "C": C, "layers": C * Np}
        for cache, name in ((False, "naive"), (True, "cached")):
            sent = out["sent"][cache]
            fwd_mb0 = {dst: n for (way, dst, mb), n in sent.items() if way == "forward" and mb == 0}
            row[f"{name}_ms"] = out["times"][cache] * 1e3
            row[f"{name}_MB_per_step"] = sum(sent.values()) / 1e6
            row[f"{name}_fwd_mb_blocks"] = sum(fwd_mb0.values()) // d
            row[f"{name}_peak_blocks"] = max(fwd_mb0.values()) // d
        # the paper's formulas are for chunk c on rank c % P (its interleaving), not for a V
        row["paper_naive_blocks"] = C * (C - 1) // 2 * Np if style == "loop" else None
        row["paper_cached_blocks"] = (P * (P - 1) // 2 + (V - 1) * P * P) * Np if style == "loop" else None
        rows.append(row)
        print(_line(row), flush=True)
    header = ("| P | V | style | C | naive ms/step | cached ms/step | naive MB/step | cached MB/step | "
              "naive blocks/mb (paper) | cached blocks/mb (paper) | peak blocks naive / cached |")
    lines = [header, "|" + "---|" * 11] + [_line(r) for r in rows]
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "args": vars(args), "block_bytes": d}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"pipeline-cpu-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    note = (f"CPU, {meta['cpus']} cores shared, gloo, torch {meta['torch']}; GPT hidden {args.hidden}, seq {args.seq}, "
            f"microbatch {args.mb_size} x {args.microbatches}, {Np} layer(s) = {Np} block(s) per chunk, float32; "
            f"one block sum of one microbatch = {d / 1e6:.3f} MB. blocks/mb: block sums sent forward per "
            "microbatch over all transitions (b_0 included); paper: its formula (b_0 left out). MB/step: forward "
            "+ backward, all microbatches.")
    stem.with_suffix(".md").write_text(note + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json / .md")


def _line(r):
    return (f"| {r['P']} | {r['V']} | {r['style']} | {r['C']} | {r['naive_ms']:.0f} | {r['cached_ms']:.0f} | "
            f"{r['naive_MB_per_step']:.1f} | {r['cached_MB_per_step']:.1f} | "
            f"{r['naive_fwd_mb_blocks']} ({r['paper_naive_blocks'] or '-'}) | "
            f"{r['cached_fwd_mb_blocks']} ({r['paper_cached_blocks'] or '-'}) | "
            f"{r['naive_peak_blocks']} / {r['cached_peak_blocks']} |")


if __name__ == "__main__":
    main()
