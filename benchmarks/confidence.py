"""CoNLST's Figure 3 for the report: clean vs noisy pseudo-labels per confidence, one panel per
stage, drawn from the bins conlst.py records in summary.json (`per_lang.<lang>.bins`, computed
by common.diagnostics.analysis_only_confidence_bins).

    python -m benchmarks.confidence RUN_DIR [RUN_DIR ...]     # confidence_<lang>.png into each run

The report (benchmarks/report.py) draws one figure per run id and language, its seeds pooled:
the histograms summed, each bin's accuracy over all its pairs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

POINTS = ("after_stage0", "after_stage1", "after_stage2")
BINS = ("high", "mid", "low")


def pool_bins(per_seed: list[dict]) -> dict:
    """The bins of several seeds as one: counts and histograms summed, each accuracy weighted by
    the number of pairs in its bin (None where no seed has a pair there)."""
    out: dict = {}
    for point in POINTS:
        runs = [b[point] for b in per_seed if point in b]
        if not runs:
            continue
        out[point] = {}
        for name in (*BINS, "all"):
            n = sum(r[name]["n"] for r in runs)
            acc = sum(r[name]["acc"] * r[name]["n"] for r in runs if r[name]["n"]) / n if n else None
            out[point][name] = {"n": n, "acc": acc}
        out[point]["hist"] = {"edges": runs[0]["hist"]["edges"],
                              **{k: [sum(v) for v in zip(*(r["hist"][k] for r in runs))] for k in ("clean", "noisy")}}
    return out


def plot_confidence(path: Path, title: str, bins: dict[str, dict], analysed_on: str) -> bool:
    """Figure 3 style: clean vs noisy pseudo-labels per confidence, one panel per stage. False
    (nothing written) when `bins` holds no stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = [p for p in POINTS if p in bins]
    if not points:
        return False
    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.2), squeeze=False)
    for ax, point in zip(axes[0], points):
        h = bins[point]["hist"]
        edges = np.array(h["edges"])
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], h["clean"], width=width, align="edge", color="tab:blue", label="clean")
        ax.bar(edges[:-1], h["noisy"], width=width, align="edge", color="tab:orange", bottom=h["clean"], label="noisy")
        acc = " / ".join("-" if bins[point][k]["acc"] is None else f"{bins[point][k]['acc']:.1f}" for k in BINS)
        ax.set_title(f"{title} {point.replace('_', ' ')}\npseudo-label acc high / mid / low: {acc}", fontsize=9)
        ax.set_xlabel("confidence max q")
        ax.axvline(0.5, color="gray", lw=0.5)
        ax.axvline(0.9, color="gray", lw=0.5)
    axes[0][0].set_ylabel(f"samples ({analysed_on} set)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return True


def report_figures(data: dict[str, list[dict]], out: Path) -> list[str]:
    """For the report: one figure per run id and language whose bins cover two stages or more
    (before and after a stage), the seeds pooled; returns the markdown lines (none without such runs)."""
    lines = []
    for run_id, seeds in sorted(data.items()):
        langs = sorted({lang for s in seeds for lang in (s["summary"].get("per_lang") or {})})
        for lang in langs:
            per_seed = [p for s in seeds if isinstance(p := (s["summary"].get("per_lang") or {}).get(lang), dict)]
            bins = pool_bins([p["bins"] for p in per_seed if p.get("bins")])
            if len(bins) < 2:
                continue
            name = f"confidence_{run_id}_{lang}.png"
            on = "/".join(sorted({p.get("bins_on", "?") for p in per_seed}))
            if plot_confidence(out / name, f"{run_id} {lang} ({len(per_seed)} seeds)", bins, on):
                lines.append(f"![{run_id} {lang}]({name})")
    return ["## Confidence of the pseudo-labels (CoNLST Figure 3)", "", *lines, ""] if lines else []


def main(argv: list[str] | None = None) -> int:
    for run in map(Path, sys.argv[1:] if argv is None else argv):
        summary = json.loads((run / "summary.json").read_text())
        for lang, res in (summary.get("per_lang") or {}).items():
            if res.get("bins") and plot_confidence(run / f"confidence_{lang}.png", lang, res["bins"],
                                                   res.get("bins_on", "?")):
                print(run / f"confidence_{lang}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
