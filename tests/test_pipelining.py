"""Pipeline parallelism of converted models (issue 21): the state's layout across a stage boundary,
stages built for a split (``rr.build_stages``) and ``pipeline()`` with split points, on
``torch.distributed.pipelining``'s schedules (GPipe, 1F1B, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble, ZBVZeroBubble, DualPipeV), with and without cross-stage caching. CPU processes over gloo, float64.

Each distributed case compares with the unsplit model on the same batch: the loss, and the gradient
of EVERY parameter (the AttnRes queries and key-norm gains included, perturbed away from zero),
summed over ranks (parameters outside the layers get their gradient on the first and the last stage),
to |err| <= 1e-12 * max|grad| (float64; seen: <= 2e-15). Bytes per transition are counted from the tensors handed
to ``dist.isend`` (a spy on it) and checked against the paper's formula.

One process group runs many cases (a spawn costs seconds on 2 busy cores). A worker stuck anywhere
exits after WORKER_DEADLINE_S with its stack; the test kills what is left after TEST_DEADLINE_S; the
workers leave with os._exit after a barrier (gloo teardown deadlock, see test_distributed.py).
"""
from __future__ import annotations

import datetime
import faulthandler
import functools
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import residual_rewriter as rr
from processes import rendezvous
from residual_rewriter import pipelining as rp

SPLIT_BACKWARD = {"ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble", "ScheduleDualPipeV"}


def runs_on_this_torch(case: dict) -> bool:
    """torch < 2.13: the split backward is refused (test_split_backward_before_torch_2_13_is_refused), and
    pipeline() of a Hugging Face Llama fails there as for the original model (an int tensor between stages
    asked to require grad; seen on 2.11 with the unconverted model)."""
    if rp.TORCH_VERSION >= (2, 13):
        return True
    return case["schedule"] not in SPLIT_BACKWARD and not (case.get("tracer") and case["model"] == "llama")

WORKER_DEADLINE_S = 240
TEST_DEADLINE_S = 300
GRAD_RTOL = 1e-12  # float64: |pipeline - unsplit| <= GRAD_RTOL * max|unsplit| per parameter
LOSS_RTOL = 1e-12


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".query"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
            elif name.endswith(".key_norm_weight"):
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))


def make_model(kind: str, layers: int, **convert):
    """(converted model, name of its input keyword, kwargs added to every call), float64."""
    if kind == "gpt":
        from residual_rewriter.models import GPT, GPTConfig

        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=layers, n_embd=32, n_head=4, vocab_size=64, block_size=32)).double().eval()
        rr.convert_(model, **convert)
        key, extra = "idx", {}
    else:
        import warnings

        import transformers

        warnings.filterwarnings("ignore", message=".*token_id.*")
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(cfg).double().eval()
        rr.convert_(model, **convert)
        key, extra = "input_ids", {"use_cache": False}
    _perturb(model)
    return model, key, extra


