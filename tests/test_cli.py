"""The residual-rewriter command line, run in process through ``main([...])`` (and once as a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

import residual_rewriter as rr
from residual_rewriter.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL_GPT = "cli_targets:small_gpt"  # written to tmp_path by the `targets` fixture


@pytest.fixture
def targets(tmp_path, monkeypatch):
    """An importable module of TARGET callables: a small GPT, and a model with no residual to convert."""
    (tmp_path / "cli_targets.py").write_text(textwrap.dedent("""
        import torch
        from residual_rewriter.models import GPT, GPTConfig

        def small_gpt():
            torch.manual_seed(0)
            return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64))

        class NoResidual(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

            def forward(self, x):
                return self.b(torch.relu(self.a(x)))

            def example_inputs(self):
                return (torch.randn(2, 8),)

        def broken():
            raise RuntimeError("factory exploded")

        class PostNormBlock(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.f, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

            def forward(self, x):
                return self.norm(x + self.f(x))

        class PostNorm(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList(PostNormBlock() for _ in range(8))

            def forward(self, x):
                for layer in self.layers:
                    x = layer(x)
                return x

            def example_inputs(self):
                return (torch.randn(2, 3, 8),)

        def post_norm():
            return PostNorm()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def llama_config_dir(tmp_path_factory):
    """A small Llama config.json written by the test (a random-weight model is built from it)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    ).save_pretrained(folder)
    assert (folder / "config.json").is_file()
    return folder


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- end to end --------------------------------------------------------------------------------


def test_builtin_model_report(capsys):
    code, out, err = run(capsys, "inspect")
    assert code == 0
    assert "AttnRes converted: GPT" in out and "transformer.h.0.ln_1" in out and "totals:" in out
    assert "left out: none" in out and "graph:" in out
    assert "converting GPT" in err  # progress goes to stderr, not into the output


def test_builtin_model_json_schema(capsys):
    code, out, _ = run(capsys, "inspect", "--format", "json", "--blocks", "2", "-q")
    assert code == 0
    d = json.loads(out)
    assert set(d) == {"residual_rewriter", "target", "view", "report", "graph"}
    assert d["target"] is None and d["view"] == "report" and d["residual_rewriter"] == rr.__version__
    report = d["report"]
    for key, typ in {"model": str, "converted": bool, "config": dict, "streams": list, "left_out": list,
                     "opaque_modules": dict, "new_parameters": dict, "totals": dict}.items():
        assert isinstance(report[key], typ), key
    assert "plan" not in report  # its streams, sites and left-out adds sit at the top level
    assert report["model"] == "GPT" and report["converted"] is True and report["config"]["num_blocks"] == 2
    (stream,) = report["streams"]
    assert stream["num_blocks"] == 2 and len(stream["sites"]) == 8
    for site in stream["sites"]:
        assert set(site) >= {"index", "block", "position", "num_sources", "norm", "sublayer", "param_prefix"}
        assert isinstance(site["num_sources"], int) and isinstance(site["norm"], str)
    totals = report["totals"]
    assert totals["sites"] == 8 and totals["blocks"] == 2
    assert totals["new_parameters"] == sum(report["new_parameters"].values()) > 0
    assert [b["block"] for b in totals["sources_per_block"]] == [1, 2]
    graph = d["graph"]
    assert set(graph) == {"nodes_before", "nodes_after", "added", "removed", "rewired", "aggregations"}
    assert all(isinstance(graph[k], int) for k in ("nodes_before", "nodes_after", "aggregations"))
    assert len(graph["removed"]) == 8  # the residual adds
    assert totals["aggregations"] == graph["aggregations"]  # the report counts what the graph holds


def test_llama_config_folder_and_file(capsys, llama_config_dir):
    code, out, _ = run(capsys, "inspect", str(llama_config_dir), "--format", "json", "-q")
    assert code == 0
    report = json.loads(out)["report"]
    assert report["model"] == "LlamaForCausalLM"
    assert [s["sublayer"] for s in report["streams"][0]["sites"]] == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    assert report["streams"][0]["consumers"] == ["model.norm"]
    code, out, _ = run(capsys, "inspect", str(llama_config_dir / "config.json"), "--view", "diff", "-q")
    assert code == 0 and "# model.layers.1\n" in out and "AttnRes[attn_res.mlp]" in out and "post_attention_layernorm" in out


def test_diff_view(capsys, targets):
    code, out, _ = run(capsys, "inspect", SMALL_GPT, "--view", "diff", "-q")
    assert code == 0
    assert out.startswith("# transformer.h.0\n--- transformer.h.0 before") and "+attn_res_default" in out and "-add_" in out


def test_graph_and_streams_text_views(capsys, targets):
    code, out, _ = run(capsys, "inspect", SMALL_GPT, "--view", "graph", "-q")
    assert code == 0 and "## before (captured)\n# transformer.h.0\n" in out and "## after (AttnRes)" in out
    code, out, _ = run(capsys, "inspect", SMALL_GPT, "--view", "streams", "--block-size", "2", "-q")
    assert code == 0
    assert "transformer.h.0.mlp <- b0, partial b1 (transformer.h.0.attn)" in out
    assert "final -> transformer.ln_f <- b0, b1, b2" in out


def test_streams_json_and_dot(capsys, targets):
    code, out, _ = run(capsys, "inspect", SMALL_GPT, "--view", "streams", "--format", "json", "-q")
    assert code == 0
    g = json.loads(out)["streams"]
    kinds = [n["kind"] for n in g["nodes"]]
    assert kinds.count("sublayer") == 4 and kinds.count("source") == 1 and kinds.count("final") == 1
    assert all({"source", "target", "kind"} <= set(e) for e in g["edges"])
    code, out, _ = run(capsys, "inspect", SMALL_GPT, "--format", "dot", "-q")
    assert code == 0 and out.startswith("digraph attnres {") and "subgraph cluster_s0_b1" in out


@pytest.mark.parametrize("view", ["streams", "weights"])
@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_pictures_are_valid_files(capsys, targets, tmp_path, view, fmt):
    path = tmp_path / f"{view}.{fmt}"  # the suffix picks the format
    code, _, err = run(capsys, "inspect", SMALL_GPT, "--view", view, "-o", str(path), "-q")
    assert code == 0 and f"wrote {path}" in err
    data = path.read_bytes()
    if fmt == "png":
        assert data.startswith(PNG_SIGNATURE)
    else:
        assert ET.fromstring(data).tag.endswith("svg")


def test_weights_text_and_json(capsys, targets):
    code, out, _ = run(capsys, "inspect", SMALL_GPT, "--view", "weights", "--block-size", "2", "-q")
    assert code == 0 and "mean depth-attention weights" in out and "0.500" in out  # uniform at init
    code, out, _ = run(capsys, "inspect", SMALL_GPT, "--view", "weights", "--format", "json", "-q")
    w = json.loads(out)["weights"]
    assert len(w["rows"]) == len(w["weights"]) == 5  # 4 sublayers + final
    for row, n in zip(w["weights"], w["num_sources"]):
        assert abs(sum(row[:n]) - 1) < 1e-5 and all(v is None for v in row[n:])


# ---- errors and usage --------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    """The error: one line, continued only by indented lines (a conversion error's lists of modules)."""
    lines = [l for l in err.splitlines() if not l.startswith("[")]  # drop progress lines
    assert "Traceback" not in err
    assert lines[0].startswith("residual-rewriter: error: ") and all(l.startswith("  ") for l in lines[1:]), err
    return "\n".join(lines)


def test_a_post_norm_model_is_refused_readably(capsys, targets):
    """A post-norm model (every module fails for the same reason): the reasons are grouped, one line
    each, under the error line; not a 2 KB line repeating one reason per module."""
    code, out, err = run(capsys, "inspect", "cli_targets:post_norm")
    message = _one_error_line(err)
    assert code == 1 and out == "" and "post-norm" in message
    assert message.count("no pre-norm residual site") <= 2, message  # the error itself, and once for the modules tried
    assert max(len(line) for line in message.splitlines()) < 300, message


@pytest.mark.parametrize("target, message", [
    ("no_such_package_xyz.models:make", "cannot import 'no_such_package_xyz.models'"),
    ("residual_rewriter.models:NoSuchModel", "has no attribute 'NoSuchModel'"),
    ("definitely/not/a/path.json", "neither package.module:callable nor an existing"),
    ("cli_targets:broken", "calling 'cli_targets:broken' failed: RuntimeError: factory exploded"),
    ("cli_targets:NoResidual", "cannot convert this model: no pre-norm residual site"),
])
def test_bad_target_is_one_line_and_nonzero(capsys, targets, target, message):
    code, out, err = run(capsys, "inspect", target)
    assert code == 1 and out == ""
    assert message in _one_error_line(err)


def test_folder_without_config(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", str(tmp_path), "-q")
    assert code == 1 and "without a config.json" in _one_error_line(err)


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--blocks", "2", "--block-size", "2"], "not allowed with argument"),
    (["inspect", "--blocks", "0"], "must be at least 1"),
    (["inspect", "--format", "dot", "--view", "diff"], "--format dot cannot show --view diff"),
    (["inspect", "--format", "jpeg"], "invalid choice"),
    # the output is checked before the model is built and converted
    (["inspect", "-o", "no/such/folder/report.txt"], "its folder does not exist"),
    (["inspect", "-o", "."], "is a directory"),
    (["inspect", "--format", "text", "-o", "picture.png"], "has the suffix of png, but --format is text"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_option_with_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("TARGET", "--blocks", "--block-size", "--view", "--format", "--output", "--quiet"):
        assert option in out
    assert "examples:" in out and "config.json" in out and "package.module:callable" in out
    assert main([]) == 2 and "inspect" in capsys.readouterr().err  # no command: the overview


def test_demo_help(capsys):
    pytest.importorskip("residual_rewriter.demo")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "residual-rewriter demo" in capsys.readouterr().out


def test_python_dash_m_subprocess(tmp_path):
    """The real entry point, out of process: `python -m residual_rewriter inspect` writes a JSON report.
    Warnings are filtered as Python filters them: a library's DeprecationWarning is not shown."""
    (tmp_path / "noisy_targets.py").write_text(textwrap.dedent("""
        import warnings
        from residual_rewriter.models import GPT, GPTConfig

        def gpt():
            warnings.warn("a library's deprecated API", DeprecationWarning)
            return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64))
    """))
    out_file = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "residual_rewriter", "inspect", "noisy_targets:gpt", "--format", "json", "-o", str(out_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "converting GPT" in proc.stderr and proc.stdout == "" and "deprecated API" not in proc.stderr
    assert json.loads(out_file.read_text())["report"]["model"] == "GPT"
