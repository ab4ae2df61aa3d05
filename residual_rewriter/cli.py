"""The ``residual-rewriter`` command line (also ``python -m residual_rewriter``).

    residual-rewriter inspect [TARGET] [--blocks N | --block-size S] [--view VIEW]
                              [--format text|json|dot|svg|png] [-o FILE]
    residual-rewriter demo [DEMO OPTIONS]

``main(argv)`` returns the exit status instead of exiting, so tests (and other tools) can call it in
process. Errors a user can fix (a TARGET that does not import, a model that cannot be converted) are
one line on stderr and exit status 1; usage errors are argparse's, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

PROG = "residual-rewriter"
VIEWS = ("report", "diff", "graph", "streams", "weights")
FORMATS = ("text", "json", "dot", "svg", "png")
# which views each format can show (the first is its default view)
FORMAT_VIEWS = {
    "text": VIEWS,
    "json": VIEWS,
    "dot": ("streams",),
    "svg": ("streams", "weights"),
    "png": ("streams", "weights"),
}
MAX_UNEXPECTED_MESSAGE = 300  # characters of an unexpected error's message shown without --traceback
SUFFIX_FORMATS = {".txt": "text", ".json": "json", ".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}

INSPECT_EPILOG = """\
views (--view):
  report   the conversion report: the mode and the modules whose forward is rewritten (holders),
           every residual site (index, block, norm and sublayer module paths, sources it reads),
           what was left out and why, totals; plus a count of graph changes
  diff     each holder's graph before -> after the rewrite, only the lines that changed (unified diff)
  graph    each holder's graph before and after, one module-level call per line
  streams  the residual streams: sublayers in depth order, grouped into blocks, and the sources each
           aggregation reads (text listing, JSON node-link graph, DOT, or a picture)
  weights  mean depth-attention weight of every sublayer over its sources on the model's example
           inputs (a heatmap like the paper's Figure 8 with svg/png; uniform for a fresh conversion)

formats (--format): text and json show any view; dot shows streams; svg and png draw streams or
weights (streams: Graphviz `dot` when installed and up to 8 sublayers, otherwise matplotlib's
source-by-sublayer matrix; weights: matplotlib). Without --format, the suffix of -o
picks it (.txt .json .dot .svg .png), else text. The default view is report, or streams for dot/svg/png.

examples:
  residual-rewriter inspect                                   # the built-in GPT, report as a table
  residual-rewriter inspect --block-size 2 --view diff        # what the rewrite changed, blocks of 2
  residual-rewriter inspect path/to/llama/config.json --format json -o report.json
  residual-rewriter inspect mypkg.models:make_model --view streams -o streams.svg
  residual-rewriter inspect --view weights -o weights.png
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Give PyTorch models Block Attention Residuals (AttnRes) by rewriting their graph, "
        "and look at what the rewrite does.",
        epilog=f"run '{PROG} inspect --help' for the inspect options and examples",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="convert a model and show the report, graph diff, stream picture or depth weights",
        description="Convert a model (random weights, nothing is downloaded) and show what the rewrite "
        "found and changed.",
        epilog=INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target", nargs="?", metavar="TARGET",
        help="the model: package.module:callable (a function returning an nn.Module, or an nn.Module "
        "class), or a Hugging Face config.json / a folder holding one (random weights). "
        "Default: the built-in GPT (residual_rewriter.models.GPT). e.g. mypkg.models:make_model",
    )
    blocks = p.add_mutually_exclusive_group()
    blocks.add_argument(
        "--blocks", type=_positive_int, metavar="N",
        help="split the sublayers into at most N blocks (the paper's N; default 8). e.g. --blocks 4",
    )
    blocks.add_argument(
        "--block-size", type=_positive_int, metavar="S",
        help="S sublayers per block (the paper's S); 1 is Full AttnRes. e.g. --block-size 2",
    )
    p.add_argument(
        "--view", choices=VIEWS, default=None,
        help="what to show: report, diff, graph, streams or weights (see below). e.g. --view diff",
    )
    p.add_argument(
        "--format", choices=FORMATS, default=None, dest="fmt",
        help="text (default), json, dot (streams), svg or png (streams or weights). e.g. --format json",
    )
    p.add_argument(
        "-o", "--output", metavar="FILE", type=Path,
        help="write to FILE instead of stdout (needed for png on a terminal). e.g. -o streams.svg",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument("--traceback", action="store_true", help="on an error, show the full Python traceback")
    p.set_defaults(subparser=p)  # usage errors found after parsing are reported with inspect's usage

    sub.add_parser(
        "demo", add_help=False,
        help="convert the built-in GPT, show the report and exact init, train a few steps "
        f"(options: '{PROG} demo --help')",
    )
    return parser


class Progress:
    """Step messages on stderr (stdout stays clean for the output itself)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:5.1f}s] {message}", file=sys.stderr, flush=True)


class CliError(Exception):
    """An error to print as one line (exit status 1)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # multi-line messages (e.g. lists of modules) on one line
    return text or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _run_demo(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    fmt, view = _resolve_format_and_view(args.subparser, args)
    try:
        with warnings.catch_warnings(record=True) as caught:  # Python's filters: what a script would show
            output = _inspect(args, fmt, view, Progress(args.quiet))
        for w in caught:
            if issubclass(w.category, RuntimeWarning):  # ours, e.g. "graphviz dot failed ...; drew with matplotlib"
                print(f"{PROG}: warning: {_one_line(w.message)}", file=sys.stderr)
            else:  # anyone else's (torch, transformers): shown as Python would have shown it
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        _write(output, args.output, fmt)
    except BrokenPipeError:  # e.g. `| head`: the reader left; not an error of ours
        sys.stderr.close()  # nothing more to say, and no "Exception ignored" message at exit
        return 0
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line (or a traceback on request)
        if args.traceback:
            raise
        print(f"{PROG}: error: {_describe(e)}", file=sys.stderr)
        return 1
    return 0


def _describe(e: Exception) -> str:
    from residual_rewriter.passes.errors import ConversionError
    from residual_rewriter.inspect.targets import TargetError

    if isinstance(e, (TargetError, CliError)):
        return _one_line(e)
    if isinstance(e, ConversionError):  # its own lines (lists of modules), indented under the first
        return "cannot convert this model: " + "\n  ".join(line.rstrip() for line in str(e).splitlines())
    text = _one_line(e)
    if len(text) > MAX_UNEXPECTED_MESSAGE:  # e.g. a tracer error quoting a whole FX node
        text = text[:MAX_UNEXPECTED_MESSAGE] + " ..."
    return f"{type(e).__name__}: {text} (run again with --traceback for details)"


def _run_demo(argv: list[str]) -> int:
    try:
        from residual_rewriter.demo import run_demo
    except ImportError as e:
        print(f"{PROG}: error: the demo is not available: {_one_line(e)}", file=sys.stderr)
        return 1
    result = run_demo(argv)
    return result if isinstance(result, int) else 0


def _resolve_format_and_view(parser: argparse.ArgumentParser, args) -> tuple[str, str]:
    fmt, by_suffix = args.fmt, SUFFIX_FORMATS.get(args.output.suffix.lower()) if args.output else None
    if args.output is not None:  # checked before the model is built and converted
        if args.output.is_dir() or not args.output.parent.is_dir():
            parser.error(f"-o {args.output}: {'is a directory' if args.output.is_dir() else 'its folder does not exist'}")
        if fmt and by_suffix and fmt != by_suffix:
            parser.error(f"-o {args.output} has the suffix of {by_suffix}, but --format is {fmt}")
    fmt = fmt or by_suffix or "text"
    view = args.view or FORMAT_VIEWS[fmt][0]
    if view not in FORMAT_VIEWS[fmt]:
        parser.error(f"--format {fmt} cannot show --view {view}; it shows: {', '.join(FORMAT_VIEWS[fmt])}")
    if fmt == "png" and args.output is None and sys.stdout.isatty():
        parser.error("png is binary: write it to a file with -o FILE.png")
    return fmt, view


def _inspect(args, fmt: str, view: str, progress: Progress):
    """Build, convert and render. Returns str (text formats) or bytes (pictures)."""
    from residual_rewriter import convert
    from residual_rewriter.inspect.targets import example_inputs_for, load_target

    what = args.target or "the built-in GPT"
    progress(f"building {what}")
    model = load_target(args.target)
    inputs = example_inputs_for(model)  # a TargetError that says what the model lacks, in CLI terms
    if hasattr(model, "attn_res_report"):
        # already converted (e.g. a trained one): inspect it as it is
        if args.blocks or args.block_size:
            raise CliError("TARGET returned an already converted model: --blocks/--block-size do not apply")
        progress(f"{type(model).__name__} is already converted; inspecting it as is")
        converted = model
    else:
        n_params = sum(p.numel() for p in model.parameters())
        progress(f"converting {type(model).__name__} ({n_params:,} parameters): tracing, detecting, rewriting")
        converted = convert(model, dict(inputs), num_blocks=args.blocks, block_size=args.block_size)
    report = converted.attn_res_report
    progress(f"converted ({report.mode}): {len(report.sites)} sites in {report.totals()['blocks']} blocks, "
             f"{len(report.holders)} modules rewritten")

    if view == "weights":
        progress("running the converted model on its example inputs to measure depth-attention weights")
        from residual_rewriter.inspect.weights import depth_attention_weights, render_depth_weights

        dw = depth_attention_weights(converted, **inputs)
        if fmt in ("svg", "png"):
            progress(f"drawing the heatmap ({fmt})")
            return render_depth_weights(dw, fmt, title=f"{report.model}: depth-attention weights "
                                        f"(mean over {dw.tokens_text})").data
        return _as_json(args, view, {"weights": dw.to_dict()}) if fmt == "json" else str(dw)

    if view == "streams":
        from residual_rewriter.inspect.streams import render_streams, stream_graph, to_dot

        if fmt in ("svg", "png"):
            progress(f"drawing the residual streams ({fmt})")
            picture = render_streams(report, fmt)
            progress(f"drawn with {picture.backend}")
            return picture.data
        g = stream_graph(report)
        if fmt == "dot":
            return to_dot(g)
        if fmt == "json":
            import networkx as nx

            return _as_json(args, view, {"streams": nx.node_link_data(g, edges="edges")})
        return _streams_text(g)

    from residual_rewriter.inspect.graphs import graph_changes, graph_diff, graphs_before_after

    if view == "diff":
        diff = graph_diff(converted)
        return _as_json(args, view, {"diff": diff}) if fmt == "json" else diff
    if view == "graph":
        before, after = graphs_before_after(converted)
        if fmt == "json":
            return _as_json(args, view, {"before": before.splitlines(), "after": after.splitlines()})
        return f"## before (captured)\n{before}\n\n## after (AttnRes)\n{after}"
    # report
    changes = graph_changes(converted)
    if fmt == "json":
        return _as_json(args, view, {
            "report": report.to_dict(),
            "graph": {
                "nodes_before": changes.nodes_before,
                "nodes_after": changes.nodes_after,
                "added": changes.added,
                "removed": changes.removed,
                "rewired": changes.rewired,
                "aggregations": changes.aggregations,
            },
        })
    return f"{report}\n{changes} (--view diff shows them)"


def _as_json(args, view: str, payload: dict[str, Any]) -> str:
    from residual_rewriter import __version__  # what wrote it: the keys follow the library's version

    return json.dumps({"residual_rewriter": __version__, "target": args.target, "view": view, **payload}, indent=2) + "\n"


def _streams_text(g) -> str:
    """One line per aggregation: what it reads, block by block."""
    from residual_rewriter.inspect.streams import depth_order

    lines = []
    for st in sorted({d["stream"] for _, d in g.nodes(data=True)}):
        lines.append(f"stream {st}:")
        for n in depth_order(g, st):
            d = g.nodes[n]
            if d["kind"] not in ("sublayer", "final"):
                continue
            by_source: dict[int, list[str]] = {}
            for u, _, e in g.in_edges(n, data=True):
                by_source.setdefault(e["source"], []).append(g.nodes[u]["label"] if e["kind"] == "partial" else "")
            parts = []
            for j in sorted(by_source):
                partial = [x for x in by_source[j] if x]
                parts.append(f"partial b{j} ({' + '.join(partial)})" if partial else f"b{j}")
            where = f"block {d['block']}" if d["kind"] == "sublayer" else "     "
            lines.append(f"  {where}  {d['label']} <- {', '.join(parts)}")
    return "\n".join(lines)


def _write(output, path: Optional[Path], fmt: str) -> None:
    if path is not None:
        if isinstance(output, bytes):
            path.write_bytes(output)
        else:
            path.write_text(output if output.endswith("\n") or not output else output + "\n")
        print(f"{PROG}: wrote {path}", file=sys.stderr)
        return
    if isinstance(output, bytes):
        if fmt == "svg":
            sys.stdout.write(output.decode())
        else:
            sys.stdout.buffer.write(output)
        sys.stdout.flush()
        return
    if output:
        print(output.rstrip("\n"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
