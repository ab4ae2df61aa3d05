"""FX passes of residual_rewriter, in pipeline order.

capture.py  model -> GraphModule whose leaves are the model's own norm/attention modules
modes.py    one captured graph that follows train()/eval()
canonicalize.py  (x + f) + g -> x + (f + g), so parallel branches show the residual pattern
norms.py    what counts as a normalization (by meaning: scale-invariant in its input)
detect.py   GraphModule -> Plan: residual sites x + f(norm(x)), linked into streams
streams.py  who may read a stream, blocks, parameter names, the "nothing found" message
plan.py     the Plan: plain data, what the report prints
rewrite.py  Plan -> converted GraphModule: block sums, partial block, one attn_res op per site
op_names.py recognise the library ops in a graph (by name)
"""
