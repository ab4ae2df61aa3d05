"""Train a converted model a little, then look at what it learned to read.

After conversion every sublayer reads a softmax mixture over earlier blocks' outputs. At init the
pseudo-queries are zero and the mixture is uniform; training moves them. This script trains the
built-in GPT converted to Block AttnRes for a few steps (the AttnRes parameters with a high learning
rate, so the queries visibly move) and then writes, with ``residual_rewriter.inspect``:

  * depth_weights.png - heatmap of the mean depth-attention weights (like the paper's Figure 8):
                        rows = the input of each sublayer (and the final norm), columns = sources
                        b0 (embedding), b1.. (completed blocks), last one read = the partial block sum
  * streams.png       - the residual streams: which sources (blocks) each sublayer reads, blocks labelled
  * report.txt        - the conversion report

The same from the command line: ``residual-rewriter inspect --view weights -o depth_weights.png``.

    python examples/inspect_depth_attention.py --out /tmp/attnres_pictures --steps 40
"""
import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import residual_rewriter as rr
from residual_rewriter import inspect as rri
from residual_rewriter.models import GPT, GPTConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, default=None, help="folder for the pictures (default: a new temp dir)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--block-size", type=int, default=2, help="sublayers per block S (1 = Full AttnRes)")
args = parser.parse_args()
out = args.out or Path(tempfile.mkdtemp(prefix="attnres_inspect_"))
out.mkdir(parents=True, exist_ok=True)

TEXT = (
    "Attention Residuals let every layer choose which earlier layers to listen to. "
    "A plain residual stream adds them all up with weight one; a learned softmax can do better. "
) * 8
data = torch.tensor(list(TEXT.encode()), dtype=torch.long)

torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=args.layers))
converted = rr.convert(model, block_size=args.block_size)

# Train: model weights at a normal lr, the (few) AttnRes parameters at a much higher one.
attn_res = rr.attn_res_parameters(converted)
ids_new = {id(p) for p in attn_res}
opt = torch.optim.AdamW([
    {"params": [p for p in converted.parameters() if id(p) not in ids_new], "lr": 2e-3},
    {"params": attn_res, "lr": 2e-2, "weight_decay": 0.0},
])
g = torch.Generator().manual_seed(1)
converted.train()
for step in range(1, args.steps + 1):
    starts = torch.randint(0, data.numel() - 65, (8,), generator=g)
    x = torch.stack([data[s : s + 64] for s in starts])
    y = torch.stack([data[s + 1 : s + 65] for s in starts])
    loss = F.cross_entropy(converted(x).reshape(-1, 256), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step == 1 or step == args.steps:
        print(f"step {step:3d}  loss {loss.item():.3f}")

# Depth-attention weights: run the model once on some inputs and average the softmax weights of every
# aggregation over all tokens. Rows sum to 1; sources a row does not read are NaN (blank in the plot).
x = torch.stack([data[s : s + 64] for s in range(0, 8 * 64, 64)])
dw = rri.depth_attention_weights(converted, x)
print(dw)
uniform = torch.tensor([1.0 / n for n in dw.num_sources])
print(f"largest departure from the uniform init weights: {(dw.weights.nan_to_num(0).amax(1) - uniform).abs().max():.3f}")

weights_png = rri.plot_depth_weights(dw, out / "depth_weights.png")
streams = rri.render_streams(converted, "png")  # the source-by-sublayer matrix (Graphviz only for <= 8 sublayers)
streams_png = streams.save(out / "streams.png")
report_txt = out / "report.txt"
report_txt.write_text(str(converted.attn_res_report) + "\n")

print(f"\nwrote depth-attention heatmap: {weights_png}")
print(f"wrote residual-stream picture ({streams.backend}): {streams_png}")
print(f"wrote report: {report_txt}")
