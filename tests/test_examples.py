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
    assert "model.layers.1.attn_res.final.query" in out


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
    assert "activation checkpointing kept: each of the 2 rewritten layers checkpoints" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\.\d+\s+\d+\.\d+$", line)]
    assert rows and abs(float(rows[0][1]) - float(rows[0][2])) <= 1e-3  # exact at init under autocast too


def test_compile_attnres():
    # aot_eager: the backend's passes and AOT autograd, without inductor's long CPU compile
    out = run_example("compile_attnres.py", "--compiler", "aot_eager", "--layers", "2", "--time-steps", "2")
    assert "compiled with backend='attnres' (compiler=aot_eager)" in out
    assert "'batch_two_phase': {'modified': True" in out
    m = re.search(r"\|diff\| (\S+)", out)
    assert m and float(m.group(1)) < 1e-4, out
    g = re.search(r"max relative difference: (\S+)", out)
    assert g and float(g.group(1)) < 1e-3, out
    # then timed against the original: eager and compiled, original and converted
    rows = dict(re.findall(r"^  (original, eager|original, torch\.compile\(backend='aot_eager'\)|converted, eager|"
                           r"converted, torch\.compile\(backend='attnres'\))\s+(\S+) ms", out, re.M))
    assert len(rows) == 4, out
    assert all(float(ms) > 0 for ms in rows.values())


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


def test_finetune_llama_inplace():
    pytest.importorskip("transformers")
    out = run_example("finetune_llama_inplace.py", "--steps", "3", "--layers", "2", "--hidden", "32", "--batch", "4",
                      "--seq", "32")
    assert "AttnRes converted: LlamaForCausalLM" in out
    assert "still a LlamaForCausalLM; model.model.layers is a ModuleList of 2 LlamaDecoderLayers" in out
    assert "model.layers.0.attn_res.mlp.query  (32,)" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\.\d+\s+\d+\.\d+$", line)]
    assert [r[0] for r in rows] == ["1", "3"], out
    m = re.search(r"step 1 loss, \|original - AttnRes\|: (\S+)", out)
    assert m and float(m.group(1)) < 1e-5, out  # exact at init, through labels= and attention_mask
    assert float(rows[-1][2]) < float(rows[0][2])  # the converted model learns
    q = re.search(r"largest \|pseudo-query\| entry after fine-tuning: (\S+)", out)
    assert q and float(q.group(1)) > 0, out  # the queries are trained
    assert "generate (KV cache): b'" in out
    d = re.search(r"residual_rewriter.from_pretrained: LlamaForCausalLM, max \|logit diff\| (\S+)", out)
    assert d and float(d.group(1)) == 0.0, out  # the AttnRes parameters come back


def test_train_fsdp2():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = run_example("train_fsdp2.py", "--steps", "3", "--layers", "2", "--width", "32", "--batch", "4", "--seq", "32")
    assert "FSDP2 on 2 CPU processes (gloo): fully_shard on each of 2 layers, then the root" in out
    assert "DTensor (Shard(dim=0),), 16 of 32 values on rank 0" in out  # the queries are sharded with their layer
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\.\d+\s+\d+\.\d+$", line)]
    assert [r[0] for r in rows] == ["1", "3"], out
    assert float(rows[-1][1]) < float(rows[0][1])  # it learns
    m = re.search(r"max \|loss difference\| FSDP2 vs one process: (\S+)", out)
    assert m and float(m.group(1)) < 1e-4, out  # sharded training is the same training
    g = re.search(r"gathered full state dict on rank 0: 4 pseudo-queries, largest \|entry\| (\S+)", out)
    assert g and float(g.group(1)) > 0, out


# ---- examples/reproduce -----------------------------------------------------------------------------


