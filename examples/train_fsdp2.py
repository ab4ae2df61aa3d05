"""Train a model converted in place with FSDP2 on 2 CPU processes (gloo): the usual recipe, unchanged.

``convert_`` keeps the model's module tree, so the standard FSDP2 recipe applies as it is: ``fully_shard``
on every transformer layer, then on the root. Each layer's AttnRes parameters live in that layer
(``transformer.h.3.attn_res.mlp.query``) and are sharded with it; the Block AttnRes state passes
between the layers like the hidden tensor did.

This script spawns 2 processes (``torch.multiprocessing``, start method "spawn"), each with its own
half of every batch, builds the same model in each (same seed), converts it with ``convert_``,
shards it on a CPU device mesh (``init_device_mesh("cpu", (2,))``) and trains it with AdamW. It then
compares the losses with one process training the same model on the whole batches (they agree to
float32 rounding) and gathers the full state dict on rank 0.

    python examples/train_fsdp2.py --steps 20
"""
import argparse
import os
import socket
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import residual_rewriter as rr
from residual_rewriter.models import GPT, GPTConfig

WORLD = 2


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=4, help="transformer layers (2 residual sublayers each)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--blocks", type=int, default=4, help="AttnRes blocks N")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, split over the 2 processes")
    p.add_argument("--seq", type=int, default=64)
    return p.parse_args()


def text() -> torch.Tensor:
    import inspect
    import json
    import textwrap

    return torch.tensor(list("".join(inspect.getsource(m) for m in (json, textwrap)).encode()), dtype=torch.long)


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=4, block_size=args.seq))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rr.convert_(model, num_blocks=args.blocks)  # in place: model.transformer.h is still its ModuleList
    return model


def batches(args, data):
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=g)
        yield (torch.stack([data[s : s + args.seq] for s in starts]),
               torch.stack([data[s + 1 : s + args.seq + 1] for s in starts]))


def train(model, args, data, rank=0, world=1) -> list[float]:
    attn = [p for n, p in model.named_parameters() if ".attn_res." in n]
    ids = {id(p) for p in attn}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": 3e-3},
                             {"params": attn, "lr": 3e-2, "weight_decay": 0.0}])
    losses = []
    per_rank = args.batch // world
    for x, y in batches(args, data):
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)  # the mean of the halves' losses is the whole batch's loss
        losses.append(total.item() / world)
    return losses


def worker(rank: int, args, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = build(args)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.transformer.h:  # each layer, with its own AttnRes parameters ...
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # ... then the root (embeddings, final norm, head)
        q = model.transformer.h[1].attn_res.mlp.query
        local = q.to_local().shape[0]
        losses = train(model, args, text(), rank, WORLD)
        # the full (unsharded) weights, e.g. to save a checkpoint: gathered on every rank, kept on rank 0
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            queries = {n: t for n, t in full.items() if n.endswith(".query")}
            queue.put({"losses": losses, "placement": f"{type(q).__name__} {q.placements}, "
                       f"{local} of {q.shape[0]} values on rank 0", "num_queries": len(queries),
                       "largest_query": max(t.abs().max().item() for t in queries.values())})
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    # The work is done and rank 0's result is in the pipe. Leave without tearing the process group
    # down: on torch 2.13 CPU that teardown can abort ("terminate called without an active exception")
    # or hang, gloo's thread waiting for the GIL (seen in CI under load; the tests exit the same way).
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    args = parse()
    assert args.batch % WORLD == 0, "--batch must be even (split over 2 processes)"
    if not dist.is_available() or not dist.is_gloo_available():
        raise SystemExit("needs torch.distributed with the gloo backend")
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(args, free_port(), queue), nprocs=WORLD, start_method="spawn", join=True)
    got = queue.get()
    print(f"FSDP2 on {WORLD} CPU processes (gloo): fully_shard on each of {args.layers} layers, then the root")
    print(f"a pseudo-query's parameter: {got['placement']}")
    torch.set_num_threads(1)
    reference = train(build(args), args, text())  # one process, whole batches: what the 2 processes must match
    print(f"\n{'step':>4}  {'FSDP2 (2 proc)':>14}  {'1 process':>10}")
    for i, (a, b) in enumerate(zip(got["losses"], reference), 1):
        if i == 1 or i % 5 == 0 or i == args.steps:
            print(f"{i:4d}  {a:14.4f}  {b:10.4f}")
    diff = max(abs(a - b) for a, b in zip(got["losses"], reference))
    print(f"max |loss difference| FSDP2 vs one process: {diff:.1e}")
    print(f"gathered full state dict on rank 0: {got['num_queries']} pseudo-queries, "
          f"largest |entry| {got['largest_query']:.3f} (all started at 0)")


if __name__ == "__main__":
    main()
