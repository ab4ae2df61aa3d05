"""Run the property-based suite over many generated architectures and summarise the outcomes.

    python benchmarks/convert/generated_sweep.py --examples 5000

Runs ``tests/test_generated_architectures.py`` with ``RR_GENERATED_EXAMPLES`` examples drawn at
random (not the CI's fixed ones), collects one outcome per example, prints a table (converted /
refused, by style) and writes it with the raw outcomes to ``benchmarks/results/``. Exits non-zero
when the suite found a failing example (hypothesis prints the minimal one: add it to ``FOUND``)."""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def summarise(rows: list[dict]) -> str:
    lines = [f"{len(rows)} examples: " + ", ".join(f"{n} {k}" for k, n in collections.Counter(r["outcome"] for r in rows).items())]
    must = [r for r in rows if r["must_convert"]]
    lines.append(f"pre-norm single-stream (must convert): {len(must)}, converted {sum(r['outcome'] == 'converted' for r in must)}")
    kinds = collections.Counter((re.search(r"refuse='(\w+)'", r["spec"]) or [None, "none"])[1] for r in rows)
    for kind, n in sorted(kinds.items()):
        of_kind = [r for r in rows if f"refuse='{kind}'" in r["spec"] or (kind == "none" and "refuse=" not in r["spec"])]
        lines.append(f"  {kind:<16} {n:>5} examples, converted {sum(r['outcome'] == 'converted' for r in of_kind):>5}, "
                     f"refused {sum(r['outcome'] == 'refused' for r in of_kind):>5}")
    reasons = collections.Counter(r["reason"][:110] for r in rows if r["outcome"] == "refused")
    lines.append("refusal reasons (first line):")
    lines += [f"  {n:>5}  {reason}" for reason, n in reasons.most_common(12)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = Path(tmp) / "outcomes.jsonl"
        env = {**os.environ, "RR_GENERATED_EXAMPLES": str(args.examples), "RR_GENERATED_SUMMARY": str(outcomes),
               "RR_GENERATED_RANDOM": "1"}
        start = time.time()
        test = "tests/test_generated_architectures.py::test_generated_models_convert_exactly_or_are_refused_clearly"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=REPO, env=env,
                             capture_output=True, text=True)
        seconds = time.time() - start
        rows = [json.loads(line) for line in outcomes.read_text().splitlines()] if outcomes.exists() else []
    table = summarise(rows) + f"\n{seconds:.0f} s; pytest exit code {run.returncode}"
    print(run.stdout[-3000:] if run.returncode else "", table, sep="\n")
    stamp = datetime.date.today().isoformat()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"generated-architectures-{args.examples}-{stamp}"
    out.with_suffix(".txt").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"examples": args.examples, "seconds": seconds,
                                                    "exit_code": run.returncode, "rows": rows}, indent=1))
    print(f"wrote {out}.txt / .json")
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