def run_reproduce(*args: str, timeout: int = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", "examples.reproduce", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_reproduce_tiny(tmp_path):
    """The reproduction end to end at a tiny size: three variants from the same weights and batches,
    the fine-tuning comparison exact at the conversion point, JSON + markdown + PNG written."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out_dir = tmp_path / "out"
    out = run_reproduce("--quick", "--layers", "1", "--width", "16", "--seq", "16", "--batch", "2", "--steps", "4",
                        "--seeds", "2", "--finetune-steps", "2", "3", "--eval-every", "2", "--val-batches", "2",
                        "--curve-batches", "1", "--warmup", "2", "--query-lr", "0.05", "--out", str(out_dir),
                        "--cache", str(tmp_path / "cache"), "--quiet")
    import json

    res = json.loads((out_dir / "results.json").read_text())
    assert res["command"].startswith("python -m examples.reproduce --quick --layers 1")
    runs = res["compare"]["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in ("standard", "block", "full") for s in (0, 1))
    for seed in (0, 1):  # the same initial weights for the shared parameters, in every variant of a seed
        sums = {r["init_checksum"] for r in runs if r["seed"] == seed}
        assert len(sums) == 1
        first = {r["train_loss"][0] for r in runs if r["seed"] == seed}
        assert len(first) == 1  # same weights, same first batch: the same first loss (exact at init)
    assert {r["init_checksum"] for r in runs if r["seed"] == 0} != {r["init_checksum"] for r in runs if r["seed"] == 1}
    for r in runs:
        assert len(r["train_loss"]) == 4 and r["tokens"] == 4 * 2 * 16 and r["tokens_per_s"] > 0
        assert [s for s, _ in r["val"]] == [2, 4]
    block = [r for r in runs if r["variant"] == "block"]
    standard = [r for r in runs if r["variant"] == "standard"]
    assert any(b["train_loss"][-1] != s["train_loss"][-1] for b, s in zip(block, standard))  # AttnRes trained
    ft = res["finetune"]
    assert ft["pre_steps"] == 2 and ft["cont_steps"] == 3 and len(ft["exactness"]) == 4
    for e in ft["exactness"]:
        assert e["abs_diff"] < 1e-5 and e["val_abs_diff"] < 1e-5, e
    assert all(len(r["train_loss"]) == 3 for r in ft["runs"])
    summary = res["compare"]["summary"]
    for v in ("block", "full"):
        diffs = [b["final_val"] - s["final_val"] for b, s in zip(
            sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]), sorted(standard, key=lambda r: r["seed"]))]
        assert summary[v]["paired_diff"]["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-9)
    md = (out_dir / "results.md").read_text()
    assert md.count("| standard residuals |") == 2 and md.count("| Block AttnRes |") == 2
    assert "Exactness at the conversion point" in md and "![loss curves](loss_curves.png)" in md
    assert (out_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final val loss" in out


def test_reproduce_data_split_by_file(tmp_path):
    """Train and validation files never mix, the split is the same every time, and the cache is used."""
    sys.path.insert(0, str(ROOT))
    from examples.reproduce import data

    paths = [f"pkg/mod{i}.py" for i in range(400)]
    val = [p for p in paths if data.is_val(p)]
    assert 0 < len(val) < 60 and val == [p for p in paths if data.is_val(p)]
    corpus = data.load(tmp_path, log=lambda s: None)
    meta = corpus.meta
    assert meta["files"]["val"] > 0 and meta["files"]["train"] > 10 * meta["files"]["val"]
    assert corpus.train.numel() == meta["bytes"]["train"] and corpus.val.numel() == meta["bytes"]["val"]
    assert len(meta["val_files"]) == meta["files"]["val"] and all(data.is_val(f) for f in meta["val_files"])
    train, val = corpus.train.numpy().tobytes(), corpus.val.numpy().tobytes()
    for rel in meta["val_files"]:  # a (long enough to be unique) validation file is in val only
        text = (Path(meta["stdlib"]) / rel).read_bytes()
        if len(text) > 5000:
            assert text[:5000] in val and text[:5000] not in train, rel
            break
    else:
        pytest.fail("no validation file longer than 5000 bytes")
    (Path(meta["cache"]) / "val.bin").write_bytes(b"cached")  # a second load reads the cache, not the stdlib
    assert data.load(tmp_path, log=lambda s: None).val.numpy().tobytes() == b"cached"


def test_results_writeup_quotes_the_committed_results():
    """examples/reproduce/RESULTS.md quotes the tables and commands the committed runs wrote, verbatim:
    no number in it was typed by hand."""
    import json

    folder = EXAMPLES / "reproduce"
    writeup = (folder / "RESULTS.md").read_text()
    written = sorted(p for p in (folder / "results").rglob("results.json") if "quick" not in p.parts)  # (not quick/)
    assert folder / "results" / "results.json" in written and folder / "results" / "sweep" / "results.json" in written
    rows = set()
    for path in written:
        res = json.loads(path.read_text())
        assert f"`{res['command']}`" in writeup, f"RESULTS.md does not give the command of {path}"
        md = (path.parent / "results.md").read_text()
        assert res["command"] in md
        rows |= {line for line in md.splitlines() if line.startswith("| ")}
    quoted = [line for line in writeup.splitlines() if line.startswith("| ")]
    assert len(quoted) >= 10
    assert [line for line in quoted if line not in rows] == []
