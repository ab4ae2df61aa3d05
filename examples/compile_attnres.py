"""Compile a converted model with the ``attnres`` torch.compile backend and check it against eager.

``torch.compile(converted, backend="attnres")`` (registered by ``import residual_rewriter``) rewrites
the AttnRes aggregations before AOT autograd: it batches each block's aggregations into the paper's
two-phase schedule, fuses a following RMSNorm into the aggregation, and lowers them to Triton
kernels on CUDA or to plain torch math that inductor fuses on CPU. Everything else goes to inductor.

Each pass can be switched off, e.g. while debugging:

    torch.compile(converted, backend="attnres", options={"batch_two_phase": False})
    torch.compile(converted, backend="attnres", options={"fuse_norm": False, "lower": None})
    torch.compile(converted, backend="attnres", options={"compiler": "aot_eager"})   # no inductor

or build the backend yourself to read what each pass did afterwards:

    backend = residual_rewriter.backend.make_attnres_backend(fuse_norm=False)
    torch.compile(converted, backend=backend); ...; print(backend.last_log)

Then it times a training step (forward, backward, SGD update) four ways: the original model eager and
compiled with the same compiler (no AttnRes), the converted model eager and compiled with "attnres".

    python examples/compile_attnres.py                      # inductor: the first compile of forward +
                                                            # backward takes ~50 s on a 2-core CPU
    python examples/compile_attnres.py --compiler aot_eager # ~10 s: the passes + AOT autograd, no inductor
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F

import residual_rewriter as rr
from residual_rewriter.backend import make_attnres_backend
from residual_rewriter.models import GPT, GPTConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--blocks", type=int, default=2)
parser.add_argument("--time-steps", type=int, default=20, help="timed training steps per model (after a warm-up)")
parser.add_argument("--threads", type=int, default=1, help="torch threads for the timing")
args = parser.parse_args()
torch.set_num_threads(args.threads)

# The built-in nanoGPT-style pre-norm model, converted. Random queries so that the aggregations
# really mix (at init they are zero and every mixture is the plain residual sum).
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=args.layers))
eager = rr.convert(model, num_blocks=args.blocks)
with torch.no_grad():
    for p in rr.attn_res_parameters(eager):
        p.add_(0.5 * torch.randn_like(p))

# Two identical copies: one runs eagerly, one is compiled.
# `backend="attnres"` is all you need; the factory is used here to pick the compiler and read the logs.
compiled_model = copy.deepcopy(eager)
backend = make_attnres_backend(compiler=args.compiler)
compiled = torch.compile(compiled_model, backend=backend)

x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
y = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))


def train_step(model, fn):
    """One SGD step; returns the loss and the gradients of the new AttnRes parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(fn(x).reshape(-1, 256), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in rr.attn_res_parameters(model)]
    opt.step()
    return loss.item(), grads


t0 = time.perf_counter()
loss_c, grads_c = train_step(compiled_model, compiled)  # the first call compiles forward + backward
t_compile = time.perf_counter() - t0
loss_e, grads_e = train_step(eager, eager)

print(f"compiled with backend='attnres' (compiler={args.compiler}) in {t_compile:.1f} s")
print(f"what the passes did: {backend.last_log}")
print("  (fuse_norm does nothing here: the built-in GPT uses LayerNorm; it fuses RMSNorms, e.g. Llama's)")
print(f"loss  eager {loss_e:.6f}  compiled {loss_c:.6f}  |diff| {abs(loss_e - loss_c):.1e}")
g_err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(grads_c, grads_e))
print(f"AttnRes-parameter gradients, max relative difference: {g_err:.1e}")
with torch.no_grad():  # after the step both models' weights moved the same way
    w_err = max((a - b).abs().max().item() for a, b in zip(compiled_model.parameters(), eager.parameters()))
    out_err = (compiled(x) - eager(x)).abs().max().item()
print(f"after one step: max |weight diff| {w_err:.1e}, max |logit diff| {out_err:.1e}")
# (float32; reordered sums make compiled and eager differ at the 1e-6..1e-5 level, not exactly)

# Timing: a training step of the original and of the converted model, eager and compiled (the models
# compiled above are reused; the original is compiled once more, with the same compiler and no AttnRes
# passes). The warm-up call of each is left out of the timing.


def ms_per_step(module, fn, n):
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)

    def one():
        loss = F.cross_entropy(fn(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    one()  # warm-up (and the compile, for a compiled model)
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    return 1e3 * (time.perf_counter() - t0) / n


plain_backend = {"inductor": "inductor", "aot_eager": "aot_eager", "eager": "eager"}[args.compiler]
original = copy.deepcopy(model)
original_compiled = copy.deepcopy(model)
timings = [
    ("original, eager", ms_per_step(original, original, args.time_steps)),
    (f"original, torch.compile(backend={plain_backend!r})",
     ms_per_step(original_compiled, torch.compile(original_compiled, backend=plain_backend), args.time_steps)),
    ("converted, eager", ms_per_step(eager, eager, args.time_steps)),
    ("converted, torch.compile(backend='attnres')", ms_per_step(compiled_model, compiled, args.time_steps)),
]
print(f"\ntraining step, batch {tuple(x.shape)}, {torch.get_num_threads()} thread(s), compiler {args.compiler!r}, "
      f"mean of {args.time_steps} steps:")
base = timings[0][1]
for name, ms in timings:
    print(f"  {name:<46} {ms:8.2f} ms  ({ms / base:.2f}x original eager)")
print("  (CPU: no Triton kernels; on a GPU the attnres backend lowers the aggregations to them)")
