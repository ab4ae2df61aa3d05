"""Fine-tune a small GPT-2 and its Block AttnRes conversion side by side.

Both models start from the same weights and see the same batches (same seed), so step 1 has the
same loss (the conversion is exact at init); after that the converted model can learn which
earlier blocks each sublayer reads. The new AttnRes parameters (pseudo-queries and key-norm gains,
``rr.attn_res_parameters(converted)``) get their own optimizer group with a higher learning rate,
as you would do in practice: they start at zero and there are few of them.

Random weights, a tiny built-in text, byte-level tokens: nothing is downloaded.

    python examples/finetune_gpt2.py --steps 30
    python examples/finetune_gpt2.py --steps 30 --autocast --checkpointing   # bf16 autocast, and
        # Hugging Face activation checkpointing, which convert keeps (the report says where)
"""
import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
import transformers

import residual_rewriter as rr

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--blocks", type=int, default=2, help="AttnRes blocks N")
parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the model's own weights")
parser.add_argument("--attn-res-lr", type=float, default=1e-2, help="learning rate of the new AttnRes parameters")
parser.add_argument("--autocast", action="store_true", help="train under torch.autocast (bf16), as usual on a GPU")
parser.add_argument("--checkpointing", action="store_true", help="turn on Hugging Face activation checkpointing first")
args = parser.parse_args()
warnings.filterwarnings("ignore", message=".*token_id.*")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 8
data = torch.tensor(list(TEXT.encode()), dtype=torch.long)  # bytes as tokens, vocab 256

# A small random-weight GPT-2 (dropout off so the two runs differ only by AttnRes).
torch.manual_seed(0)
config = transformers.GPT2Config(
    vocab_size=256, n_positions=128, n_embd=64, n_layer=args.layers, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)
original = transformers.GPT2LMHeadModel(config)
if args.checkpointing:  # (transformers v5 name first, the v4 one otherwise)
    (getattr(original, "activation_checkpointing_enable", None) or original.gradient_checkpointing_enable)()
converted = rr.convert(original, num_blocks=args.blocks)  # a converted deep copy: same starting weights
if args.checkpointing:
    print(f"activation checkpointing kept: each of the {len(converted.attn_res_report.holders)} rewritten layers checkpoints")
baseline = copy.deepcopy(original)                        # what we fine-tune for comparison

# Optimizers: the baseline as usual; the converted model with a second group for the AttnRes params.
attn_res_params = rr.attn_res_parameters(converted)
new_ids = {id(p) for p in attn_res_params}
base_params = [p for p in converted.parameters() if id(p) not in new_ids]
opt_base = torch.optim.AdamW(baseline.parameters(), lr=args.lr)
opt_conv = torch.optim.AdamW([
    {"params": base_params, "lr": args.lr},
    {"params": attn_res_params, "lr": args.attn_res_lr, "weight_decay": 0.0},  # no decay pulling queries to 0
])
print(f"original parameters: {sum(p.numel() for p in baseline.parameters()):,}; "
      f"AttnRes parameters: {sum(p.numel() for p in attn_res_params):,} (lr {args.attn_res_lr})")


def batches(seed, batch_size=8, seq_len=64):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=g)
        yield torch.stack([data[s : s + seq_len] for s in starts])


def step(model, opt, ids):
    # The converted module is traced with input_ids only (no labels=, attention_mask=, cache), so
    # compute the next-token loss from the logits - the same way for both models.
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.autocast):
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


baseline.train()
converted.train()
print(f"\n{'step':>4}  {'original':>9}  {'AttnRes':>9}")
for i, ids in zip(range(1, args.steps + 1), batches(seed=1)):  # the SAME batch for both models
    a = step(baseline, opt_base, ids)
    b = step(converted, opt_conv, ids)
    if i == 1 or i % 5 == 0 or i == args.steps:
        print(f"{i:4d}  {a:9.4f}  {b:9.4f}")

moved = max(p.abs().max().item() for n, p in converted.named_parameters() if ".attn_res." in n and n.endswith("query"))
print(f"\nlargest |pseudo-query| entry after fine-tuning: {moved:.3f} (all started at 0)")
