"""Convert a small Hugging Face Llama to Block Attention Residuals.

What a newcomer usually wants to see first:
  1. ``detect``  - which norms/sublayers the library found, without changing anything;
  2. ``convert`` - the converted model and its report;
  3. that the converted model computes exactly what the original did at init;
  4. which new modules / parameters were added (the only new trainable state).

Random weights built from a small config: nothing is downloaded.

    python examples/convert_hf_llama.py --layers 4 --blocks 2
"""
import argparse
import copy
import warnings

import torch
import transformers

import residual_rewriter as rr

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--layers", type=int, default=4, help="decoder layers (each has 2 residual sublayers)")
parser.add_argument("--blocks", type=int, default=2, help="AttnRes blocks N (num_blocks)")
args = parser.parse_args()
warnings.filterwarnings("ignore", message=".*token_id.*")  # a config without pad/bos ids warns

# 1. A small random-weight Llama, built from a config (any LlamaConfig works the same way).
torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
)
model = transformers.LlamaForCausalLM(config).eval()

# 2. Look before converting: detect() returns a report and leaves the model alone.
#    Hugging Face models need no example inputs (the library makes a batch of token ids).
found = rr.detect(model, num_blocks=args.blocks)
print(f"detect: {len(found.sites)} residual sublayers found")

# 3. Convert. The original `model` is untouched (convert works on a deep copy).
converted = rr.convert(model, num_blocks=args.blocks)
print(converted.attn_res_report)

# 4. Exact at init: with zero pseudo-queries (and mixing="sum", the default) every aggregation
#    returns the plain residual sum. Check it in float64 so only rounding can differ.
ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

model64 = copy.deepcopy(model).double()
converted64 = rr.convert(model64, num_blocks=args.blocks)
with torch.no_grad():
    err64 = rel_err(converted64(ids).logits, model64(ids).logits)  # HF output type is kept: .logits
    err32 = rel_err(converted(ids).logits, model(ids).logits)      # other batch/seq sizes than traced are fine
print(f"init equality, max |converted - original| / max |original|: float64 {err64:.1e}, float32 {err32:.1e}")

# 5. What was added: one AttnRes module per aggregation, each with a pseudo-query (zeros at init)
#    and a key-norm gain (ones). Everything else is the original model's own parameters.
old_names = {n for n, _ in model.named_parameters()}
added = [(n, tuple(p.shape)) for n, p in converted.named_parameters() if n not in old_names]
print(f"\nadded: {len(added) // 2} aggregations, each in the layer that uses it (<layer>.attn_res.<site>)")
for name, shape in added:
    print(f"  {name:52s} {shape}")
n_new = sum(p.numel() for p in rr.attn_res_parameters(converted))
n_old = sum(p.numel() for p in model.parameters())
print(f"new parameters: {n_new:,} ({100 * n_new / n_old:.2f}% of the original {n_old:,})")
