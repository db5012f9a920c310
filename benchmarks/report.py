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

from benchmarks.suites import SUITES, Average, Run, View

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


def lookup(summary: dict, path: str):
    """summary["a"]["b"]["c"] for path "a.b.c"; None when any part is missing. "x.y - u.v" is the
    difference of two paths of the same summary (e.g. a gain over the run's own baseline)."""
    if " - " in path:
        a, b = (lookup(summary, q.strip()) for q in path.split(" - ", 1))
        return None if a is None or b is None else a - b
    node = summary
    for part in path.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def views_of(run: Run) -> tuple[View, ...]:
    """The report rows of a run: its views, or one row of best.<metric> / final.<metric>."""
    return run.views or (View(run.metric, f"best.{run.metric}", f"final.{run.metric}", run.row, run.higher_is_better),)


def values(seeds: list[dict], path: str) -> dict[int, float]:
    """seed -> the number at `path` of that seed's summary (seeds without it left out)."""
    return {s["seed"]: v for s in seeds if (v := lookup(s["summary"], path)) is not None}


def stats(best: dict[int, float], last: dict[int, float], n: int) -> dict:
    return {"best": mean_std(list(best.values())), "last": mean_std(list(last.values())), "n": n,
            "best_values": list(best.values()), "last_values": list(last.values())}


def row_stats(run: Run, seeds: list[dict], view: View | None = None) -> dict:
    v = view or views_of(run)[0]
    best, last = values(seeds, v.best), values(seeds, v.last)
    return stats(best, last, len(set(best) | set(last)))


def average_stats(avg: Average, by_id: dict[str, Run], data: dict) -> dict:
    """Per seed, the mean of the runs' primary numbers (seeds that every run has), then over seeds."""
    per_run = []
    for rid in avg.runs:
        vs = views_of(by_id[rid])
        v = next(x for x in vs if x.name == avg.view) if avg.view else vs[0]
        per_run.append((values(data.get(rid, []), v.best), values(data.get(rid, []), v.last)))
    seeds = set.intersection(*(set(b) & set(l) for b, l in per_run)) if per_run else set()
    best = {s: sum(b[s] for b, _ in per_run) / len(per_run) for s in sorted(seeds)}
    last = {s: sum(l[s] for _, l in per_run) / len(per_run) for s in sorted(seeds)}
    return stats(best, last, len(seeds))


def claim_values(name: str, path: str | None, which: str, by_id: dict, averages: dict, data: dict) -> dict:
    key = "last" if which == "final" else "best"
    if name in averages:
        return average_stats(averages[name], by_id, data)[key]
    run = by_id[name]
    if path is None:  # the run's own metric (not its first view: uscal's first view is STS12)
        path = f"{'final' if which == 'final' else 'best'}.{run.metric}"
    return mean_std(list(values(data.get(name, []), path).values()))


def fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "-" if m != m else f"{m:.2f} ± {s:.2f}"


def status_of(suite: str, run: Run | View, stats: dict, paper: dict | None, expected_seeds: int) -> str:
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
        key = run.metric if run.curve == "" else run.curve
        if key is None:
            continue
        curves = [[(r.get("epoch") or r["step"], r[key]) for r in s["metrics"] if key in r] for s in seeds]
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
    ax.set_ylabel(", ".join(sorted({r.metric if r.curve == "" else r.curve for r in runs if r.curve is not None})))
    ax.set_title(group + " (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    name = "curves_" + "".join(ch if ch.isalnum() else "_" for ch in group.lower()).strip("_") + ".png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def precisions(seeds: list[dict]) -> str:
    """The precision each seed's run used, from summary.json. Runs made before `--precision auto`
    chose bf16 on CPUs record none: on CPU they all ran in fp32 (what `auto` meant then)."""
    return ", ".join(sorted({s["summary"].get("precision", "fp32") for s in seeds})) or "-"


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def build_report(suite_name: str, runs_dir: Path, out: Path, plots: bool = True) -> str:
    suite = SUITES[suite_name]
    reported = load_reported()
    data = collect(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    machines = sorted({s["summary"].get("machine", "?") + (f" ({s['summary']['cpu']})" if "cpu" in s["summary"] else "")
                       for v in data.values() for s in v})
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
    by_id = {r.id: r for r in suite.runs}
    averages = {a.id: a for a in suite.averages}
    for group, runs in groups.items():
        lines += [f"## {group}", "", "| run | metric | seeds | precision | best | last | paper | paper source | "
                  "diff (best - paper) | status |", "|---|---|---|---|---|---|---|---|---|---|"]
        rows = [(run.id, v, row_stats(run, data.get(run.id, []), v),
                 len(run.only_seeds) if run.only_seeds is not None else len(suite.default_seeds))
                for run in runs for v in views_of(run)]
        rows += [(a.id, View("mean over runs", "", "", a.row, a.higher_is_better), average_stats(a, by_id, data),
                  len(suite.default_seeds)) for a in suite.averages if a.group == group]
        for rid, v, st, expected in rows:
            paper = reported.get(v.row) if v.row else None
            pv = f"{float(paper['value']):.2f}" if paper else "-"
            comparable = suite_name == "paper"  # other suites: other data and scale, no difference shown
            diff = f"{st['best'][0] - float(paper['value']):+.2f}" if paper and st["n"] and comparable else "-"
            src = f"{paper['source']} ({paper['dataset']}, {paper['backbone']})" if paper else "-"
            lines.append(f"| {rid} | {v.name} | {st['n']} | {precisions(data.get(rid, []))} | {fmt(st['best'])} | {fmt(st['last'])} | {pv} | {src} | "
                         f"{diff} | {status_of(suite_name, v, st, paper, expected)} |")
        if plots:
            png = plot_curves(group, runs, data, out)
            if png:
                lines += ["", f"![{group}]({png})"]
        lines.append("")
    if suite.claims:
        lines += ["## Claims checked", "", "| claim | left (mean ± std) | right (mean ± std) | holds? |", "|---|---|---|---|"]
        for c in suite.claims:
            lv = claim_values(c.left, c.left_path, c.which, by_id, averages, data)
            rv = claim_values(c.right, c.right_path, c.which, by_id, averages, data)
            key = "last" if c.which == "final" else "best"
            holds = "not run yet" if lv[0] != lv[0] or rv[0] != rv[0] else ("yes" if lv[0] > rv[0] else "no")
            label = key if c.left_path is None and c.right_path is None else f"{c.left_path or key} vs {c.right_path or key}"
            lines.append(f"| {c.text} ({label}) | {fmt(lv)} | {fmt(rv)} | {holds} |")
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
