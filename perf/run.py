"""Runs every ``perf/bench_*.py`` benchmark and collects the results.

``python -m perf.run [NAME ...]`` imports each ``perf.bench_<name>`` module (all
of them, or the names given), calls its ``main()`` with no arguments, prints a
table and writes ``perf/results/latest.json`` (benches not run this time keep
their previous entry)::

    {"generated": ..., "benchmarks": {"<name>": <result>, ...}}

A bench's ``main()`` returns its result as a dict (the convention), or an exit
code after writing ``perf/results/<name>.json`` itself (older benches); that
file is then collected. One failing bench is reported and the others still
run. Exit code: 0 when every bench ran and met its targets, 1 otherwise.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from perf import readme_table

__all__ = ["discover", "main", "run_bench"]

PERF = Path(__file__).resolve().parent
RESULTS = PERF / "results"


def discover() -> list[str]:
    """Bench names (``bench_<name>.py`` files next to this one), sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in PERF.glob("bench_*.py"))


def run_bench(name: str) -> dict[str, Any]:
    """Runs one bench in this process; returns its result or the error."""
    started = time.time()
    saved_argv = sys.argv
    sys.argv = [str(PERF / f"bench_{name}.py")]
    try:
        module = importlib.import_module(f"perf.bench_{name}")
        value = module.main()
    except SystemExit as e:
        value = e.code if isinstance(e.code, int) else 1
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}", "seconds": round(time.time() - started, 1)}
    finally:
        sys.argv = saved_argv
    if isinstance(value, dict):
        return value
    written = RESULTS / f"{name}.json"
    if written.exists() and written.stat().st_mtime >= started:
        result: dict[str, Any] = json.loads(written.read_text())
        result.setdefault("exit_code", value)
        return result
    return {"error": f"main() returned {value!r} and wrote no {written.name}", "exit_code": value}


def _rows(name: str, result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(bench, metric, value, target, pass) rows for the summary table."""
    if "error" in result:
        return [(name, "-", "error", "-", result["error"][:60])]
    metrics = result.get("metrics")
    if isinstance(metrics, dict):
        rows = []
        for metric, m in metrics.items():
            value = m.get("ratio") if m.get("ratio") is not None else m.get("value")
            shown = f"{value:.3g}" + ("x" if m.get("ratio") is not None else "")
            rows.append((name, metric, shown, str(m.get("target", "-")), _yes(m.get("pass"))))
        return rows
    value = result.get("value")
    shown = f"{value:.4g}" if isinstance(value, int | float) else "-"
    return [(name, str(result.get("metric", name)), shown, str(result.get("target", "-")),
             _yes(result.get("pass")))]  # fmt: skip


def _yes(passed: object) -> str:
    return "-" if passed is None else ("yes" if passed else "NO")


def _passed(result: dict[str, Any]) -> bool:
    if "error" in result:
        return False
    metrics = result.get("metrics")
    if isinstance(metrics, dict):
        return all(m.get("pass", True) for m in metrics.values())
    return bool(result.get("pass", result.get("exit_code", 0) == 0))


def main(argv: Sequence[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or discover()
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        print(f"no such benchmark: {', '.join(unknown)} (have: {', '.join(discover())})")
        return 2
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"== bench_{name}", flush=True)
        results[name] = run_bench(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = RESULTS / "latest.json"
    try:
        previous = json.loads(latest.read_text()).get("benchmarks", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    # Benches not run this time keep their last result.
    merged = {**previous, **results}
    doc = {"generated": datetime.now(UTC).isoformat(timespec="seconds"), "benchmarks": merged}
    latest.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    rows = [row for name in names for row in _rows(name, results[name])]
    header = ("bench", "metric", "value", "target", "pass")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"wrote {latest}")
    readme_table.main([])
    print(f"updated the performance table in {readme_table.README}")
    return 0 if all(_passed(r) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
