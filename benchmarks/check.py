"""Regression check: fresh results against a committed baseline.

    python -m benchmarks.run --suite smoke && python -m benchmarks.check --suite smoke
    python -m benchmarks.check --suite smoke --update      # explicit: rewrite the baseline

Each run of the suite names the numbers it checks (`checks` in benchmarks/suites.py; default: its
final metric): a quality metric (the final accuracy, F1, Spearman) may not get worse, a diagnostic
of the method (a loss term's value at the end, the precision of a selection) may not move either
way, by more than the tolerance

    tol = max(K_STD * baseline seed std, floor)

(K_STD = 3; the floor is per number, 2.0 for a metric in points: a change of library version
moves a smoke run by about a point). The mean over the fresh seeds is compared with the baseline's
mean. A run with one baseline seed has no spread of its own: it takes the largest seed std of
the same number among the runs of its group (the same script and schedule) that have several
seeds. A missing run fails the check too. The baseline changes only through `--update`, never as a
side effect.

A run marked `compare=False` in its suite is crash-only: its metric sits at chance (a tiny random
model after a few steps), where no regression can show, so the check asks only that it finished
with a finite metric and says so in its output instead of claiming a comparison it cannot make.

Output: one line per run and number (baseline, fresh, tolerance); a failing number's line names
the metric, the baseline, the tolerance and the run folders, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from benchmarks.report import collect, git_commit, lookup, views_of
from benchmarks.suites import SUITES, Check, Run

HERE = Path(__file__).resolve().parent
K_STD = 3.0
FLOOR = 2.0


def checks_of(run: Run) -> tuple[Check, ...]:
    """The numbers the check compares for `run`: its `checks`, or the last value of its first report
    view (its final metric) in that view's direction."""
    v = views_of(run)[0]
    return run.checks or (Check(run.metric, v.last, "higher" if v.higher_is_better else "lower"),)


def read(seed: dict, path: str):
    """The number at `path` for one seed of collect(): "log.<key>" is <key> of the last metrics.jsonl
    record that has it, "logmean.<key>" the mean over every record that has it (a diagnostic logged
    every few steps, steadier than its last value); anything else is a dotted path in summary.json."""
    if path.startswith("log."):
        key = path[4:]
        v = next((r[key] for r in reversed(seed["metrics"]) if r.get(key) is not None), None)
    elif path.startswith("logmean."):
        vals = [r[path[8:]] for r in seed["metrics"] if isinstance(r.get(path[8:]), (int, float))]
        v = statistics.fmean(vals) if vals else None
    else:
        v = lookup(seed["summary"], path)
    return v if isinstance(v, (int, float)) else None


