"""One training run: build the GPT, convert it (or not), train it on the stdlib text, evaluate it.

The variants differ ONLY by the conversion: the model is built with ``torch.manual_seed(seed)`` and
then converted in place (``convert_``), so every variant of a seed starts from the same weights for
the shared parameters (checked: ``init_checksum``), and reads the same batches in the same order
(``TrainBatches(seed)``). The new AttnRes parameters (pseudo-queries at zero, key-norm gains at one)
get an optimizer group of their own: learning rate ``query_lr``, no weight decay.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import residual_rewriter as rr
from residual_rewriter.models import GPT, GPTConfig

from .data import TrainBatches

VARIANTS = ("standard", "block", "full")
LABELS = {"standard": "standard residuals", "block": "Block AttnRes", "full": "Full AttnRes"}


@dataclass
class ModelCfg:
    layers: int = 6  # transformer layers; each has 2 residual sublayers (attention, MLP)
    width: int = 64
    heads: int = 4
    seq: int = 64
    blocks: int = 8  # num_blocks of the Block AttnRes variant

    @property
    def sublayers(self) -> int:
        return 2 * self.layers


@dataclass
class OptCfg:
    lr: float = 3e-3
    query_lr: Optional[float] = None  # None: the same as lr
    weight_decay: float = 0.1
    warmup: int = 50
    min_lr_frac: float = 0.1  # cosine decay to this fraction of the peak lr
    clip: float = 1.0
    batch: int = 16

    def qlr(self) -> float:
        return self.lr if self.query_lr is None else self.query_lr


def build(variant: str, mcfg: ModelCfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, block_size=mcfg.seq, n_layer=mcfg.layers, n_head=mcfg.heads,
                          n_embd=mcfg.width, dropout=0.0))
    return convert(model, variant, mcfg)


def convert(model: torch.nn.Module, variant: str, mcfg: ModelCfg) -> torch.nn.Module:
    if variant == "standard":
        return model
    options = {"block": dict(num_blocks=mcfg.blocks), "full": dict(block_size=1)}[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rr.convert_(model, **options)  # in place; checks the converted model against the original


def is_attn_res(name: str) -> bool:
    return ".attn_res." in f".{name}"


def init_checksum(model: torch.nn.Module) -> float:
    """A fingerprint of the shared (non-AttnRes) parameters: equal across the variants of one seed."""
    with torch.no_grad():
        shared = sorted(((n, p) for n, p in model.named_parameters() if not is_attn_res(n)), key=lambda t: t[0])
        return float(sum((p.double() * (1 + i % 7)).sum() for i, (_, p) in enumerate(shared)))


def make_optimizer(model: torch.nn.Module, ocfg: OptCfg) -> torch.optim.Optimizer:
    decay, no_decay, attn = [], [], []
    for name, p in model.named_parameters():
        (attn if is_attn_res(name) else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay, "base_lr": ocfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": ocfg.lr}]
    if attn:
        groups.append(attn_res_group(attn, ocfg))
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=(0.9, 0.95))


def attn_res_group(params, ocfg: OptCfg) -> dict:
    return {"params": list(params), "weight_decay": 0.0, "base_lr": ocfg.qlr(), "lr": ocfg.qlr()}


def lr_factor(step: int, total: int, ocfg: OptCfg) -> float:
    """Linear warmup, then cosine decay to min_lr_frac at ``total`` (step counts from 0)."""
    if step < ocfg.warmup:
        return (step + 1) / ocfg.warmup
    t = min(1.0, (step - ocfg.warmup) / max(1, total - ocfg.warmup))
    return ocfg.min_lr_frac + (1 - ocfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list) -> float:
    model.eval()
    total = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches)
    model.train()
    return total / len(batches)


@dataclass
class RunLog:
    variant: str
    seed: int
    train_loss: list = field(default_factory=list)  # one per step
    val: list = field(default_factory=list)  # [step, loss] at each evaluation
    train_seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_loss"] = [round(v, 5) for v in self.train_loss]
        d["val"] = [[s, round(v, 5)] for s, v in self.val]
        d["tokens_per_s"] = round(self.tokens / max(self.train_seconds, 1e-9), 1)
        return d


def train(model, opt, batches: TrainBatches, *, start: int, stop: int, total: int, ocfg: OptCfg,
          val_curve: list, eval_every: int, log: RunLog, tick: Callable[[float], None] = lambda loss: None):
    """Steps start..stop-1 of a schedule ``total`` steps long; evaluates on ``val_curve`` every
    ``eval_every`` steps and after the last one (step numbers count completed steps)."""
    model.train()
    for step in range(start, stop):
        x, y = batches.next()
        f = lr_factor(step, total, ocfg)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.clip)
        opt.step()
        log.train_seconds += time.perf_counter() - t0
        log.tokens += x.numel()
        log.train_loss.append(loss.item())
        tick(log.train_loss[-1])
        done = step + 1
        if done % eval_every == 0 and done != stop:
            log.val.append([done, evaluate(model, val_curve)])
    log.val.append([stop, evaluate(model, val_curve)])


def snapshot(model, opt, batches: TrainBatches):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), batches.state()
