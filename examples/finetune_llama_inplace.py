"""Convert a Hugging Face Llama IN PLACE (``convert_``) and fine-tune it, against the original.

``residual_rewriter.convert_(model)`` keeps your model: the same object, class (``LlamaForCausalLM``),
module tree, parameter names and Python forward, so ``labels=``, ``attention_mask=``, ``generate``
with the KV cache and ``save_pretrained`` work as before. Only the decoder layers' forwards are
rewritten (they pass the Block AttnRes state along), and each layer holds its new parameters:
``model.model.layers.3.attn_res.mlp.query``.

This script:
  1. builds a small random-weight Llama (nothing is downloaded) and a copy of it, the baseline;
  2. converts the model in place and prints ``model.attn_res_report``;
  3. fine-tunes both on the same batches with the Hugging Face loss (``labels=``), the new AttnRes
     parameters in an optimizer group of their own (higher lr, no weight decay). Step 1 has the same
     loss for both: the conversion is exact at init;
  4. generates with the KV cache, saves with ``save_pretrained`` and reloads with
     ``residual_rewriter.from_pretrained``, which restores the AttnRes parameters.

    python examples/finetune_llama_inplace.py --steps 40
"""
import argparse
import copy
import tempfile
import warnings

import torch
import transformers

import residual_rewriter as rr

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--layers", type=int, default=4, help="decoder layers (2 residual sublayers each)")
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument("--blocks", type=int, default=4, help="AttnRes blocks N")
parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of the model's own weights")
parser.add_argument("--attn-res-lr", type=float, default=2e-2, help="learning rate of the new AttnRes parameters")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=64)
args = parser.parse_args()
warnings.filterwarnings("ignore", message=".*token_id.*")
transformers.logging.set_verbosity_error()  # the reload below would list attn_res.* as "unexpected" keys
transformers.utils.logging.disable_progress_bar()  # before residual_rewriter.from_pretrained restores them

# Text: a few modules of the Python standard library, bytes as tokens (vocab 256).
import json, textwrap, argparse as _argparse  # noqa: E401,E402 - only their source is used
import inspect  # noqa: E402

TEXT = "".join(inspect.getsource(m) for m in (json, textwrap, _argparse))
data = torch.tensor(list(TEXT.encode()), dtype=torch.long)

# 1. A small random-weight Llama and a copy of it: the baseline we fine-tune for comparison.
torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
)
model = transformers.LlamaForCausalLM(config)
baseline = copy.deepcopy(model)

# 2. In place: `model` is still the same LlamaForCausalLM object afterwards.
same_object = rr.convert_(model, num_blocks=args.blocks)
assert same_object is model
print(model.attn_res_report)
attn_res = {n: p for n, p in model.named_parameters() if ".attn_res." in n}
print(f"\nstill a {type(model).__name__}; model.model.layers is a {type(model.model.layers).__name__} "
      f"of {len(model.model.layers)} {type(model.model.layers[0]).__name__}s")
print(f"new parameters: {len(attn_res)} tensors, {sum(p.numel() for p in attn_res.values()):,} values, e.g.")
for name in list(attn_res)[:4]:
    print(f"  {name}  {tuple(attn_res[name].shape)}")

# 3. Fine-tune both on the same batches. The original parameters keep their names, so an optimizer
#    recipe written for the original applies; the AttnRes ones get their own group.
opt_base = torch.optim.AdamW(baseline.parameters(), lr=args.lr)
opt_conv = torch.optim.AdamW([
    {"params": [p for n, p in model.named_parameters() if ".attn_res." not in n], "lr": args.lr},
    {"params": list(attn_res.values()), "lr": args.attn_res_lr, "weight_decay": 0.0},
])


def step(m, opt, ids, mask):
    loss = m(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss  # Hugging Face's own loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


g = torch.Generator().manual_seed(1)
mask = torch.ones(args.batch, args.seq, dtype=torch.long)
mask[0, : args.seq // 4] = 0  # some left padding in one row, to show attention_mask goes through
baseline.train()
model.train()
print(f"\n{'step':>4}  {'original':>9}  {'AttnRes':>9}")
for i in range(1, args.steps + 1):
    starts = torch.randint(0, data.numel() - args.seq, (args.batch,), generator=g)
    ids = torch.stack([data[s : s + args.seq] for s in starts])
    a = step(baseline, opt_base, ids, mask)
    b = step(model, opt_conv, ids, mask)
    if i == 1:
        first = (a, b)
    if i == 1 or i % 10 == 0 or i == args.steps:
        print(f"{i:4d}  {a:9.4f}  {b:9.4f}")
print(f"step 1 loss, |original - AttnRes|: {abs(first[0] - first[1]):.1e} (exact at init)")
moved = max(p.abs().max().item() for n, p in attn_res.items() if n.endswith("query"))
print(f"largest |pseudo-query| entry after fine-tuning: {moved:.3f} (all started at 0)")

# 4. What a Hugging Face user does next: generate (KV cache), save, reload.
model.eval()
prompt = data[:16].unsqueeze(0)
with torch.no_grad():
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
print(f"\ngenerate (KV cache): {bytes(out[0, 16:].tolist())!r}")
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    reloaded = rr.from_pretrained(tmp).eval()
    with torch.no_grad():
        diff = (reloaded(prompt).logits - model(prompt).logits).abs().max().item()
print(f"save_pretrained -> residual_rewriter.from_pretrained: {type(reloaded).__name__}, max |logit diff| {diff:.1e}")
