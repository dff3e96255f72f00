"""The README's performance table is generated from perf/results/latest.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perf import readme_table
from perf.mesh_report import round_ratios


def test_readme_table_matches_latest_results() -> None:
    doc = json.loads(readme_table.LATEST.read_text())
    text = readme_table.README.read_text()
    assert readme_table.replace_block(text, readme_table.render(doc)) == text, (
        "README.md's performance table is stale: run `python -m perf.readme_table`"
    )


def test_every_metric_and_its_verdict_is_rendered() -> None:
    doc = {
        "generated": "2026-12-01T00:00:00+00:00",
        "benchmarks": {
            "mesh": {
                "steering": "ebpf",
                "metrics": {
                    "latency_p50": {"value": 400.0, "baseline": 500.0, "ratio": 0.8,
                                    "target": "<= 1.1", "pass": True,
                                    "unit": "microseconds (baseline: stunnel)"},
                },
            },
            "csr": {"metric": "certs/s", "value": 900.0, "unit": "certificates/s",
                    "target": 500.0, "pass": False},
        },
    }  # fmt: skip
    block = readme_table.render(doc)
    assert (
        "| mesh (ebpf steering) | latency p50 | 400 microseconds | 0.80x stunnel | <= 1.1 | ✓ |"
        in block
    )
    assert "| csr | certs/s | 900 certificates/s | - | >= 500.0 | ✗ |" in block


def test_a_readme_without_markers_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="perf-table"):
        readme_table.replace_block("# no table here\n", "x")


def test_round_ratios_pair_the_rounds() -> None:
    result = {
        "raw": {
            "samples": {
                "throughput_gbps": {"mesh/1": [2.0, 3.0], "stunnel/1": [1.0, 2.0]},
                "latency_us": {"mesh": [{"p50_us": 10.0}], "stunnel": [{"p50_us": 20.0}]},
            },
            "cpu_seconds": {"samples": {"mesh/per_gb": [1.0], "stunnel/per_gb": [4.0]}},
        }
    }
    assert round_ratios(result, "throughput_1_stream") == [2.0, 1.5]
    assert round_ratios(result, "latency_p50") == [0.5]
    assert round_ratios(result, "cpu_per_gb") == [0.25]
    assert round_ratios(result, "ztunnel_rss_10k_connections") == []
