"""The scripts in examples/ run (as a newcomer would run them) and print what they promise.

Each example is run as a subprocess with small arguments; the whole file takes ~40 s on a 2-core CPU.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: int = 180) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_example_is_listed_in_the_readme():
    readme = (EXAMPLES / "README.md").read_text()
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts, "no examples"
    for name in scripts:
        assert f"`{name}`" in readme, f"{name} is not listed in examples/README.md"


def test_convert_hf_llama():
    pytest.importorskip("transformers")
    out = run_example("convert_hf_llama.py", "--layers", "2", "--blocks", "2")
    assert "detect: 4 residual sublayers found" in out
    assert "AttnRes converted: LlamaForCausalLM" in out
    m = re.search(r"float64 (\S+), float32 (\S+)", out)
    assert m, out
    assert float(m.group(1)) < 1e-12 and float(m.group(2)) < 1e-4
    assert "attn_res.final__model__norm.query" in out


def test_finetune_gpt2():
    pytest.importorskip("transformers")
    out = run_example("finetune_gpt2.py", "--steps", "4", "--layers", "2")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\.\d+\s+\d+\.\d+$", line)]
    assert [r[0] for r in rows] == ["1", "4"], out
    first, last = rows[0], rows[-1]
    assert abs(float(first[1]) - float(first[2])) <= 1e-3  # same loss at step 1: exact at init
    assert float(last[1]) < float(first[1]) and float(last[2]) < float(first[2])  # both learn
    assert "largest |pseudo-query| entry after fine-tuning" in out


def test_finetune_gpt2_with_autocast_and_checkpointing():
    pytest.importorskip("transformers")
    out = run_example("finetune_gpt2.py", "--steps", "2", "--layers", "2", "--autocast", "--checkpointing")
    assert "activation checkpointing kept on 4 sublayers" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\.\d+\s+\d+\.\d+$", line)]
    assert rows and abs(float(rows[0][1]) - float(rows[0][2])) <= 1e-3  # exact at init under autocast too


def test_compile_attnres():
    # aot_eager: the backend's passes and AOT autograd, without inductor's long CPU compile
    out = run_example("compile_attnres.py", "--compiler", "aot_eager", "--layers", "2")
    assert "compiled with backend='attnres' (compiler=aot_eager)" in out
    assert "'batch_two_phase': {'modified': True" in out
    m = re.search(r"\|diff\| (\S+)", out)
    assert m and float(m.group(1)) < 1e-4, out
    g = re.search(r"max relative difference: (\S+)", out)
    assert g and float(g.group(1)) < 1e-3, out


def test_inspect_depth_attention(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_example("inspect_depth_attention.py", "--out", str(tmp_path), "--steps", "3", "--layers", "2")
    assert "mean depth-attention weights over" in out
    for name in ("depth_weights.png", "streams.png", "report.txt"):
        path = tmp_path / name
        assert str(path) in out
        assert path.stat().st_size > 0
    assert (tmp_path / "depth_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AttnRes converted: GPT" in (tmp_path / "report.txt").read_text()


def test_custom_model():
    out = run_example("custom_model.py")
    assert "AttnRes converted: MyPreNormNet" in out
    assert "6 residual sublayers" in out
    assert "post-norm model refused, ConversionError" in out
    assert "Post-norm models" in out
