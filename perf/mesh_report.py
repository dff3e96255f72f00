"""Reporting for the full-path mesh benchmark: result files, tables and the chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "print_side_by_side", "print_table", "write_outputs"]

RESULTS = Path(__file__).resolve().parent / "results"


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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ratios = [metrics[n]["ratio"] for n in names]
    targets = [float(metrics[n]["target"].split()[1]) for n in names]
    colors = ["tab:green" if metrics[n]["pass"] else "tab:red" for n in names]
    x = range(len(names))
    ax1.bar(x, ratios, color=colors)
    ax1.scatter(x, targets, marker="_", s=900, color="black", label="target", zorder=3)
    ax1.set_xticks(list(x), [n.replace("_", "\n") for n in names], fontsize=8)
    ax1.set_ylabel("mesh / baseline")
    ax1.set_title("Veil mesh vs baseline (green: target met)")
    ax1.legend()
    rss = metrics["ztunnel_rss_10k_connections"]
    ax2.bar([0], [rss["value"]], color="tab:green" if rss["pass"] else "tab:red")
    ax2.axhline(float(rss["target"].split()[1]), color="black", label="target")
    ax2.set_xticks([0], ["ztunnel RSS\n(MB)"])
    ax2.set_title(rss["unit"], fontsize=8)
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    print(f"{'metric':30} {'value':>12} {'baseline':>12} {'ratio':>8} {'target':>8}  pass")
    for name, m in result["metrics"].items():
        base = "-" if m["baseline"] is None else f"{m['baseline']:.3f}"
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}"
        print(
            f"{name:30} {m['value']:>12.3f} {base:>12} {ratio:>8} {m['target']:>8}  "
            f"{'yes' if m['pass'] else 'NO'}"
        )
    for note in result["notes"]:
        print(f"note: {note}")
