"""Convert a model you wrote yourself, and see what the library refuses.

The library looks for the pre-norm residual pattern ``x = x + f(norm(x))`` by what the code
computes, not by class names: here the norm is an RMSNorm written inline in the block's forward
(no norm module at all), and it is still found. A post-norm model (``x = norm(x + f(x))``, as in
the original Transformer / BERT) cannot be given AttnRes this way and is refused with a
``ConversionError`` that names the modules - nothing is ever converted silently wrong.

    python examples/custom_model.py
"""
import torch
from torch import nn

import residual_rewriter as rr


class Layer(nn.Module):
    """x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x)), with the RMSNorm written out inline."""

    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.g1 = nn.Parameter(torch.ones(d))  # the norms' gains: plain parameters, no norm modules
        self.g2 = nn.Parameter(torch.ones(d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))

    @staticmethod
    def rms(x, g, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def forward(self, x):
        h = self.rms(x, self.g1)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.rms(x, self.g2))
        return x


class MyPreNormNet(nn.Module):
    def __init__(self, vocab=100, d=32, layers=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Layer(d) for _ in range(layers)])
        self.g_out = nn.Parameter(torch.ones(d))  # the final norm's gain: where the residual stream ends
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(Layer.rms(x, self.g_out))  # the final norm, inline too


class PostLNLayer(nn.Module):
    """The original Transformer layout: norm AFTER the residual add."""

    def __init__(self, d: int):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.ff(x))


torch.manual_seed(0)
ids = torch.randint(0, 100, (2, 10))

# A model of your own has no example inputs the library could guess: pass them (a lone tensor is fine).
model = MyPreNormNet().eval()
converted = rr.convert(model, ids, num_blocks=2)
print(converted.attn_res_report)
with torch.no_grad():
    ref, out = model(ids), converted(ids)
print(f"init equality (float32): max relative error {((out - ref).abs().max() / ref.abs().max()).item():.1e}")

# A post-norm model is refused, and the message says where and why ("1", "2": the Sequential's layers).
post_norm = nn.Sequential(nn.Embedding(100, 32), PostLNLayer(32), PostLNLayer(32), nn.Linear(32, 100)).eval()
try:
    rr.convert(post_norm, ids)
except rr.ConversionError as e:
    print(f"\npost-norm model refused, ConversionError:\n  {e}")
else:
    raise SystemExit("expected the post-norm model to be refused")
