"""See what ``convert_`` found and changed: report, each rewritten module's graph before/after, diff,
pictures, weights.

    from residual_rewriter import inspect as rri
    print(rri.graph_diff(converted))                       # only what the rewrite changed
    rri.render_streams(converted, "svg").save("streams.svg")
    dw = rri.depth_attention_weights(converted, *inputs)   # [aggregations, sources] tensor
    rri.plot_depth_weights(dw, "weights.png")              # like the paper's Figure 8

The command line ``residual-rewriter inspect`` wraps these.
"""
from .graphs import GraphChanges, graph_changes, graph_diff, graphs_before_after, holder_graphs, is_aggregation, readable_graph
from .pictures import Picture
from .streams import depth_order, draw_streams, render_streams, stream_graph, to_dot
from .targets import TargetError, example_inputs_for, load_target
from .weights import DepthWeights, depth_attention_weights, draw_depth_weights, plot_depth_weights, render_depth_weights

__all__ = [
    "GraphChanges", "graph_changes", "graph_diff", "graphs_before_after", "holder_graphs", "is_aggregation", "readable_graph",
    "Picture", "depth_order", "draw_streams", "render_streams", "stream_graph", "to_dot",
    "TargetError", "example_inputs_for", "load_target",
    "DepthWeights", "depth_attention_weights", "draw_depth_weights", "plot_depth_weights", "render_depth_weights",
]
