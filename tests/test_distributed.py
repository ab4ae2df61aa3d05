"""A model converted in place trains as users train it on many devices: FSDP2 ``fully_shard`` on every
decoder layer then on the root (the standard recipe), and DDP. Two CPU processes over gloo; the
losses of three SGD steps equal a single-process run's.

No hang can outlive its deadline: a worker stuck anywhere (rendezvous, a collective, teardown) prints
its stack and exits after WORKER_DEADLINE_S, and the test kills what is left after TEST_DEADLINE_S.
(CI once ran past its 90 minutes inside these tests; the 120 s gloo timeout covers collectives only.)"""
from __future__ import annotations

import datetime
import faulthandler
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import residual_rewriter as rr
from processes import rendezvous

STEPS = 3
WORKER_DEADLINE_S = 150  # a run takes ~10 s on 2 busy cores
TEST_DEADLINE_S = 180


def _model():
    from model_zoo import make_architecture

    torch.manual_seed(0)
    model = make_architecture("llama").float().train()
    rr.convert_(model, num_blocks=2)
    with torch.no_grad():  # non-zero queries: really AttnRes
        for name, p in model.named_parameters():
            if name.endswith(".query"):
                p.copy_(torch.randn(p.shape) * 0.3)
    return model


def _batch(rank: int, world: int):
    ids = torch.randint(0, 128, (2 * world, 8), generator=torch.Generator().manual_seed(1))
    return ids[rank * 2 : (rank + 1) * 2]


def _train(model, x, world: int) -> list[float]:
    """Losses of STEPS SGD steps on batch ``x`` (averaged over the ``world`` processes)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(STEPS):
        loss = model(x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _worker(rank: int, world: int, store: str, how: str, queue) -> None:
    import sys

    faulthandler.dump_traceback_later(WORKER_DEADLINE_S, exit=True)  # stack to stderr, then exit(1)
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription
    sys.path.insert(0, os.path.dirname(__file__))
    # a worker that dies must not leave the other waiting forever in a collective
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    model = _model()
    if how == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:  # refused before anything runs: the sharded model trains below exactly as if never touched
            rr.convert_(model)
            raise AssertionError("converting a model sharded by FSDP2 was not refused")
        except rr.ConversionError as exc:
            assert "sharded by FSDP2" in str(exc), exc
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    losses = _train(model, _batch(rank, world), world)
    if rank == 0:
        queue.put(losses)  # written to the pipe before put returns
    dist.barrier()
    # What is tested ends here; the worker exits without tearing down. Teardown can deadlock on
    # torch 2.13 CPU (seen with gdb in this test): DDP's Reducer destructor, holding the GIL, joins
    # gloo's work thread, which waits for the GIL to free a tensor of its last all-reduce.
    os._exit(0)


def _run_two_workers(how: str) -> list[float]:
    """Rank 0's losses. A worker that fails raises here (with its traceback); one that hangs past the
    deadlines fails the test instead of hanging the suite."""
    queue = mp.get_context("spawn").SimpleQueue()
    workers = mp.start_processes(_worker, args=(2, rendezvous(), how, queue), nprocs=2, start_method="spawn",
                                 join=False)
    deadline = time.monotonic() + TEST_DEADLINE_S
    while not workers.join(timeout=1):  # raises if a worker exited non-zero
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(workers.processes) if p.is_alive()]
            for p in workers.processes:
                p.kill()
            pytest.fail(f"{how}: ranks {alive} still running after {TEST_DEADLINE_S} s; killed")
    return queue.get()


@pytest.mark.parametrize("how", ["fsdp2", "ddp"])
def test_trains_sharded_per_layer_like_on_one_process(how):
    pytest.importorskip("transformers")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # the single-process reference: the whole batch on one process
    reference = _train(_model(), torch.cat([_batch(r, 2) for r in range(2)]), world=1)
    losses = _run_two_workers(how)
    assert losses[-1] < losses[0]
    # the mean of two half-batch losses is the full-batch loss (equal token counts per half)
    assert torch.allclose(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6), (losses, reference)


def test_pipelining_splits_between_rewritten_layers():
    """torch.distributed.pipelining's tracer splits the converted model between two layers in the
    middle of a block (the state, partial sum included, crosses the stage boundary as plain tensors),
    and the stages, run in turn, compute the model.
    (The whole-graph conversion failed here: 'Cannot add placeholder ... to root module'.)"""
    from torch.distributed.pipelining import SplitPoint, pipeline

    from model_zoo import make_gpt, rel_err

    model = make_gpt()
    rr.convert_(model, num_blocks=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".query"):
                p.copy_(torch.randn(p.shape) * 0.3)
    (x,) = model.example_inputs()
    pipe = pipeline(model, mb_args=(x,), split_spec={"transformer.h.1": SplitPoint.BEGINNING})
    assert pipe.num_stages == 2
    handed_over = pipe.get_stage_module(0)(x)
    assert all(isinstance(t, torch.Tensor) for t in handed_over)
    with torch.no_grad():
        out = pipe.get_stage_module(1)(*handed_over)
        assert rel_err(out, model(x)) <= 1e-6
