"""The library ops, ``torch.ops.residual_rewriter.<name>``: declared once, in ``OPS``, registered from it.

``convert`` emits ``attn_res`` at every residual site (the compile backend finds them by name); the
lowering passes (``passes/lowering``) turn those into the two-phase and fused ops. An entry (``Op``) holds

* ``schema``: name, arguments and outputs, in torch.library's syntax (what graphs and passes see);
* ``cpu``: the plain PyTorch reference (``reference.py``, ``reference_grads.py``), the kernel on every
  device but CUDA; ``cuda``: its function in ``dispatch.py`` (Triton), imported on the first CUDA call,
  so importing this module does not import triton. Both take the same arguments, return the same;
* ``args`` / ``out``: where those differ from the op's arguments / outputs; ``fake``: the outputs'
  shapes and dtypes for FakeTensor tracing (torch.compile, export);
* autograd, for a forward op, through its ``backward`` op (an entry of its own): ``save`` picks what the
  backward reads (the inputs, the lse; never an output the kernels recompute), ``grad_args`` turns the
  outputs' gradients into the backward op's ``grad_*`` and ``accumulate`` arguments.

Conventions. Tensors are [..., D] in the sources' dtype, ``lse`` [S, ...] fp32 (float64 for float64
sources). A custom op's outputs are fixed: an absent (None) output or gradient is an EMPTY tensor. A
backward op returns the gradients of its tensor arguments other than ``grad_*``, ``lse`` and
``accumulate``, in order, a list's one by one (that is also its fake, and how they reach the inputs).
``accumulate[i]``, when not None, is added in the kernel to the gradient of source i (of the partial
for ``attn_res_phase2_normed_backward``): its other summands, folded in by
``passes/lowering/fold_grad_sums.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from . import reference as R
from . import reference_grads as RG

LIB = "residual_rewriter"


@dataclass(frozen=True)
class Op:
    """One op. ``a``: its arguments by name; ``s``: what ``save`` kept, by name."""

    schema: str
    cpu: Callable
    cuda: Callable
    args: Optional[Callable] = None  # (a, argument values in order) -> cpu's / cuda's arguments
    out: Optional[Callable] = None  # (cpu's / cuda's result, a) -> the op's outputs
    fake: Optional[Callable] = None  # a -> outputs (a backward op's: the rule in the module docstring)
    backward: Optional[Op] = None
    save: Callable = lambda a, out: vars(a)  # (a, outputs) -> {name: value} for the backward; default: the inputs
    grad_args: Optional[Callable] = None  # (s, *output gradients) -> {the backward op's grad_*, accumulate: value}
    input_grads: Optional[Callable] = None  # (s, {input: gradient}) -> None: what the backward's rule misses
    composite: Optional[Callable] = None  # the op in functional torch ops: what run_decompositions() puts in its place


def _dispatch(name: str) -> Callable:
    """``dispatch.<name>``, imported on the first call: dispatch.py imports triton."""

    def cuda(*args, **kwargs):
        from . import dispatch

        return getattr(dispatch, name)(*args, **kwargs)

    return cuda


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _dense(grad: Optional[Tensor], zeros_like: Tensor) -> Tensor:
    """An upstream gradient, contiguous; zeros when none reached the output."""
    return torch.zeros_like(zeros_like) if grad is None else grad.contiguous()


def _contiguous(grad: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.contiguous()


def _query(a) -> Tensor:
    return a.query if hasattr(a, "query") else a.queries


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ---- CPU implementations beyond the plain reference: dispatch.py's float64 paths, same arguments -------


def _accumulating(reference: Callable, n_args: int) -> Callable:
    """A backward reference on (its n_args..., [lse,] accumulate): accumulate added to the sources' grads."""

    def cpu(*args):
        gs, *rest = reference(*args[:n_args])
        return RG.accumulated(gs, args[-1]), *rest

    return cpu