def _stats(vals: list[float]) -> dict:
    return {"values": vals, "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def fresh_values(suite: str, runs_dir: Path) -> dict[str, dict]:
    """run id -> {metric, higher_is_better, values, mean, std (of the final metric), dirs, checks:
    {name: {path, direction, floor, values, mean, std}}} for each run of the suite found in runs_dir."""
    data = collect(runs_dir)
    out = {}
    for run in SUITES[suite].runs:
        seeds = data.get(run.id, [])
        first = checks_of(run)[0]
        vals = [v for s in seeds if (v := read(s, first.path)) is not None]
        if not vals:
            continue
        checks = {}
        for c in checks_of(run):
            cv = [v for s in seeds if (v := read(s, c.path)) is not None]
            checks[c.name] = {"path": c.path, "direction": c.direction, "floor": c.floor,
                              **(_stats(cv) if cv else {"values": [], "mean": float("nan"), "std": 0.0})}
        out[run.id] = {"metric": run.metric, "higher_is_better": run.higher_is_better, **_stats(vals),
                       "dirs": [str(Path(runs_dir) / f"{run.id}__seed{s['seed']}") for s in seeds], "checks": checks}
    return out


def base_checks(b: dict, floor: float) -> dict[str, dict]:
    """A baseline run's checks; a baseline written before `checks` existed has its final metric only."""
    return b.get("checks") or {b["metric"]: {"path": f"final.{b['metric']}", "floor": floor,
                                             "direction": "higher" if b.get("higher_is_better", True) else "lower",
                                             "values": b.get("values", []), "mean": b["mean"], "std": b["std"]}}


def seed_spread(baseline: dict, groups: dict[str, str], floor: float = FLOOR) -> dict[tuple[str, str], float]:
    """(run id, check name) -> the baseline seed std; a one-seed run takes the largest std of the same
    check among its group's several-seed runs (0 when there is none)."""
    runs = {rid: base_checks(b, floor) for rid, b in baseline["runs"].items()}
    multi = {(rid, n): c["std"] for rid, cs in runs.items() for n, c in cs.items() if len(c.get("values", [])) > 1}
    out = {}
    for rid, cs in runs.items():
        for n in cs:
            g = groups.get(rid)
            out[rid, n] = multi.get((rid, n), max((sd for (o, on), sd in multi.items()
                                                   if on == n and g is not None and groups.get(o) == g), default=0.0))
    return out


def tolerance(c: dict, spread: float, k_std: float) -> float:
    return max(k_std * spread, c.get("floor", FLOOR))


def worse_by(c: dict, fresh: float) -> float:
    """How far `fresh` moved in the direction that fails (a diagnostic: either way)."""
    d = fresh - c["mean"]
    return {"higher": -d, "lower": d}.get(c.get("direction", "higher"), abs(d))


def check(baseline: dict, fresh: dict, floor: float = FLOOR, k_std: float = K_STD,
          groups: dict[str, str] | None = None, crash_only: set[str] | frozenset = frozenset(),
          spread_from: dict | None = None) -> list[str]:
    """Return one line per problem (empty: the check passes). `groups`: run id -> its group;
    `crash_only`: run ids checked only for a finite fresh metric; `spread_from`: the baseline whose
    seed spreads set the tolerances (default `baseline`; a check of some rows passes the whole one)."""
    problems = []
    spread = seed_spread(spread_from or baseline, groups or {}, floor)
    for run_id, base in baseline["runs"].items():
        f = fresh.get(run_id)
        if f is None:
            problems.append(f"{run_id}: no fresh result")
            continue
        where = ", ".join(f.get("dirs", [])) or "(run folders not recorded)"
        if not all(math.isfinite(v) for v in f.get("values", [f["mean"]])):
            problems.append(f"{run_id}: {base['metric']} is not finite ({f.get('values')}) in {where}")
            continue
        if run_id in crash_only:
            continue
        fc = f.get("checks") or {base["metric"]: {"mean": f["mean"], "values": f.get("values", [f["mean"]])}}
        for name, c in base_checks(base, floor).items():
            got = fc.get(name)
            if got is None or not got.get("values") or not math.isfinite(got["mean"]):
                problems.append(f"{run_id}: {name} ({c['path']}) missing or not finite in {where}")
                continue
            tol = tolerance(c, spread.get((run_id, name), 0.0), k_std)
            bad = worse_by(c, got["mean"])
            if bad > tol:
                how = {"higher": "fell", "lower": "rose"}.get(c.get("direction", "higher"), "moved")
                problems.append(f"{run_id}: {name} ({c['path']}) {got['mean']:.4g} vs baseline {c['mean']:.4g}: "
                                f"{how} by {bad:.4g} > tolerance {tol:.4g} "
                                f"(3 x seed std, floor {c.get('floor', floor):g}); runs: {where}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="smoke", choices=sorted(SUITES))
    ap.add_argument("--runs", default=None, help="default runs/bench/<suite>")
    ap.add_argument("--baseline", default=None, help="default benchmarks/baselines/<suite>.json")
    ap.add_argument("--update", action="store_true", help="write the fresh results as the new baseline")
    args = ap.parse_args(argv)
    runs = Path(args.runs or f"runs/bench/{args.suite}")
    base_path = Path(args.baseline or HERE / "baselines" / f"{args.suite}.json")
    fresh = fresh_values(args.suite, runs)
    if args.update:
        if not fresh:
            print(f"no results under {runs}: nothing to write", file=sys.stderr)
            return 1
        base_path.parent.mkdir(parents=True, exist_ok=True)
        created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        keep = {rid: {k: v for k, v in f.items() if k != "dirs"} for rid, f in fresh.items()}
        base_path.write_text(json.dumps({"suite": args.suite, "created": created,
                                         "commit": git_commit(), "k_std": K_STD, "floor": FLOOR, "runs": keep},
                                        indent=2, sort_keys=True) + "\n")
        print(f"baseline written: {base_path} ({len(fresh)} runs)")
        return 0
    if not base_path.exists():
        print(f"no baseline {base_path}; create one with --update", file=sys.stderr)
        return 1
    baseline = json.loads(base_path.read_text())
    floor, k_std = baseline.get("floor", FLOOR), baseline.get("k_std", K_STD)
    groups = {r.id: r.group for r in SUITES[args.suite].runs}
    crash_only = {r.id for r in SUITES[args.suite].runs if not r.compare}
    problems = check(baseline, fresh, floor, k_std, groups, crash_only)
    problems += [f"{rid}: in the suite but not in the baseline (add it with --update)"
                 for rid in sorted(set(groups) - set(baseline["runs"]))]
    spread = seed_spread(baseline, groups, floor)
    for run_id, base in sorted(baseline["runs"].items()):
        f = fresh.get(run_id)
        if run_id in crash_only:
            print(f"{run_id:40s} {base['metric']:>22s} " + (f"fresh {f['mean']:9.4g}" if f else "missing")
                  + "   crash-only (at chance)")
            continue
        fc = (f or {}).get("checks") or ({base["metric"]: f} if f else {})
        for name, c in base_checks(base, floor).items():
            got = fc.get(name)
            tol = tolerance(c, spread.get((run_id, name), 0.0), k_std)
            print(f"{run_id:40s} {name:>22s} baseline {c['mean']:9.4g} ± {c['std']:<8.3g} fresh "
                  + (f"{got['mean']:9.4g}" if got and got.get("values") else "  missing")
                  + f"   tolerance {tol:.3g} ({c.get('direction', 'higher')})")
    if problems:
        print("REGRESSION:\n  " + "\n  ".join(problems))
        return 1
    n_cmp = len(set(baseline["runs"]) - crash_only)
    print(f"check passed: {n_cmp} runs within tolerance of {base_path.name}, "
          f"{len(baseline['runs']) - n_cmp} crash-only runs finished with a finite metric")
    return 0


if __name__ == "__main__":
    sys.exit(main())
