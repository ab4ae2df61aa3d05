"""Hand-written pre-norm models exercising every way of writing a norm, and models that must be refused."""
from __future__ import annotations

import collections

import torch
import torch.nn as nn
import torch.nn.functional as F


class MyRMSNorm(nn.Module):
    """A model's own RMSNorm class (recognised by name and by the probe)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Normalizer(nn.Module):
    """A norm whose class name says nothing: traced into, recognised by meaning only."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        return xc / torch.sqrt((xc * xc).mean(-1, keepdim=True) + 1e-5) * self.gain


NORM_KINDS = ["layernorm", "rmsnorm", "own_rmsnorm", "unnamed", "f_layer_norm", "f_rms_norm", "inlined"]


class ToyBlock(nn.Module):
    def __init__(self, d, norm_kind, swap_operands=False, extras=False):
        super().__init__()
        self.d, self.kind, self.swap, self.extras = d, norm_kind, swap_operands, extras
        if norm_kind == "layernorm":
            self.norm = nn.LayerNorm(d)
        elif norm_kind == "rmsnorm":
            self.norm = nn.RMSNorm(d, eps=1e-6)
        elif norm_kind == "own_rmsnorm":
            self.norm = MyRMSNorm(d)
        elif norm_kind == "unnamed":
            self.norm = Normalizer(d)
        else:
            self.w = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
            self.b = nn.Parameter(0.1 * torch.randn(d))
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.1)
        if extras:
            self.inner_norm = nn.LayerNorm(2 * d)

    def normalize(self, x):
        if self.kind == "f_layer_norm":
            return F.layer_norm(x, (self.d,), self.w, self.b)
        if self.kind == "f_rms_norm":
            return F.rms_norm(x, (self.d,), self.w, eps=1e-6)
        if self.kind == "inlined":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return self.norm(x)

    def branch(self, x):
        h = self.fc1(self.normalize(x))
        if self.extras:  # a second norm, a constant scale and dropout all belong to the sublayer
            h = self.inner_norm(h) * 0.5
        return self.drop(self.fc2(F.gelu(h)))

    def forward(self, x):
        return self.branch(x) + x if self.swap else x + self.branch(x)


class ToyLM(nn.Module):
    def __init__(self, norm_kind="layernorm", n_layers=4, d=40, vocab=64, swap_operands=False, extras=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([ToyBlock(d, norm_kind, swap_operands, extras) for _ in range(n_layers)])
        self.norm_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.vocab = vocab

    def forward(self, idx):
        x = self.emb(idx)  # (B, T, D)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm_f(x))

    def example_inputs(self):
        return (torch.randint(0, self.vocab, (2, 9), generator=torch.Generator().manual_seed(0)),)


class PostNormLM(ToyLM):
    """norm(x + f(x)): must be refused."""

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk.norm(x + blk.fc2(F.gelu(blk.fc1(x))))
        return self.head(x)


class ParallelLM(ToyLM):
    """x + f(n1(x)) + g(n2(x)) (GPT-J style parallel branches): regrouped into x + (f + g), one site, two norms."""

    def __init__(self):
        super().__init__("layernorm", n_layers=2)
        self.n2 = nn.ModuleList([nn.LayerNorm(40) for _ in self.blocks])

    def forward(self, idx):
        x = self.emb(idx)
        for blk, n2 in zip(self.blocks, self.n2):
            x = x + blk.fc2(F.gelu(blk.fc1(blk.norm(x)))) + blk.fc2(F.gelu(blk.fc1(n2(x))))
        return self.head(self.norm_f(x))


class ReadsMidStreamLM(ToyLM):
    """Computes with a hidden state taken out in the middle of the stream (a probe): refused."""

    def forward(self, idx):
        x = self.emb(idx)
        mids = []
        for blk in self.blocks:
            x = blk(x)
            mids.append(x)
        return self.head(self.norm_f(x)), mids[1].mean(-1)


class PlainMLP(nn.Module):
    """No residual at all."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.net(x)


class ModeBlock(nn.Module):
    """Reads self.training in a traced-through forward: F.dropout(training=...) and a mode-dependent p."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        p = 0.5 if self.training else 0.0
        return x + F.dropout(self.fc(self.norm(x)), p=p, training=self.training)


class ModeLM(ToyLM):
    def __init__(self):
        super().__init__("layernorm", n_layers=3)
        self.blocks = nn.ModuleList([ModeBlock(40) for _ in range(3)])


class ParallelSharedInputLM(ToyLM):
    """GPT-NeoX style parallel block: x + (mlp(n2(x)) + attn(n1(x))): one sublayer read through two norms."""

    def __init__(self):
        super().__init__("layernorm", n_layers=3)
        self.n2 = nn.ModuleList([nn.LayerNorm(40) for _ in self.blocks])

    def forward(self, idx):
        x = self.emb(idx)
        for blk, n2 in zip(self.blocks, self.n2):
            x = (blk.fc2(F.gelu(blk.fc1(n2(x)))) + blk.fc2(F.gelu(blk.fc1(blk.norm(x))))) + x
        return self.head(self.norm_f(x))


class PostSublayerNormLM(ToyLM):
    """OLMo-2 style x + norm(f(x)): f reads the stream directly; the stream never feeds a norm."""

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.blocks:
            x = x + blk.norm(blk.fc2(F.gelu(blk.fc1(x))))
        return self.head(x)


def inline_rms(x, g):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g


class PreNormBlock(nn.Module):
    """A user's block whose class name contains 'Norm': must still be traced into."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        return x + self.ff(inline_rms(x, self.g))


class InlineFinalNormLM(nn.Module):
    """Inlined RMSNorms everywhere, the final norm included."""

    def __init__(self, d=24, n=3):
        super().__init__()
        self.blocks = nn.ModuleList([PreNormBlock(d) for _ in range(n)])
        self.g_out = nn.Parameter(torch.ones(d) + 0.1)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return inline_rms(x, self.g_out)


Carry = collections.namedtuple("Carry", "hidden length")


class CarryBlock(nn.Module):
    """Takes and returns a namedtuple that holds the stream (``carry.hidden``)."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, carry):
        x = carry.hidden + self.attn(self.norm1(carry.hidden))
        x = x + self.mlp(self.norm2(x))
        return Carry(x, carry.length)


class NamedTupleLM(nn.Module):
    """Layers hand a namedtuple on: observation copies the arguments it records, namedtuples included."""

    def __init__(self, d=24, n=3):
        super().__init__()
        self.blocks = nn.ModuleList([CarryBlock(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        carry = Carry(x, x.shape[1])
        for blk in self.blocks:
            carry = blk(carry)
        return self.norm(carry.hidden)


class ShortcutBlock(nn.Module):
    """LongCat-Flash's layer in miniature: two attention + MLP pairs, and a shortcut MLP that reads the first
    MLP's norm and joins the stream at the layer's last add, ``x + f(norm(x)) + shortcut``."""

    def __init__(self, d):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(4)])
        self.subs = nn.ModuleList([nn.Linear(d, d) for _ in range(4)])
        self.shortcut = nn.Linear(d, d)

    def forward(self, x):
        x = x + self.subs[0](self.norms[0](x))
        h = self.norms[1](x)
        shortcut = self.shortcut(h)
        x = x + self.subs[1](h)
        x = x + self.subs[2](self.norms[2](x))
        return x + self.subs[3](self.norms[3](x)) + shortcut


class ShortcutLM(nn.Module):
    def __init__(self, d=24, n=2):
        super().__init__()
        self.blocks = nn.ModuleList([ShortcutBlock(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
