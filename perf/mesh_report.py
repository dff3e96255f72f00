"""Reporting for the full-path mesh benchmark: result files, tables and the chart.

The chart shows each metric as mesh / baseline, marks whether higher or lower is
better, draws the baseline at 1.0 and each target, and puts the spread of the
per-round ratios on the bars as error bars. Its title names the steering mode,
and the run's date and commit are printed on it, so a PNG read out of context
still says what it shows.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS",
    "git_commit",
    "print_side_by_side",
    "print_table",
    "round_ratios",
    "write_outputs",
]

RESULTS = Path(__file__).resolve().parent / "results"

# metric -> (sample table, mesh key, baseline key, field of a latency sample)
_ROUND_SOURCES: dict[str, tuple[str, str, str, str | None]] = {
    "throughput_1_stream": ("throughput_gbps", "mesh/1", "stunnel/1", None),
    "throughput_4_streams": ("throughput_gbps", "mesh/4", "stunnel/4", None),
    "new_connections_per_s": ("conns_per_s", "mesh", "stunnel", None),
    "latency_p50": ("latency_us", "mesh", "stunnel", "p50_us"),
    "latency_p99": ("latency_us", "mesh", "stunnel", "p99_us"),
    "same_node_throughput": ("throughput_gbps", "mesh-same-node/1", "direct-same-node/1", None),
    "same_node_latency_p50": ("latency_us", "mesh-same-node", "direct-same-node", "p50_us"),
    "cpu_per_gb": ("cpu", "mesh/per_gb", "stunnel/per_gb", None),
    "cpu_per_1000_connections": (
        "cpu",
        "mesh/per_1000_connections",
        "stunnel/per_1000_connections",
        None,
    ),
}


def git_commit(repo: Path | None = None) -> str:
    """The checkout's short commit (with ``+dirty`` for local changes), or ``unknown``."""
    cwd = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def round_ratios(result: dict[str, Any], metric: str) -> list[float]:
    """mesh / baseline for each round of ``metric`` (empty when not recorded)."""
    source = _ROUND_SOURCES.get(metric)
    raw = result.get("raw", {})
    if source is None:
        return []
    table, mesh_key, base_key, field = source
    samples = raw.get("cpu_seconds", {}).get("samples", {}) if table == "cpu" else (
        raw.get("samples", {}).get(table, {})
    )  # fmt: skip
    mesh, base = samples.get(mesh_key, []), samples.get(base_key, [])
    out = []
    for m, b in zip(mesh, base, strict=False):
        mv, bv = (m[field], b[field]) if field else (m, b)
        if bv:
            out.append(mv / bv)
    return out


def write_outputs(result: dict[str, Any], results_dir: Path = RESULTS, name: str = "mesh") -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    latest = results_dir / "latest.json"
    try:
        doc = json.loads(latest.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("benchmarks", {})[name] = result
    doc["generated"] = result["generated"]
    latest.write_text(json.dumps(doc, indent=2) + "\n")
    _chart(result, results_dir / f"{name}.png")


def print_side_by_side(by_steering: dict[str, dict[str, Any]]) -> None:
    """The same metrics under each steering, for comparing eBPF with nftables."""
    names = list(next(iter(by_steering.values()))["metrics"])
    heads = "".join(f" {s + ' value':>14} {s + ' ratio':>12}" for s in by_steering)
    print(f"\n{'metric':30}{heads}")
    for n in names:
        row = ""
        for result in by_steering.values():
            m = result["metrics"][n]
            ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}"
            row += f" {m['value']:>14.3f} {ratio:>12}"
        print(f"{n:30}{row}")


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    names = [n for n, m in metrics.items() if m["ratio"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [4, 1]})
    ratios = [metrics[n]["ratio"] for n in names]
    targets = [float(metrics[n]["target"].split()[1]) for n in names]
    colors = ["tab:green" if metrics[n]["pass"] else "tab:red" for n in names]
    lower, upper = [], []
    for n, r in zip(names, ratios, strict=True):
        spread = round_ratios(result, n)
        lower.append(max(0.0, r - min(spread)) if spread else 0.0)
        upper.append(max(0.0, max(spread) - r) if spread else 0.0)
    x = list(range(len(names)))
    ax1.bar(x, ratios, color=colors, yerr=[lower, upper], capsize=4, ecolor="black")
    ax1.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="baseline (1.0x)")
    ax1.scatter(x, targets, marker="_", s=900, color="black", label="target", zorder=3)
    labels = []
    for n in names:
        better = "higher" if metrics[n]["target"].startswith(">=") else "lower"
        arrow = "\u2191" if better == "higher" else "\u2193"
        name = textwrap.fill(n.replace("_", " "), 14)
        labels.append(f"{name}\n{arrow} {better}\nis better")
    ax1.set_xticks(x, labels, fontsize=7)
    ax1.set_ylabel("mesh / baseline (error bars: spread over rounds)")
    steering = result.get("steering", "ebpf")
    ax1.set_title(f"Veil mesh vs baseline, {steering} steering (green: target met)")
    ax1.legend(fontsize=8)
    rss = metrics["ztunnel_rss_10k_connections"]
    ax2.bar([0], [rss["value"]], color="tab:green" if rss["pass"] else "tab:red")
    ax2.axhline(float(rss["target"].split()[1]), color="black", label="target")
    ax2.set_xticks([0], ["ztunnel RSS (MB)\n\u2193 lower is better"], fontsize=8)
    ax2.set_title(textwrap.fill(rss["unit"], 30), fontsize=7)
    ax2.legend(loc="lower right")
    host = result.get("host", {})
    fig.text(
        0.01, 0.01,
        f"{result.get('generated', '?')}  commit {result.get('commit', 'unknown')}  "
        f"{host.get('cpus', '?')} CPUs, kernel {host.get('kernel', '?')}",
        fontsize=7, color="dimgrey",
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'metric':30} {'value':>12} {'baseline':>12} {'ratio':>8} {'spread':>13} {'target':>8}  pass"
    )
    for name, m in result["metrics"].items():
        base = "-" if m["baseline"] is None else f"{m['baseline']:.3f}"
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}"
        spread = round_ratios(result, name)
        shown = f"{min(spread):.2f}-{max(spread):.2f}" if spread else "-"
        print(
            f"{name:30} {m['value']:>12.3f} {base:>12} {ratio:>8} {shown:>13} {m['target']:>8}  "
            f"{'yes' if m['pass'] else 'NO'}"
        )
    for note in result["notes"]:
        print(f"note: {note}")
