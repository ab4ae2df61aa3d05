"""Small random models in the styles people write pre-norm residual networks in, for the property-based
suite (``test_generated_architectures.py``). A ``Spec`` says what one model looks like; ``build`` makes
it. ``specs()`` draws specs with hypothesis.

``Spec.must_convert``: a pre-norm model with one residual stream, which any converter of arbitrary
models has to take. The other specs (``refuse`` set) are models that are not ``x + f(norm(x))`` with
one stream: each must either convert exactly or be refused with a ``ConversionError``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("layernorm", "layernorm_nobias", "rmsnorm", "custom_rms", "functional_ln", "inline_rms")
EXTRAS = ("none", "dropout", "scale", "layerscale", "post_norm")
CONTAINERS = ("modulelist", "sequential", "moduledict")
READERS = ("norm", "last_token_norm", "mean_norm", "gather_norm", "mean", "conv_neck")
INT_ARGS = ("none", "child", "layer")
# models that are not one pre-norm stream
REFUSE = ("none", "post_norm_block", "probe", "called_twice", "parallel")


@dataclass(frozen=True)
class Spec:
    depth: int = 2
    width: int = 12
    sublayers: tuple[str, ...] = ("mix", "mlp")  # per layer, in order
    norm: str = "layernorm"
    add_order: str = "x+f"  # or "f+x"
    extra: str = "none"
    embed_scale: bool = False
    returns_tuple: bool = False
    by_keyword: bool = False
    container: str = "modulelist"
    tap: bool = False  # identity modules on the stream, before and between the adds
    norm_inside: bool = False  # the norm is the first module of the sublayer: x = x + self.mlp(x)
    residual_in_child: bool = False  # the sublayer adds the residual itself: x = self.mlp(norm(x), x) (BLOOM)
    token_view: bool = False  # the stream viewed as [B*T, 1, D] after the first sublayer, back at the end (Swin)
    plain_last: bool = False  # a layer's last sublayer (of two or more) reads the stream itself: x + f(x) (Gemma 4's PLE)
    layer_scale: str = "none"  # each layer returns its stream times a scale: "buffer" (in place: Gemma 4) or "constant"
    skip_gain: str = "none"  # the add reads the stream times a gain, ``w * x + f``: "param" (per channel: Doge) or "constant"
    reader: str = "norm"
    int_arg: str = "none"  # the layers get an int window (from the sequence length) for Mix: "child" hands it on, "layer" computes with it
    refuse: str = "none"

    @property
    def must_convert(self) -> bool:
        return self.refuse == "none"

    def __str__(self) -> str:
        changed = {k: v for k, v in self.__dict__.items() if v != Spec.__dataclass_fields__[k].default}
        return "Spec(" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")"


class CustomRMSNorm(nn.Module):
    """The hand-written RMSNorm of countless repositories."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FunctionalLayerNorm(nn.Module):
    """Parameters in a module, the norm written with ``F.layer_norm`` in its forward."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "layernorm":
        norm = nn.LayerNorm(d)
    elif kind == "layernorm_nobias":
        norm = nn.LayerNorm(d, bias=False)
    elif kind == "rmsnorm":
        norm = nn.RMSNorm(d, eps=1e-6)
    elif kind == "custom_rms":
        return CustomRMSNorm(d)
    elif kind == "functional_ln":
        return FunctionalLayerNorm(d)
    else:
        raise KeyError(kind)
    with torch.no_grad():  # not the identity: a gain that is wrongly applied shows
        norm.weight.add_(0.1 * torch.randn(d))
    return norm


class Mix(nn.Module):
    """Token mixing (a causal running mean, then a projection): the attention's role."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x, window=None):  # [B, T, D]; window: an int, the positions weighted twice
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device).view(1, -1, 1)
        mixed = torch.cumsum(x, dim=1) / steps
        return self.proj(mixed if window is None else torch.where(steps <= window, 2 * mixed, mixed))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class AddsTheResidual(nn.Module):
    """A sublayer that takes the residual and adds it itself (BLOOM's ``dropout_add(out, residual)``); with a
    ``gain``, scaled first (Ergo's ``ResidualGate``: traced into, a gain on the skip)."""

    def __init__(self, inner: nn.Module, gain: str = "none", d: int = 0):
        super().__init__()
        self.inner, self.gain = inner, gain
        if gain == "param":
            self.weight = nn.Parameter(0.5 + torch.rand(d))

    def forward(self, h, residual):
        if self.gain != "none":
            residual = residual * self.weight if self.gain == "param" else 0.9 * residual
        return residual + self.inner(h)