def _phase1_normed_cpu(*args):  # (..., block_end) -> (normed_0, outs_1.., lse, block end or None)
    *args, block_end = args
    end = torch.add(*block_end) if block_end is not None else None
    sources = [*args[0], end] if end is not None else args[0]
    return (*R.attn_res_phase1_normed_reference(sources, *args[1:]), end)


def _phase2_normed_backward_cpu(*args):  # (..., grad_partial): added to the partial's gradient
    *args, grad_partial = args
    go, gl, gp, *rest = RG.attn_res_phase2_normed_backward_reference(*args)
    return go, gl, RG.accumulated([gp], [grad_partial])[0] if gp is not None else None, *rest


def _with_mix(reference: Callable) -> Callable:
    return lambda *args, return_mix=True: reference(*args)  # computes the mix anyway; ``_mix_out`` drops it


# ---- op arguments -> cpu / cuda arguments; results -> op outputs; fakes ---------------------------------


def _block_end_args(a, values):  # (..., end_partial, end_delta) -> (..., block_end)
    if (a.end_partial is None) != (a.end_delta is None):
        raise ValueError("attn_res_phase1_normed: end_partial and end_delta come together")
    return (*values[:-2], (a.end_partial, a.end_delta) if a.end_partial is not None else None)


def _grad_partial_args(a, values):  # (..., accumulate: [the partial's]) -> (..., grad_partial)
    (acc,) = a.accumulate
    if acc is not None and a.partial is None:
        raise ValueError("attn_res_phase2_normed_backward: a gradient to accumulate, but no partial block")
    return (*values[:-1], acc)


def _mix_out(result, a):  # (mix, normed): the mix EMPTY without return_mix (the kernel then skips its store)
    mix, normed = result
    return mix if a.return_mix else _empty(normed), normed


def _source(a) -> Tensor:
    """sources[0], once the sources are checked against each other and the query."""
    R._check_sources(a.sources, a.query if hasattr(a, "query") else a.queries[0])
    return a.sources[0]


def _phase1_fake(a):  # (outs: S x [..., D], lse [S, ...])
    src, S = _source(a), a.queries.shape[0]
    lse_dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    return [src.new_empty(src.shape) for _ in range(S)], src.new_empty((S, *src.shape[:-1]), dtype=lse_dtype)


def _phase1_normed_fake(a):  # (normed_0, outs_1.., lse, block end or EMPTY)
    outs, lse = _phase1_fake(a)
    return outs[0], outs[1:], lse, torch.empty_like(a.end_partial) if a.end_partial is not None else _empty(a.queries)


def _normed_fake(like: Tensor, a):  # (mix or EMPTY, normed)
    normed = torch.empty_like(like)
    return _mix_out((torch.empty_like(like), normed), a)


# ---- autograd: what the forwards save, the backward ops' gradient arguments --------------------------


def _phase1_normed_save(a, out):
    # the block end (output 3) = end_partial + end_delta is the last source; those two are not kept
    has_end = a.end_partial is not None
    return dict(vars(a), sources=[*a.sources, out[3]] if has_end else a.sources, lse=out[2], end_partial=None,
                end_delta=None, has_end=has_end, delta_dtype=a.end_delta.dtype if has_end else None)


def _phase1_normed_grad_args(s, grad_normed0, grad_outs, grad_lse, grad_end):
    zeros = torch.zeros_like(s.sources[0])
    return dict(grad_normed0=zeros if grad_normed0 is None else grad_normed0.contiguous(),
                grad_outs=[zeros if g is None else g for g in grad_outs], grad_lse=_dense(grad_lse, s.lse),
                # the block end's gradient from its later readers is summed into its source gradient in the kernel
                accumulate=[None] * (len(s.sources) - 1) + [grad_end if s.has_end else None])


def _phase1_normed_input_grads(s, grads):  # block end = end_partial + end_delta: both get its whole gradient
    if s.has_end:
        d_end = grads["sources"].pop()
        grads["end_partial"], grads["end_delta"] = d_end, d_end.to(s.delta_dtype)


