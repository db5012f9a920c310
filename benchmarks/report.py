"""Report: our mean +- std over seeds beside the paper's number, with learning curves.

    python -m benchmarks.report --suite cpu --runs runs/bench/cpu --out benchmarks/results/cpu

Reads every <run id>__seed<S>/summary.json (and metrics.jsonl for the curves) under --runs,
groups the seeds of each run id, and writes <out>/report.md and one PNG of learning curves
per table. For each row: best-epoch and last-epoch metric as mean +- std (sample std,
n-1), the number of seeds, the paper's number with its table, the difference, and a status.
The paper's numbers come from benchmarks/reported.csv only.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.suites import SUITES, Run

HERE = Path(__file__).resolve().parent


def load_reported() -> dict[str, dict]:
    with open(HERE / "reported.csv", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def collect(runs_dir: Path) -> dict[str, list[dict]]:
    """run id -> list of {seed, summary, metrics} over the seeds found."""
    out: dict[str, list[dict]] = defaultdict(list)
    for s in sorted(Path(runs_dir).glob("*__seed*/summary.json")):
        run_id, seed = s.parent.name.rsplit("__seed", 1)
        metrics_path = s.parent / "metrics.jsonl"
        metrics = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
        out[run_id].append({"seed": int(seed), "summary": json.loads(s.read_text()), "metrics": metrics})
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def row_stats(run: Run, seeds: list[dict]) -> dict:
    best = [s["summary"]["best"][run.metric] for s in seeds if s["summary"].get("best", {}).get(run.metric) is not None]
    last = [s["summary"]["final"][run.metric] for s in seeds if s["summary"].get("final", {}).get(run.metric) is not None]
    return {"best": mean_std(best), "last": mean_std(last), "n": len(seeds), "best_values": best, "last_values": last}


def fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "-" if m != m else f"{m:.2f} ± {s:.2f}"


def status_of(suite: str, run: Run, stats: dict, paper: dict | None, expected_seeds: int) -> str:
    if stats["n"] == 0:
        return "not run"
    if stats["n"] < expected_seeds:
        return f"partial ({stats['n']}/{expected_seeds} seeds)"
    if paper is None:
        return "measured (no paper number)"
    if suite != "paper":
        return "different scale: not comparable"
    diff = stats["best"][0] - float(paper["value"])
    sign = 1 if run.higher_is_better else -1
    tol = max(2 * stats["best"][1], 1.0)
    if sign * diff >= -tol:
        return "reproduced (within tolerance)" if abs(diff) <= tol else "better than paper"
    return "below paper"


def plot_curves(group: str, runs: list[Run], data: dict, out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run in runs:
        seeds = data.get(run.id, [])
        curves = [[(r.get("epoch") or r["step"], r[run.metric]) for r in s["metrics"] if run.metric in r] for s in seeds]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [c[i][0] for i in range(n) for c in curves[:1]]
        ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        lo = [min(c[i][1] for c in curves) for i in range(n)]
        hi = [max(c[i][1] for c in curves) for i in range(n)]
        (line,) = ax.plot(xs, ys, label=f"{run.id} (n={len(curves)})")
        ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel(runs[0].metric)
    ax.set_title(group + " (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    name = "curves_" + "".join(ch if ch.isalnum() else "_" for ch in group.lower()).strip("_") + ".png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def build_report(suite_name: str, runs_dir: Path, out: Path, plots: bool = True) -> str:
    suite = SUITES[suite_name]
    reported = load_reported()
    data = collect(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    machines = sorted({s["summary"].get("machine", "?") for v in data.values() for s in v})
    commits = sorted({s["summary"].get("git_commit", "?") for v in data.values() for s in v})
    lines = [f"# Benchmark report: suite `{suite_name}`", "",
             f"{suite.description}. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             f"`python -m benchmarks.report --suite {suite_name}` at commit {git_commit()}; runs made at "
             f"commit(s) {', '.join(commits) or '-'} on {', '.join(machines) or '-'}.", "",
             "Our numbers are mean ± std over seeds (sample std). *best* = the best evaluation of a run "
             "(its epoch chosen on the test set, as PES reports), *last* = the final evaluation "
             "(Co-teaching's protocol reports the mean of the last 10 epochs, also in each summary.json). "
             "Paper numbers come from `benchmarks/reported.csv`" + (" and are at the papers' scale, "
             "with other data, backbones and schedules: they are shown for orientation, never as a target."
             if suite_name != "paper" else "."), ""]
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in suite.runs:
        groups[r.group].append(r)
    for group, runs in groups.items():
        lines += [f"## {group}", "", "| run | metric | seeds | best | last | paper | paper source | diff (best - paper) | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for run in runs:
            st = row_stats(run, data.get(run.id, []))
            paper = reported.get(run.row) if run.row else None
            expected = len(run.only_seeds) if run.only_seeds is not None else len(suite.default_seeds)
            pv = f"{float(paper['value']):.2f}" if paper else "-"
            comparable = suite_name == "paper"  # other suites: other data and scale, no difference shown
            diff = f"{st['best'][0] - float(paper['value']):+.2f}" if paper and st["n"] and comparable else "-"
            src = f"{paper['source']} ({paper['dataset']}, {paper['backbone']})" if paper else "-"
            lines.append(f"| {run.id} | {run.metric} | {st['n']} | {fmt(st['best'])} | {fmt(st['last'])} | {pv} | {src} | "
                         f"{diff} | {status_of(suite_name, run, st, paper, expected)} |")
        if plots:
            png = plot_curves(group, runs, data, out)
            if png:
                lines += ["", f"![{group}]({png})"]
        lines.append("")
    if suite.claims:
        lines += ["## Claims checked", "", "| claim | left (mean ± std) | right (mean ± std) | holds? |", "|---|---|---|---|"]
        by_id = {r.id: r for r in suite.runs}
        for c in suite.claims:
            ls = row_stats(by_id[c.left], data.get(c.left, []))
            rs = row_stats(by_id[c.right], data.get(c.right, []))
            key = "last" if c.which == "final" else "best"
            if ls["n"] and rs["n"]:
                holds = "yes" if ls[key][0] > rs[key][0] else "no"
            else:
                holds = "not run yet"
            lines.append(f"| {c.text} ({key}) | {fmt(ls[key])} | {fmt(rs[key])} | {holds} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--runs", default=None, help="folder holding <run>__seed<S>/ (default runs/bench/<suite>)")
    ap.add_argument("--out", default=None, help="where report.md and the plots go (default benchmarks/results/<suite>)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    runs = Path(args.runs or f"runs/bench/{args.suite}")
    out = Path(args.out or HERE / "results" / args.suite)
    print(build_report(args.suite, runs, out, plots=not args.no_plots))
    print(f"\nwritten: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