class Layer(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        d = spec.width
        self.spec = spec
        self.branches = nn.ModuleDict({name: (Mix(d) if name == "mix" else MLP(d)) for name in spec.sublayers})
        if spec.norm_inside:  # the norm is the sublayer's first module
            self.branches = nn.ModuleDict({name: nn.Sequential(make_norm(spec.norm, d), branch)
                                           for name, branch in self.branches.items()})
        elif spec.norm != "inline_rms":
            self.norms = nn.ModuleDict({name: make_norm(spec.norm, d) for name in spec.sublayers})
        else:
            self.gains = nn.ParameterDict({name: nn.Parameter(1 + 0.1 * torch.randn(d)) for name in spec.sublayers})
        if spec.extra == "dropout":
            self.drop = nn.Dropout(0.1)
        elif spec.extra == "layerscale":
            self.gammas = nn.ParameterDict({name: nn.Parameter(0.5 + torch.rand(d)) for name in spec.sublayers})
        elif spec.extra == "post_norm":
            self.post_norms = nn.ModuleDict({name: make_norm("rmsnorm", d) for name in spec.sublayers})
        if spec.refuse == "parallel":
            self.other_norm = make_norm(spec.norm if spec.norm != "inline_rms" else "rmsnorm", d)
            self.other = MLP(d)
        if spec.tap:
            self.tap_in, self.tap_mid = nn.Identity(), nn.Identity()
        if spec.layer_scale == "buffer":
            self.register_buffer("layer_scalar", 0.5 + torch.rand(1))
        if spec.skip_gain == "param":
            self.skip_gains = nn.ParameterDict({name: nn.Parameter(0.5 + torch.rand(d)) for name in spec.sublayers})
        if spec.residual_in_child:  # the same branch modules, wrapped
            self.residual_branches = nn.ModuleDict({name: AddsTheResidual(b, spec.skip_gain, d) for name, b in self.branches.items()})

    def _norm(self, name: str, x, i: int = 0):
        if self.spec.norm_inside or (self.spec.plain_last and i == len(self.spec.sublayers) - 1 > 0):
            return x
        if self.spec.norm == "inline_rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gains[name]
        return self.norms[name](x)

    def _branch(self, name: str, h, window=None):
        takes_window = window is not None and name == "mix" and not self.spec.norm_inside
        f = self.branches[name](h, window) if takes_window else self.branches[name](h)
        extra = self.spec.extra
        if extra == "dropout":
            f = self.drop(f)
        elif extra == "scale":
            f = f * 0.5
        elif extra == "layerscale":
            f = self.gammas[name] * f
        elif extra == "post_norm":
            f = self.post_norms[name](f)
        return f

    def forward(self, x=None, window=None, hidden=None):
        x = hidden if x is None else x  # the stream by position or by keyword
        spec = self.spec
        if window is not None and spec.int_arg == "layer":
            window = window - 1
        shape = x.shape
        if spec.tap:
            x = self.tap_in(x)
        for i, name in enumerate(spec.sublayers):
            if spec.refuse == "post_norm_block":
                x = self._norm(name, x + self._branch(name, x))
                continue
            if spec.residual_in_child and spec.refuse == "none" and spec.extra == "none":
                x = self.residual_branches[name](self._norm(name, x, i), x)
                if spec.tap and i == 0:
                    x = self.tap_mid(x)
                if spec.token_view and i == 0:
                    x = x.reshape(-1, 1, x.shape[-1])
                continue
            f = self._branch(name, self._norm(name, x, i), window)
            if spec.refuse == "parallel" and i == 0:
                f = f + self.other(self.other_norm(x))  # a second branch reading the same x
            if spec.skip_gain != "none":
                x = x * self.skip_gains[name] if spec.skip_gain == "param" else 0.9 * x
            x = x + f if spec.add_order == "x+f" else f + x
            if spec.tap and i == 0:
                x = self.tap_mid(x)
            if spec.token_view and i == 0:
                x = x.reshape(-1, 1, x.shape[-1])
        x = x.reshape(shape) if spec.token_view else x
        if spec.layer_scale == "buffer":
            x *= self.layer_scalar
        elif spec.layer_scale == "constant":
            x = x * 0.75
        return (x, None) if spec.returns_tuple else x


class GeneratedLM(nn.Module):
    def __init__(self, spec: Spec, vocab: int = 32):
        super().__init__()
        self.spec = spec
        d = spec.width
        self.embed = nn.Embedding(vocab, d)
        layers = [Layer(spec) for _ in range(spec.depth)]
        if spec.container == "modulelist":
            self.layers = nn.ModuleList(layers)
        elif spec.container == "sequential":
            self.layers = nn.Sequential(*layers)
        else:
            self.layers = nn.ModuleDict({f"block{i}": layer for i, layer in enumerate(layers)})
        self.final_norm = make_norm(spec.norm if spec.norm != "inline_rms" else "rmsnorm", d)
        if spec.reader == "conv_neck":
            self.neck = nn.Conv1d(d, d, kernel_size=3, padding=1)
        self.head = nn.Linear(d, vocab, bias=False)

    def _layers(self):
        return self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers

    def forward(self, ids):
        spec = self.spec
        h = self.embed(ids)
        if spec.embed_scale:
            h = h * math.sqrt(spec.width)
        probe = None
        if spec.container == "sequential" and not (spec.returns_tuple or spec.by_keyword or spec.refuse == "called_twice"):
            h = self.layers(h)
        else:
            window = {"window": ids.shape[1] - 2} if spec.int_arg != "none" else {}  # another length: another int
            for i, layer in enumerate(self._layers()):
                out = layer(hidden=h, **window) if spec.by_keyword else layer(h, **window)
                h = out[0] if spec.returns_tuple else out
                if spec.refuse == "called_twice" and i == 0:
                    out = layer(h)
                    h = out[0] if spec.returns_tuple else out
                if spec.refuse == "probe" and i == 0:
                    probe = h.mean()  # something reads the stream mid-way
        if spec.reader == "last_token_norm":
            h = h[:, -1:]
        elif spec.reader == "mean_norm":
            h = h.mean(dim=1, keepdim=True)
        elif spec.reader == "gather_norm":  # one token per sequence, by index
            h = h[torch.arange(h.shape[0]), ids.argmax(dim=1)].unsqueeze(1)
        if spec.reader == "mean":  # no final norm
            logits = self.head(h.mean(dim=1))
        elif spec.reader == "conv_neck":
            logits = self.head(self.neck(h.transpose(1, 2)).transpose(1, 2))
        else:
            logits = self.head(self.final_norm(h))
        return logits if probe is None else logits + probe


def build(spec: Spec, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(model in float64 eval mode, example token ids with a ragged, non-power-of-2 length)."""
    torch.manual_seed(seed)
    model = GeneratedLM(spec).double().eval()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(seed + 1))
    return model, ids


def specs():
    """A hypothesis strategy over ``Spec``."""
    from hypothesis import strategies as st

    @st.composite
    def draw(draw_):
        container = draw_(st.sampled_from(CONTAINERS))
        sequential = container == "sequential"
        norm = draw_(st.sampled_from(NORMS))
        return Spec(
            depth=draw_(st.integers(1, 4)),
            width=draw_(st.sampled_from([8, 12, 20])),
            sublayers=draw_(st.sampled_from([("mix", "mlp"), ("mlp",), ("mix",), ("mix", "mlp", "mlp")])),
            norm=norm,
            add_order=draw_(st.sampled_from(["x+f", "f+x"])),
            extra=draw_(st.sampled_from(EXTRAS)),
            embed_scale=draw_(st.booleans()),
            returns_tuple=False if sequential else draw_(st.booleans()),
            by_keyword=False if sequential else draw_(st.booleans()),
            container=container,
            tap=draw_(st.booleans()),
            norm_inside=False if norm == "inline_rms" else draw_(st.booleans()),
            residual_in_child=draw_(st.booleans()),
            token_view=draw_(st.booleans()),
            layer_scale=draw_(st.sampled_from(["none", "buffer", "constant"])),
            plain_last=draw_(st.booleans()),
            skip_gain=draw_(st.sampled_from(["none", "param", "constant"])),
            reader=draw_(st.sampled_from(READERS)),
            int_arg=draw_(st.sampled_from(INT_ARGS)),
            refuse=draw_(st.sampled_from(REFUSE)) if draw_(st.integers(0, 3)) == 0 else "none",
        )

    return draw()