def _normed_grad_args(s, grad_mix, grad_normed, zeros_like: Tensor, n_accumulate: int):
    """The two normed ops: without return_mix the mix was not returned, and its backward gets no gradient."""
    return dict(grad_mix=_contiguous(grad_mix) if s.return_mix else None, grad_normed=_dense(grad_normed, zeros_like),
                accumulate=[None] * n_accumulate)


# ---- the table ---------------------------------------------------------------------------------------------
# Shapes: sources m x [..., D]; query / weights [D]; queries / their weights [S, D]; phase1_out, partial [..., D];
# phase1_lse [...]. Outputs in the sources' (phase1_out's) dtype.

OPS = [
    Op(  # out [..., D] = scale * sum_i softmax_i(query . RMSNorm(sources[i]) * norm_weight) sources[i]
        "attn_res(Tensor[] sources, Tensor query, Tensor? norm_weight, float eps, float scale) -> Tensor",
        cpu=R.attn_res_reference,
        cuda=_dispatch("forward_cuda"),
        composite=R.attn_res_composite,  # the op converted models hold: exported, they decompose into torch ops
        fake=lambda a: torch.empty_like(_source(a)),
        grad_args=lambda s, grad_out: dict(grad_out=grad_out.contiguous()),
        backward=Op(
            "attn_res_backward(Tensor grad_out, Tensor[] sources, Tensor query, Tensor? norm_weight, float eps, "
            "float scale) -> Tensor[]",
            cpu=R.attn_res_backward_reference,
            cuda=_dispatch("backward_cuda"),
        ),
    ),
    Op(  # two-phase schedule, phase 1: every query over the completed blocks -> (outs: S x [..., D], lse [S, ...]).
        # One tensor per query, not one [S, ..., D]: each merge's gradient reaches the backward as it is.
        "attn_res_phase1(Tensor[] sources, Tensor queries, Tensor? norm_weights, float eps) -> (Tensor[], Tensor)",
        cpu=R.attn_res_phase1_reference,
        cuda=_dispatch("phase1_cuda"),
        fake=_phase1_fake,
        save=lambda a, out: dict(vars(a), lse=out[1]),  # the backward kernel takes the softmax from the lse
        grad_args=lambda s, grad_outs, grad_lse: dict(
            grad_outs=[torch.zeros_like(s.sources[0]) if g is None else g for g in grad_outs],
            grad_lse=_dense(grad_lse, s.lse), accumulate=[None] * len(s.sources)),
        backward=Op(
            "attn_res_phase1_backward(Tensor[] grad_outs, Tensor grad_lse, Tensor[] sources, Tensor queries, "
            "Tensor? norm_weights, float eps, Tensor lse, Tensor?[] accumulate) -> Tensor[]",
            cpu=_accumulating(RG.attn_res_phase1_backward_reference, 6),
            cuda=_dispatch("phase1_backward_cuda"),
        ),
    ),
    Op(  # phase 1 with query 0's merge fused in (it reads no partial block) -> (normed_0 = RMSNorm(scale * out_0) *
        # out_norm_weight, outs_1..S-1, lse, block end). With end_partial / end_delta the previous block's last add
        # is done here: block end = end_partial + end_delta (rounded as torch's add) is the last source.
        "attn_res_phase1_normed(Tensor[] sources, Tensor queries, Tensor? norm_weights, float eps, float scale, "
        "Tensor? out_norm_weight, float out_eps, Tensor? end_partial=None, Tensor? end_delta=None) "
        "-> (Tensor, Tensor[], Tensor, Tensor)",
        cpu=_phase1_normed_cpu,
        cuda=_dispatch("phase1_normed_cuda"),
        args=_block_end_args,
        out=lambda r, a: (*r[:3], r[3] if r[3] is not None else _empty(a.queries)),
        fake=_phase1_normed_fake,
        save=_phase1_normed_save,
        grad_args=_phase1_normed_grad_args,
        input_grads=_phase1_normed_input_grads,
        backward=Op(
            "attn_res_phase1_normed_backward(Tensor grad_normed0, Tensor[] grad_outs, Tensor grad_lse, "
            "Tensor[] sources, Tensor queries, Tensor? norm_weights, float eps, float scale, "
            "Tensor? out_norm_weight, float out_eps, Tensor lse, Tensor?[] accumulate) -> Tensor[]",
            cpu=_accumulating(RG.attn_res_phase1_normed_backward_reference, 10),
            cuda=_dispatch("phase1_normed_backward_cuda"),
        ),
    ),
    Op(  # phase 2: a sublayer's phase-1 result merged with the partial block (None: the block's first sublayer)
        "attn_res_phase2(Tensor phase1_out, Tensor phase1_lse, Tensor? partial, Tensor query, Tensor? norm_weight, "
        "float eps, float scale) -> Tensor",
        cpu=R.attn_res_phase2_reference,
        cuda=_dispatch("phase2_cuda"),
        fake=lambda a: torch.empty_like(a.phase1_out),
        grad_args=lambda s, grad_out: dict(grad_out=grad_out.contiguous()),
        backward=Op(
            "attn_res_phase2_backward(Tensor grad_out, Tensor phase1_out, Tensor phase1_lse, Tensor? partial, "
            "Tensor query, Tensor? norm_weight, float eps, float scale) -> Tensor[]",
            cpu=RG.attn_res_phase2_backward_reference,
            cuda=_dispatch("phase2_backward_cuda"),
        ),
    ),
    Op(  # attn_res + the sublayer's own RMSNorm -> (mix, RMSNorm(mix) * out_norm_weight). A converted model reads
        # only the normed form: the backend passes return_mix=False, and the mix is neither stored nor differentiated.
        "attn_res_normed(Tensor[] sources, Tensor query, Tensor? norm_weight, float eps, float scale, "
        "Tensor? out_norm_weight, float out_eps, *, bool return_mix=True) -> (Tensor, Tensor)",
        cpu=_with_mix(R.attn_res_normed_reference),
        cuda=_dispatch("normed_cuda"),
        out=_mix_out,
        fake=lambda a: _normed_fake(_source(a), a),
        grad_args=lambda s, grad_mix, grad_normed: _normed_grad_args(
            s, grad_mix, grad_normed, zeros_like=s.sources[0], n_accumulate=len(s.sources)),
        backward=Op(
            "attn_res_normed_backward(Tensor? grad_mix, Tensor grad_normed, Tensor[] sources, Tensor query, "
            "Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps, "
            "Tensor?[] accumulate) -> Tensor[]",
            cpu=_accumulating(RG.attn_res_normed_backward_reference, 9),
            cuda=_dispatch("normed_backward_cuda"),
        ),
    ),
    Op(  # phase 2 + the sublayer's RMSNorm (the backend's merge at most Block AttnRes sites): as attn_res_normed
        "attn_res_phase2_normed(Tensor phase1_out, Tensor phase1_lse, Tensor? partial, Tensor query, "
        "Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps, *, "
        "bool return_mix=True) -> (Tensor, Tensor)",
        cpu=_with_mix(R.attn_res_phase2_normed_reference),
        cuda=_dispatch("phase2_normed_cuda"),
        out=_mix_out,
        fake=lambda a: _normed_fake(a.phase1_out, a),
        grad_args=lambda s, grad_mix, grad_normed: _normed_grad_args(
            s, grad_mix, grad_normed, zeros_like=s.phase1_out, n_accumulate=1),
        backward=Op(  # accumulate: [the partial's gradient from its other readers, or None]
            "attn_res_phase2_normed_backward(Tensor? grad_mix, Tensor grad_normed, Tensor phase1_out, "
            "Tensor phase1_lse, Tensor? partial, Tensor query, Tensor? norm_weight, float eps, float scale, "
            "Tensor? out_norm_weight, float out_eps, Tensor?[] accumulate) -> Tensor[]",
            cpu=_phase2_normed_backward_cpu,
            cuda=_dispatch("phase2_normed_backward_cuda"),
            args=_grad_partial_args,
        ),
    ),
    Op(  # the partial block's update + phase 2 + RMSNorm -> (new partial = partial + delta, RMSNorm(phase 2 with
        # the new partial) * out_norm_weight); the mix is not written. delta's dtype may promote to the partial's.
        "attn_res_phase2_add_normed(Tensor phase1_out, Tensor phase1_lse, Tensor partial, Tensor delta, Tensor query, "
        "Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps) -> (Tensor, Tensor)",
        cpu=R.attn_res_phase2_add_normed_reference,
        cuda=_dispatch("phase2_add_normed_cuda"),
        fake=lambda a: (torch.empty_like(a.partial), torch.empty_like(a.phase1_out)),
        # the backward reads the NEW partial (output 0), not partial and delta; delta's dtype for its gradient
        save=lambda a, out: dict(vars(a), partial=out[0], delta=None, delta_dtype=a.delta.dtype),
        grad_args=lambda s, grad_partial, grad_normed: dict(
            grad_partial=_contiguous(grad_partial), grad_normed=_dense(grad_normed, s.phase1_out)),
        input_grads=lambda s, grads: grads.update(delta=grads["partial"].to(s.delta_dtype)),
        backward=Op(  # partial: the NEW one; grad_partial: its gradient from its other readers (None: none). The
            # partial's gradient returned is that of the old partial and of delta.
            "attn_res_phase2_add_normed_backward(Tensor? grad_partial, Tensor grad_normed, Tensor phase1_out, "
            "Tensor phase1_lse, Tensor partial, Tensor query, Tensor? norm_weight, float eps, float scale, "
            "Tensor? out_norm_weight, float out_eps) -> Tensor[]",
            cpu=RG.attn_res_phase2_add_normed_backward_reference,
            cuda=_dispatch("phase2_add_normed_backward_cuda"),
        ),
    ),
]


