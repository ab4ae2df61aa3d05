"""The benchmark runners' smoke mode (tiny size, Triton interpreter) so the scripts cannot rot.

These check that the scripts run and report every row, never how fast anything was: timings on a
shared machine under the interpreter say nothing (a loaded machine once gave a projected ratio of 0.48).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "attn_res" / "bench_attn_res.py"


def test_bench_smoke(tmp_path, triton_interpreter):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # smoke mode even where a GPU is present
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result,) = list(tmp_path.glob("*.json"))
    data = json.loads(result.read_text())
    assert result.with_suffix(".md").exists() and result.name.startswith("attn_res-smoke-")
    assert data["smoke"] and math.isfinite(data["copy_gbs"])
    assert data["checks"]["ours (attn_res_triton)"]["status"] == "ok"
    ours = [r for r in data["rows"] if r["impl"] == "ours (attn_res_triton)"]
    assert {r["mode"] for r in ours} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and math.isfinite(r["ms"]) for r in ours)
    # peers that cannot run here are reported, not dropped
    assert data["checks"]["liger-kernel"]["status"].startswith("skipped")


def test_bench_ops_smoke(tmp_path, triton_interpreter):
    """benchmarks/attn_res/bench_ops.py: every op the backend runs, timed alone (interpreter here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attn_res" / "bench_ops.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result,) = list(tmp_path.glob("attn_res_ops-smoke-*.json"))
    data = json.loads(result.read_text())
    ops = {r["op"].split(" (")[0] for r in data["rows"]}
    assert ops == {"phase1 fwd", "phase1 bwd", "phase2+norm fwd", "phase2+norm bwd", "phase2+add+norm fwd",
                   "phase2+add+norm bwd", "attn_res fwd", "attn_res bwd"}
    assert all(math.isfinite(r["ms"]) and r["passes"] > 0 for r in data["rows"]) and result.with_suffix(".md").exists()


def test_project_floor_smoke(tmp_path, triton_interpreter):
    """benchmarks/backend/project_floor.py (run_on_gpu.sh's `floor` step): every op timed, the emitted
    graphs priced in both modes, mix_order_reduction reported (interpreter here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "backend" / "project_floor.py"), "--smoke", "--layers", "4",
         "--num-blocks", "2", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (result,) = list(tmp_path.glob("project_floor-smoke-*.json"))
    data = json.loads(result.read_text())
    ops = {r["op"] for r in data["ops"]}
    assert {"phase1+norm fwd m=2", "phase1+norm bwd m=3", "phase1 bwd m=3", "merge+add bwd", "normed bwd (2 sources)",
            "add_linear_"} <= ops
    train, fwd = data["projection"]["training"], data["projection"]["no_grad forward"]
    # 4 layers in 2 blocks: the first block's 3 aggregations unbatched, one phase-1 call for the second
    # with its first merge fused in; under no_grad the 6 partial adds go into their GEMMs
    assert train["priced"]["attn_res_normed"] == 3 and train["priced"]["attn_res_phase1_normed"] == 1
    assert "attn_res_phase1" not in train["priced"] and "add_linear_" not in train["priced"]
    assert fwd["priced"]["add_linear_"] == 6 and "gradient-sum passes" not in fwd["priced"]
    # the ratios are reported (a GPU run reads them); their values are not a test's business
    assert math.isfinite(train["ratio"]) and math.isfinite(fwd["ratio"]) and data["mix_order_reduction"]