def _batch(n=8, t=8, vocab=64):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (n, t), generator=g)


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def reference(case):
    """Loss and gradients of the unsplit model on the whole batch."""
    model, key, extra = make_model(case["model"], case["layers"], **case["convert"])
    x, y = _batch()
    out = rp._model_output(model(**{key: x}, **extra))
    loss = loss_fn(out, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------
# Unit tests (one process)
# ---------------------------------------------------------------------------------------------------
def test_layout_round_trip_and_read_from_the_tensors():
    """pack_state/unpack_state: the state comes back from the two tensors alone (how many blocks, and
    whether a partial sum exists, are their first sizes); with ``cached``, the receiver's kept block
    sums go in front."""
    h = torch.randn(5, 2, 3, 4)
    for n, has_partial in [(1, True), (3, False), (2, True)]:
        state = rr.AttnResState(tuple(h[:n]), h[4] if has_partial else None)
        blocks, partial = rp.pack_state(state)
        assert blocks.shape == (n, 2, 3, 4) and partial.shape == (int(has_partial), 2, 3, 4)
        back = rp.unpack_state(blocks, partial)
        assert len(back.blocks) == n and all(torch.equal(a, b) for a, b in zip(back.blocks, state.blocks))
        assert (back.partial is None) == (not has_partial)
        if has_partial:
            assert torch.equal(back.partial, state.partial)
        # caching: the receiver holds the first block sum; only the rest are sent
        sent, partial = rp.pack_state(state, cached=1)
        assert sent.shape[0] == n - 1
        again = rp.unpack_state(sent, partial, cached=state.blocks[:1])
        assert all(torch.equal(a, b) for a, b in zip(again.blocks, state.blocks)) and len(again.blocks) == n
    with pytest.raises(ValueError, match="not the state layout"):
        rp.unpack_state(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="between two rewritten layers"):
        rp.pack_state(torch.zeros(3))


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_state_layout_from_the_plan_is_the_state_a_layer_receives(kind):
    """state_layout(model, i), read from the conversion plan, is what layer i really receives, mid-block
    and at a block boundary."""
    if kind == "llama":
        pytest.importorskip("transformers")
    model, key, extra = make_model(kind, 4, num_blocks=3)
    layers = [model.get_submodule(p) for p in rp.layers_of(model)]
    seen = {}
    handles = [layer.register_forward_pre_hook(functools.partial(lambda i, m, a: seen.__setitem__(i, a[0]), i))
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(**{key: _batch()[0]}, **extra)
    for h in handles:
        h.remove()
    kinds = set()
    for i in range(1, 4):
        layout = rp.state_layout(model, i)
        assert (layout.num_blocks, layout.has_partial) == (len(seen[i].blocks), seen[i].partial is not None)
        kinds.add(layout.has_partial)
    assert kinds == {True, False}  # both a mid-block and a block-boundary split were checked


def test_stage_modules_chained_in_one_process_compute_the_model():
    """The chunks' modules of a P=2, V=2 split with caching, run in turn in one process: each sends
    only the block sums its receiver's rank does not hold, and the last returns the model's logits."""
    model, key, extra = make_model("gpt", 8, num_blocks=3)
    x = _batch()[0]
    chunks = rp.plan_chunks(model, [2, 4, 6], num_ranks=2, cache=True)
    layers = [model.get_submodule(h) for h in rp.layers_of(model)]
    caches = [rp._RankCache(True), rp._RankCache(True)]
    modules = [rp._StageModule(model, layers, c, caches[c.index % 2], [], extra, rp._model_output) for c in chunks]
    for cache in caches:
        cache.current_mb = 0
    sent, held = [], [0, 0]  # block sums each rank has received so far
    with torch.no_grad():
        out = ()
        for c, module in zip(chunks, modules):
            out = module(*out, **{key: x})
            if c.layout_out is not None:
                receiver = (c.index + 1) % 2
                sent.append(out[0].shape[0])
                assert out[0].shape[0] + held[receiver] == c.layout_out.num_blocks  # the rest are kept there
                assert out[1].shape[0] == int(c.layout_out.has_partial)
                held[receiver] = c.layout_out.num_blocks
        assert rel_err(out, model(**{key: x}, **extra)) <= 1e-12
    assert sent[-1] < chunks[-1].layout_in.num_blocks  # the last transition really sent fewer
    with pytest.raises(TypeError, match="keyword arguments on every rank"):
        modules[0](x)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("torch_version", [(2, 12), (2, 13)])
def test_every_layout_tensor_a_stage_receives_gets_a_gradient(monkeypatch, torch_version):
    """torch < 2.13's PipelineStage fails in the backward on a stage input without a gradient (an empty partial
    sum; a blocks tensor emptied by caching): unpack_state makes them part of b_0 there (adding their sum, 0),
    and pack_state computes its empty tensors from b_0 there, so that a stage's every output has a gradient too
    (torch >= 2.13 sends zeros back itself: nothing is added, no backward runs through them)."""
    from residual_rewriter.passes.state import AttnResState

    monkeypatch.setattr(rp, "TORCH_VERSION", torch_version)
    b0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    blocks, partial = rp.pack_state(AttnResState((b0 * 2,), None), cached=1)  # nothing sent: both empty
    assert blocks.shape[0] == partial.shape[0] == 0
    assert [t.grad_fn is not None for t in (blocks, partial)] == [torch_version < (2, 13)] * 2
    received = [t.detach().requires_grad_(True) for t in (blocks, partial)]
    kept = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    state = rp.unpack_state(*received, cached=[kept])
    assert torch.equal(state.blocks[0], kept) and state.partial is None
    state.blocks[0].sum().backward()
    grads = [t.grad for t in received]
    if torch_version < (2, 13):
        assert all(g is not None and g.shape == t.shape for g, t in zip(grads, received)), grads
    else:  # (nothing added: torch >= 2.13 sends zeros back itself)
        assert grads == [None, None]


def test_split_backward_before_torch_2_13_is_refused(monkeypatch):
    """torch < 2.13's weight backward cannot pass the attn_res op (an autograd node's ``_input_metadata``, seen on
    2.11): a zero-bubble schedule is refused at its first split backward, naming what works."""
    stage_cls = rp._stage_class()
    monkeypatch.setattr(rp, "TORCH_VERSION", (2, 12))
    for backward_type in ("input", "weight"):
        with pytest.raises(rr.ConversionError, match=r"split backward .* needs torch >= 2\.13.*ScheduleInterleaved1F1B"):
            stage_cls.backward_maybe_with_nosync(None, backward_type, {})


def test_bad_split_points_are_refused_with_what_is_allowed():
    model, _, _ = make_model("gpt", 4, num_blocks=2)
    for bad, match in [([0], "not between two rewritten layers"), ([4], "1 <= i <= 3"), ([2, 1], "increasing"),
                       ([2, 2], "increasing"), (["transformer.h.1"], "layer indices")]:
        with pytest.raises((ValueError, TypeError), match=match):
            rp.split_spec(model, bad)
    with pytest.raises(ValueError, match="do not divide over 2 ranks"):
        rp.plan_chunks(model, [1, 2], num_ranks=2)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        rp.plan_chunks(model, [2], num_ranks=1)
    with pytest.raises(ValueError, match=r"style='v' places two chunks on each rank: give 2 x 2 - 1 split points"):
        rp.plan_chunks(model, [1], num_ranks=2, style="v")
    with pytest.raises(ValueError, match="style is 'loop'.*or 'v'"):
        rp.plan_chunks(model, [1, 2, 3], num_ranks=2, style="V-shape")
    with pytest.raises(ValueError, match="rank 2 is not in 0 .. 1"):
        rp.build_stages(model, [2], rank=2, num_ranks=2, example_kwargs={}, num_microbatches=1)
    from residual_rewriter.models import GPT, GPTConfig

    with pytest.raises(rr.ConversionError, match="not converted"):
        rp.split_spec(GPT(GPTConfig(n_layer=2)), [1])
    flat = rr.convert_(_Flat(), example_inputs=(torch.randint(0, 16, (2, 5)),), num_blocks=2)
    assert flat.attn_res_report.holders == [""]
    with pytest.raises(rr.ConversionError, match="one holder.*no rewritten layers to split between"):
        rp.split_spec(flat, [1])


class _Flat(torch.nn.Module):
    """The adds in the model's own forward: converted as one holder, no layers to split between."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = torch.nn.Embedding(16, d)
        self.n1, self.n2, self.norm = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.f1, self.f2 = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.f1(self.n1(x))
        x = x + self.f2(self.n2(x))
        return self.norm(x)


class _SharedBiasLayer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.f = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x, bias):
        return x + self.f(self.norm(x)) * bias


class _SharedBias(torch.nn.Module):
    """Its layers read a tensor the model computes from its own parameter (as Gemma 4's per-layer embeddings)."""

    def __init__(self, d=16, layers=4):
        super().__init__()
        self.emb, self.gate = torch.nn.Embedding(16, d), torch.nn.Parameter(torch.ones(d))
        self.layers = torch.nn.ModuleList(_SharedBiasLayer(d) for _ in range(layers))

    def forward(self, ids):
        x, bias = self.emb(ids), torch.sigmoid(self.gate)
        for layer in self.layers:
            x = layer(x, bias)
        return x


@pytest.mark.parametrize("kind", ["shared-bias", "gpt"])
def test_a_middle_chunk_whose_layers_read_outside_parameters_is_refused(kind):
    """A middle chunk's module does not hold the parameters outside the layers: a gradient reaching them through
    its layers would be missed by a split backward and not scaled by the schedule, so it is refused when it runs
    with grad; the GPT's layers read nothing of the kind and run."""
    if kind == "gpt":
        model, key, _ = make_model("gpt", 4, num_blocks=2)
    else:
        model, key = rr.convert_(_SharedBias().double(), example_inputs=(torch.randint(0, 16, (2, 5)),), num_blocks=2), "ids"
    ids = torch.randint(0, 16, (2, 5))
    chunks = rp.plan_chunks(model, [1, 2, 3], num_ranks=2, cache=False)
    layers = [model.get_submodule(h) for h in rp.layers_of(model)]
    outside = [p for p in model.parameters() if not any(p is q for layer in layers for q in layer.parameters())]
    first, middle = (rp._StageModule(model, layers, chunks[i], rp._RankCache(False), held, {}, rp._model_output)
                     for i, held in ((0, outside), (1, [])))
    first.cache.current_mb = middle.cache.current_mb = 0
    sent = [t.detach().requires_grad_(True) for t in first(**{key: ids})]
    if kind == "gpt":
        middle(*sent, **{key: ids})
        return
    with pytest.raises(rr.ConversionError, match=r"_SharedBiasLayer takes \['bias'\] computed from parameters outside"):
        middle(*sent, **{key: ids})
    with torch.no_grad():  # (no gradient: nothing to lose)
        middle(*sent, **{key: ids})


# ---------------------------------------------------------------------------------------------------
# Distributed cases
# ---------------------------------------------------------------------------------------------------
class HandFirst(torch.nn.Module):
    """Stage 0 of the GPT written by hand, as a user would: returns the state in the layout."""

    def __init__(self, gpt, split):
        super().__init__()
        self.gpt, self.split = gpt, split

    def forward(self, idx):
        t = self.gpt.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for layer in t.h[: self.split]:
            x = layer(x)
        return rp.pack_state(x)


class HandLast(HandFirst):
    """The rest, from the two layout tensors alone (no plan needed to rebuild the state)."""

    def forward(self, blocks, partial):
        t = self.gpt.transformer
        state = rp.unpack_state(blocks, partial)
        for layer in t.h[self.split:]:
            state = layer(state)
        return self.gpt.lm_head(t.ln_f(state))


def _spy_isend(record: list):
    """Count the bytes of every tensor handed to dist.isend (P2POp and batch_isend_irecv included)."""
    import torch.distributed.distributed_c10d as c10d

    original = c10d.isend

    @functools.wraps(original)
    def isend(tensor, *args, **kwargs):
        # the state and its gradients (the models are float64), not the schedule's own messages (int32 votes;
        # torch 2.11's schedules greet each stage with a float32 scalar)
        if tensor.dtype == torch.float64:
            record.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    c10d.isend = isend
    dist.isend = isend


def _run_case(case, rank, world, sent_record):
    from torch.distributed import pipelining as tp

    model, key, extra = make_model(case["model"], case["layers"], **case["convert"])
    x, y = _batch()
    mbs = case.get("microbatches", 4)
    schedule_cls = getattr(tp, case["schedule"])
    losses: list = []
    del sent_record[:]
    reduced_equal = None
    if case.get("hand"):  # a user's own stage modules, the state packed and unpacked by the helpers
        stage_module = (HandFirst if rank == 0 else HandLast)(model, case["splits"][0])
        stage = tp.PipelineStage(stage_module, rank, 2, torch.device("cpu"))  # shapes inferred by pipelining
        sched = schedule_cls(stage, n_microbatches=mbs, loss_fn=loss_fn)
        sched.step(*([x] if rank == 0 else []), target=y, losses=losses)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        sent = {}
    elif case.get("tracer"):  # pipeline() + split_spec: the state crosses flattened (no caching)
        pipe = tp.pipeline(model, mb_args=(x[: len(x) // mbs],), mb_kwargs=extra or None,
                           split_spec=rp.split_spec(model, case["splits"]))
        stage = tp.build_stage(pipe.get_stage_module(rank), rank, pipe.info(), torch.device("cpu"))
        sched = schedule_cls(stage, n_microbatches=mbs, loss_fn=loss_fn)
        sched.step(*([x] if rank == 0 else []), target=y, losses=losses)  # constants were traced in
        # pipeline()'s stage modules spell paths with "_" and hold a tied weight once per stage using it:
        # each name maps to the reference's (first) name of its parameter; the ranks' parts are summed
        first: dict = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), n)
        alias = {n.replace(".", "_"): first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        named = pipe.get_stage_module(rank).named_parameters()
        grads = {alias[n.replace(".", "_")]: p.grad.clone() for n, p in named if p.grad is not None}
        sent = {}
    else:
        stages = rp.build_stages(model, case["splits"], rank=rank, num_ranks=world, example_kwargs={key: x},
                                 num_microbatches=mbs, cache=case["cache"], model_kwargs=extra,
                                 free_other_layers=case.get("free", False), style=case.get("style", "loop"))
        multi = len(stages) > 1
        sched = schedule_cls(stages if multi else stages[0], n_microbatches=mbs, loss_fn=loss_fn)
        sched.step(**{key: x}, target=y, losses=losses)
        if case.get("reduce"):  # every rank then holds the outside parameters' whole gradient
            rp.reduce_outside_grads(model)
            outside = rp.layers_of(model)
            grads = {n: p.grad.clone() for n, p in model.named_parameters()
                     if p.grad is not None and not any(n.startswith(h + ".") for h in outside)}
            check_equal = [None] * world
            dist.all_gather_object(check_equal, grads)
            reduced_equal = all(set(g) == set(grads) and all(torch.equal(g[n], grads[n]) for n in grads)
                                for g in check_equal)
            # count them once (rank 0's copy), to compare with the unsplit model as the other cases do
            if rank:
                for n in grads:
                    dict(model.named_parameters())[n].grad = None
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        sent = dict(rp.transition_bytes(stages))
    holders = rp.layers_of(model)
    layers_here = sorted({i for n in grads for i, h in enumerate(holders) if n.startswith(h + ".")})
    freed = sorted(i for i, h in enumerate(holders) if all(p.is_meta for p in model.get_submodule(h).parameters()))
    gathered = [None] * world
    dist.all_gather_object(gathered, (grads, [l.item() for l in losses], sent, sum(sent_record), layers_here, freed))
    if rank != 0:
        return None
    layers_by_rank = [g[4] for g in gathered]
    freed_by_rank = [g[5] for g in gathered]
    gathered = [g[:4] for g in gathered]
    all_grads: dict = {}
    for g, _, _, _ in gathered:
        for n, t in g.items():
            all_grads[n] = all_grads[n] + t if n in all_grads else t
    losses = [l for _, ls, _, _ in gathered for l in ls]
    sent = {k: v for _, _, s, _ in gathered for k, v in s.items()}
    return dict(compare(case, all_grads, losses), sent=sent, isend_bytes=sum(b for _, _, _, b in gathered),
                reduced_equal=reduced_equal, layers_by_rank=layers_by_rank, freed_by_rank=freed_by_rank, num_layers=len(holders), hidden_bytes=x[: len(x) // mbs].numel() * 32 * 8,
                num_blocks=model.attn_res_report.streams[0].num_blocks)


def compare(case, grads, losses):
    """The pipeline's loss and gradients against the unsplit model's: plain numbers (to cross processes)."""
    ref_loss, ref_grads = reference(case)
    worst = max((((grads[n] - g).abs().max() / g.abs().max()).item(), n) for n, g in ref_grads.items() if n in grads)
    return dict(loss=sum(losses) / len(losses), ref_loss=ref_loss, num_grads=len(ref_grads),
                num_attn_res=sum(".attn_res." in n for n in ref_grads), worst=worst,
                missing=sorted(set(ref_grads) - set(grads)), extra=sorted(set(grads) - set(ref_grads)))


def _worker(rank, world, store, cases, queue):
    import sys

    faulthandler.dump_traceback_later(WORKER_DEADLINE_S, exit=True)
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    record: list = []
    _spy_isend(record)
    results = []
    for case in cases:  # a case that raises fails the worker: start_processes re-raises its traceback
        results.append(_run_case(case, rank, world, record))
        dist.barrier()
    if rank == 0:
        queue.put(results)
    dist.barrier()
    os._exit(0)


def run_cases(cases, world):
    queue = mp.get_context("spawn").SimpleQueue()
    workers = mp.start_processes(_worker, args=(world, rendezvous(), cases, queue), nprocs=world,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + TEST_DEADLINE_S
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for p in workers.processes:
                p.kill()
            pytest.fail(f"ranks still running after {TEST_DEADLINE_S} s; killed")
    return queue.get()


def check(case, result, world):
    """The assertions every distributed case makes: loss and every gradient equal to the unsplit
    model's, and each rank computed exactly the layers of its chunks."""
    assert not result["missing"] and not result["extra"], (result["missing"], result["extra"])
    assert result["num_attn_res"] > 0
    assert abs(result["loss"] - result["ref_loss"]) <= LOSS_RTOL * abs(result["ref_loss"]), result
    assert result["worst"][0] <= GRAD_RTOL, result["worst"]
    bounds = [0, *case["splits"], result["num_layers"]]
    chunks = [range(bounds[c], bounds[c + 1]) for c in range(len(bounds) - 1)]
    if case.get("style") == "v":  # rank r: chunks r and 2P-1-r (the first and the last on rank 0)
        mine = [[chunks[r], chunks[2 * world - 1 - r]] for r in range(world)]
    else:
        mine = [chunks[r::world] for r in range(world)]
    expected = [sorted(i for c in mine[r] for i in c) for r in range(world)]
    assert result["layers_by_rank"] == expected, (result["layers_by_rank"], expected)
    if case.get("reduce"):  # after reduce_outside_grads every rank holds the same, whole gradients
        assert result["reduced_equal"] is True
    if case.get("free"):  # the other ranks' layers are on the meta device: their memory is freed
        others = [sorted(set(range(result["num_layers"])) - set(e)) for e in expected]
        assert result["freed_by_rank"] == others, (result["freed_by_rank"], others)
    else:
        assert result["freed_by_rank"] == [[]] * world


G4 = dict(model="gpt", layers=4, convert=dict(num_blocks=3))  # 8 sublayers in blocks of 3: 3,3,2
L4 = dict(model="llama", layers=4, convert=dict(num_blocks=2))  # 8 sublayers in blocks of 4: 4,4
G8 = dict(model="gpt", layers=8, convert=dict(block_size=2))  # one block per layer: chunks end at block ends
G8_MID = dict(model="gpt", layers=8, convert=dict(num_blocks=3))  # blocks of 6 sublayers: chunks end mid-block
INTERLEAVED = "ScheduleInterleaved1F1B"
# name -> case; "mid": a stage boundary inside a block, "end": at a block's end
TWO = {
    "gpt-mid-gpipe": dict(G4, splits=[2], schedule="ScheduleGPipe", cache=True),
    "gpt-end-1f1b": dict(G4, splits=[3], schedule="Schedule1F1B", cache=True),
    "gpt-mid-1f1b-naive": dict(G4, splits=[2], schedule="Schedule1F1B", cache=False),
    "llama-mid-gpipe": dict(L4, splits=[1], schedule="ScheduleGPipe", cache=True),
    "llama-end-1f1b": dict(L4, splits=[2], schedule="Schedule1F1B", cache=True),
    "gpt-P2V2-cached": dict(G8, splits=[2, 4, 6], schedule=INTERLEAVED, cache=True),
    "gpt-P2V2-naive": dict(G8, splits=[2, 4, 6], schedule=INTERLEAVED, cache=False),
    "gpt-P2V2-mid-cached": dict(G8_MID, splits=[2, 4, 6], schedule=INTERLEAVED, cache=True),
    "gpt-P2V2-mid-zerobubble-cached": dict(G8_MID, splits=[2, 4, 6], schedule="ScheduleInterleavedZeroBubble",
                                           cache=True),
    "llama-P2V2-mid-cached-freed": dict(L4, splits=[1, 2, 3], schedule=INTERLEAVED, cache=True, free=True),
    "gpt-P2V2-mid-loopedbfs-cached": dict(G8_MID, splits=[2, 4, 6], schedule="ScheduleLoopedBFS", cache=True,
                                          reduce=True),
    "gpt-P2-v-mid-zbv-cached": dict(G8_MID, splits=[2, 4, 6], schedule="ScheduleZBVZeroBubble", cache=True, style="v"),
    "gpt-P2-v-end-zbv-naive": dict(G8, splits=[2, 4, 6], schedule="ScheduleZBVZeroBubble", cache=False, style="v"),
    "llama-P2-v-mid-dualpipev-cached": dict(L4, splits=[1, 2, 3], schedule="ScheduleDualPipeV", cache=True, style="v"),
    "gpt-hand-mid-gpipe": dict(G4, splits=[2], schedule="ScheduleGPipe", hand=True),
    "gpt-hand-end-1f1b": dict(G4, splits=[3], schedule="Schedule1F1B", hand=True),
    "gpt-tracer-mid-gpipe": dict(G4, splits=[2], schedule="ScheduleGPipe", tracer=True),
    "llama-tracer-end-1f1b": dict(L4, splits=[2], schedule="Schedule1F1B", tracer=True),
}
FOUR = {
    "gpt-P4V2-cached": dict(G8, splits=list(range(1, 8)), schedule=INTERLEAVED, cache=True),
    "gpt-P4V2-naive": dict(G8, splits=list(range(1, 8)), schedule=INTERLEAVED, cache=False),
    "gpt-P4V2-mid-cached": dict(G8_MID, splits=list(range(1, 8)), schedule=INTERLEAVED, cache=True),
    "llama-P4V2-mid-cached": dict(model="llama", layers=8, convert=dict(num_blocks=3), splits=list(range(1, 8)),
                                  schedule=INTERLEAVED, cache=True),
    "gpt-P4V2-mid-zerobubble-cached": dict(G8_MID, splits=list(range(1, 8)), schedule="ScheduleInterleavedZeroBubble",
                                           cache=True),
    "gpt-P4-v-mid-zbv-cached": dict(G8_MID, splits=list(range(1, 8)), schedule="ScheduleZBVZeroBubble", cache=True,
                                    style="v"),
    "gpt-P4-v-end-zbv-naive": dict(G8, splits=list(range(1, 8)), schedule="ScheduleZBVZeroBubble", cache=False,
                                   style="v"),
    "gpt-P4-v-end-zbv-cached": dict(G8, splits=list(range(1, 8)), schedule="ScheduleZBVZeroBubble", cache=True,
                                    style="v"),
    "gpt-P4-v-mid-dualpipev-cached": dict(G8_MID, splits=list(range(1, 8)), schedule="ScheduleDualPipeV", cache=True,
                                          style="v", microbatches=8),
    "gpt-P4-1f1b-mid-cached": dict(G8_MID, splits=[2, 4, 6], schedule="Schedule1F1B", cache=True),
}
GROUPS = {2: TWO, 4: FOUR}


_RESULTS: dict = {}


def results(world: int) -> dict:
    """Every case of a group, run in ONE process group of ``world`` processes, once per session (a
    failure too: the group is not run again for each of its tests)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("transformers")
    if world not in _RESULTS:
        names = [n for n, case in GROUPS[world].items() if runs_on_this_torch(case)]
        try:
            _RESULTS[world] = dict(zip(names, run_cases([GROUPS[world][n] for n in names], world)))
        except BaseException as exc:  # noqa: BLE001 - pytest.fail's exception included
            _RESULTS[world] = exc
    if isinstance(_RESULTS[world], BaseException):
        raise _RESULTS[world]
    return _RESULTS[world]


@pytest.mark.parametrize("world,name", [(w, n) for w, group in GROUPS.items() for n in group])
def test_loss_and_every_gradient_equal_the_unsplit_model(world, name):
    if not runs_on_this_torch(GROUPS[world][name]):
        pytest.skip(f"not on torch {torch.__version__} (runs_on_this_torch)")
    check(GROUPS[world][name], results(world)[name], world)


def _paper_bytes(P: int, V: int, Np: int, d: int) -> tuple[int, int]:
    """The paper's bytes per microbatch over all transitions: naive C(C-1)/2 Np d, cached
    P(P-1)/2 Np d + (V-1) P^2 Np d (C = P V chunks, Np block sums per chunk)."""
    C = P * V
    return C * (C - 1) // 2 * Np * d, (P * (P - 1) // 2 + (V - 1) * P * P) * Np * d


@pytest.mark.parametrize("world,V", [(2, 2), (4, 2)])
def test_bytes_per_transition_follow_the_papers_formula(world, V):
    """Chunks that end at block ends (Np block sums each), interleaved: the bytes each transition hands
    to dist.isend, naive and cached, against the paper's formula. The formula counts the block sums
    b_1.. that chunks produce; the embedding output b_0 is a source too and rides along: in every
    naive transition, and in the first one into each rank that receives (P - 1, plus rank 0 when V > 1)
    with caching. No partial sum crosses (p = 0). The backward sends the same bytes back."""
    res = results(world)
    naive, cached = res[f"gpt-P{world}V{V}-naive"], res[f"gpt-P{world}V{V}-cached"]
    P, C = world, world * V
    Np, rem = divmod(naive["num_blocks"], C)
    assert rem == 0 and Np >= 1
    d = naive["hidden_bytes"]  # one block sum of one microbatch, float64
    paper_naive, paper_cached = _paper_bytes(P, V, Np, d)
    b0_naive, b0_cached = (C - 1) * d, ((P - 1) + (1 if V > 1 else 0)) * d
    for r in (naive, cached):  # the stages' own count is what reached dist.isend, both directions
        assert r["isend_bytes"] == sum(r["sent"].values())
    mbs = {mb for (_, _, mb) in naive["sent"]}
    assert mbs == {mb for (_, _, mb) in cached["sent"]} == set(range(4))  # every microbatch sent, in both
    for mb in mbs:
        fwd = {name: {dst: n for (way, dst, m), n in r["sent"].items() if way == "forward" and m == mb}
               for name, r in (("naive", naive), ("cached", cached))}
        bwd = {name: {dst + 1: n for (way, dst, m), n in r["sent"].items() if way == "backward" and m == mb}
               for name, r in (("naive", naive), ("cached", cached))}
        assert fwd == bwd  # each transition's gradients mirror its activations
        assert sum(fwd["naive"].values()) == paper_naive + b0_naive, (fwd["naive"], paper_naive)
        assert sum(fwd["cached"].values()) == paper_cached + b0_cached, (fwd["cached"], paper_cached)
        # the peak: O(C) block sums naive (the last transition), O(P) cached
        assert max(fwd["naive"].values()) == ((C - 1) * Np + 1) * d
        assert max(fwd["cached"].values()) == (min(P, C - 1) * Np + 1) * d


@pytest.mark.parametrize("cache", ["naive", "cached"])
def test_bytes_per_transition_in_a_v(cache):
    """style="v" (rank r holds chunks r and 2P-1-r), chunks ending at block ends (Np block sums each): the
    transition into chunk k carries b_0 and the k Np block sums before it, naive; cached, a rank sends only
    what the receiving rank has not received: chunk k > P's rank received b_0 .. b_{r Np} with its chunk
    r = 2P-1-k (none on rank 0). Chunk P-1 hands chunk P its state on its own rank: no send."""
    world, name = 4, f"gpt-P4-v-end-zbv-{cache}"
    if not runs_on_this_torch(FOUR[name]):
        pytest.skip(f"not on torch {torch.__version__} (runs_on_this_torch)")
    r = results(world)[name]
    P, C = world, 2 * world
    Np, rem = divmod(r["num_blocks"], C)
    assert rem == 0 and Np >= 1
    d = r["hidden_bytes"]
    expected = {}
    for k in range(1, C):
        if k == P:
            continue  # on one rank
        held = (2 * P - 1 - k) * Np + 1 if cache == "cached" and k > P and 2 * P - 1 - k >= 1 else 0
        expected[k] = (k * Np + 1 - held) * d
    assert r["isend_bytes"] == sum(r["sent"].values())
    assert {mb for (_, _, mb) in r["sent"]} == set(range(FOUR[name].get("microbatches", 4)))  # every microbatch sent
    for mb in {mb for (_, _, mb) in r["sent"]}:
        fwd = {dst: n for (way, dst, m), n in r["sent"].items() if way == "forward" and m == mb}
        bwd = {dst + 1: n for (way, dst, m), n in r["sent"].items() if way == "backward" and m == mb}
        assert fwd == expected and bwd == expected, (fwd, bwd, expected)