# ---- registration ------------------------------------------------------------------------------------------


_COMPOSITE = torch.library.Library(LIB, "IMPL")  # kept alive: it holds the CompositeImplicitAutograd kernels


class _Registered:
    """One op of the table, registered: its argument names, and the functions torch.library calls."""

    def __init__(self, op: Op, is_backward: bool = False):
        self.op, self.is_backward = op, is_backward
        self.name, arguments = op.schema.split("(", 1)
        schema = torch._C.parse_schema(f"{LIB}::{op.schema}")
        self.positional = [a.name for a in schema.arguments if not a.kwarg_only]
        self.defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        # a backward op's outputs: the gradients of these arguments (module docstring)
        self.grads_of = [a.name for a in schema.arguments if "Tensor" in str(a.type)
                         and not a.name.startswith("grad_") and a.name not in ("lse", "accumulate")]
        self.backward = _Registered(op.backward, is_backward=True) if op.backward is not None else None
        custom = torch.library.custom_op(f"{LIB}::{self.name}", self.kernel(op.cpu), mutates_args=(),
                                         schema="(" + arguments)
        custom.register_kernel("cuda", self.kernel(op.cuda))
        custom.register_fake(lambda *args, **kwargs: self.fake(self.named(args, kwargs)))
        if self.backward is not None:
            custom.register_autograd(self.autograd_backward, setup_context=self.setup_context)
        if op.composite is not None:  # eager and autograd keep the kernels above (direct registrations win)
            _COMPOSITE.impl(self.name, op.composite, "CompositeImplicitAutograd")

    def named(self, args, kwargs) -> SimpleNamespace:
        """The op's arguments by name, defaults filled in."""
        named = {**dict(zip(self.positional, args)), **kwargs}
        return SimpleNamespace(**named, **{k: v for k, v in self.defaults.items() if k not in named})

    def kernel(self, impl: Callable) -> Callable:
        """The op's kernel on ``impl`` (cpu or cuda): ``args`` before it, ``out`` after."""
        op, out = self.op, self.grads_out if self.is_backward else self.op.out
        if op.args is None and out is None:
            return impl

        def run(*args, **kwargs):
            a = self.named(args, kwargs)
            if op.args is not None:
                args, kwargs = op.args(a, [getattr(a, n) for n in self.positional]), {}
            result = impl(*args, **kwargs)
            return out(result, a) if out is not None else result

        return run

    def grads_out(self, result, a) -> list[Tensor]:
        """A backward implementation's (gradients, lists of them, Nones) -> the op's flat list."""
        flat = [g for r in result for g in (r if isinstance(r, (list, tuple)) else [r])]
        return [g if g is not None else _empty(_query(a)) for g in flat]

    def fake(self, a):
        # a mix with meta tensors dispatches here (a query accelerate offloaded): refused, not an empty output
        devices = {str(t.device) for v in vars(a).values() for t in _as_list(v) if isinstance(t, Tensor)}
        if len(devices) > 1:
            raise RuntimeError(f"{LIB}::{self.name} got tensors on different devices ({', '.join(sorted(devices))}): "
                               "the AttnRes parameters must be where the stream is (accelerate's offload of a converted "
                               "model leaves them on meta: convert and run without offloading)")
        if not self.is_backward:
            return self.op.fake(a)
        inputs = [t for n in self.grads_of for t in _as_list(getattr(a, n))]
        return [torch.empty_like(t) if t is not None else _empty(_query(a)) for t in inputs]

    def setup_context(self, ctx, inputs, output, keyword_only_inputs=None):
        """Keeps ``save``'s values: tensors (lists of them too) by save_for_backward, the rest on ctx."""
        saved = self.op.save(self.named(inputs, keyword_only_inputs or {}), output)
        lists = {k: len(v) for k, v in saved.items() if isinstance(v, list)}
        values = {k: v for k, v in saved.items() if not isinstance(v, (Tensor, list))}
        names = [k for k in saved if k not in values]
        ctx.attn_res_saved = names, lists, values
        ctx.save_for_backward(*(t for k in names for t in _as_list(saved[k])))

    def autograd_backward(self, ctx, *grads):
        names, lists, values = ctx.attn_res_saved
        tensors, s = iter(ctx.saved_tensors), SimpleNamespace(**values)
        for k in names:
            setattr(s, k, [next(tensors) for _ in range(lists[k])] if k in lists else next(tensors))
        if torch.is_grad_enabled() and self.op.composite is not None:  # create_graph=True: double backward
            input_grads = self.composite_grads(s, grads)
        else:
            input_grads = self.kernel_grads(s, grads)
        # one per positional input as called (an argument left at its default is not passed)
        return tuple(input_grads.get(n) for n in self.positional)[: len(ctx.needs_input_grad)]

    def kernel_grads(self, s, grads) -> dict:
        """{forward input: gradient} from the backward op."""
        given, bw = self.op.grad_args(s, *grads), self.backward
        flat = iter(getattr(torch.ops.residual_rewriter, bw.name)(
            *[given[n] if n in given else getattr(s, n) for n in bw.positional]))
        input_grads = {}  # the backward op's outputs, by the forward input they belong to
        for n in bw.grads_of:
            value = getattr(s, n)
            got = [next(flat) for _ in value] if isinstance(value, list) else next(flat)
            input_grads[n] = got if value is not None else None
        if self.op.input_grads is not None:
            self.op.input_grads(s, input_grads)
        return input_grads

    def composite_grads(self, s, grads) -> dict:
        """{forward input: gradient} as autograd of the op's composite (torch ops) on the saved inputs:
        slower than the backward op, but differentiable again (gradient penalties, second-order MAML)."""
        def alias(t: Tensor) -> Tensor:  # a node of its own: the gradient stops there, not at an input reaching another
            return t.view_as(t) if t.requires_grad else t

        with torch.enable_grad():
            args = tree_map_only(Tensor, alias, vars(s))
            leaves, spec = tree_flatten({n: args[n] for n in self.grads_of})
            wrt = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
            out = self.op.composite(*[args[n] for n in self.positional])
            found = iter(torch.autograd.grad(out, wrt, grads, create_graph=True, allow_unused=True))
        return tree_unflatten([next(found) if isinstance(t, Tensor) and t.requires_grad else None for t in leaves], spec)


REGISTERED = {r.name: r for r in map(_Registered, OPS)}
