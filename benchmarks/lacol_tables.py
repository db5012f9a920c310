"""The LaCoL tables of docs/lacol.md for the memorisation regime (`lacol.py --preset cpu-mem`,
issue #28), from committed runs: the CE calibration and its gate, the warm-up chosen on the
held-out noisy labels, and LaCoL against CE on matched seeds.

    python -m benchmarks.lacol_tables                        # calibration + comparison
    python -m benchmarks.lacol_tables --runs benchmarks/results/calib/runs --calibration-only

Every number is read from a run's metrics.jsonl (one test-set evaluation per epoch, with
`holdout_noisy_acc`: accuracy on 2,000 training images held out with their noisy labels):

- last: the last epoch's test accuracy (the paper's CE numbers are last-epoch numbers);
- last10: the mean over the last 10 epochs;
- at holdout peak: test accuracy at the epoch where the held-out *noisy* accuracy is highest
  (early stopping that never sees the test set, as PES chooses its warm-up);
- best (oracle): the highest test accuracy over the epochs, chosen on the test set. It is shown
  to measure memorisation (best - last), never used for a claim.

The calibration gate (before any LaCoL run): CE at sym40 memorises, mean over seeds of
best - last >= 10 points, while CE on clean labels does not decline, mean best - last < 1 point.
The warm-up: the median over the sym40 CE seeds of the epoch where held-out noisy accuracy
peaks, rounded down (the last epoch before CE starts fitting the noise, on data it does not train on).
Matched-seed differences follow benchmarks/report.py's rule (held: mean(d) > std(d), did not
hold: mean(d) < -std(d), within noise otherwise; n >= 2).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.report import collect

PREFIX = "lacol_mem_"
GATE_MEMORISE, GATE_CLEAN = 10.0, 1.0


def run_numbers(metrics: list[dict]) -> dict | None:
    """Per-epoch evaluations -> last, last10, best (oracle) and its epoch, test accuracy at the
    held-out noisy peak and that epoch, and the selection precision of the last epoch (LaCoL)."""
    ev = [m for m in metrics if m.get("split") == "test" and "acc" in m]
    if not ev:
        return None
    acc = [m["acc"] for m in ev]
    best = max(range(len(acc)), key=acc.__getitem__)
    out = {"last": acc[-1], "last10": statistics.fmean(acc[-10:]), "best": acc[best], "best_epoch": best + 1,
           "best_minus_last": acc[best] - acc[-1], "epochs": len(acc)}
    hold = [m.get("holdout_noisy_acc") for m in ev]
    if all(h is not None for h in hold):
        peak = max(range(len(hold)), key=hold.__getitem__)  # first epoch of the highest value
        out.update(holdout_peak_epoch=peak + 1, at_holdout_peak=acc[peak])
    if ev[-1].get("selected_precision") is not None:
        out.update(sel_precision=100 * ev[-1]["selected_precision"], sel_frac=100 * ev[-1]["selected_frac"])
    return out


def ms(vals: list[float], digits: int = 2) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def verdict(d: list[float]) -> str:
    if len(d) < 2:
        return "one seed only" if d else "not run"
    m, s = statistics.fmean(d), statistics.stdev(d)
    return "held" if m > s else "did not hold" if m < -s else "within noise"


def table(rows: dict[str, dict[int, dict]], cols: list[tuple[str, str]]) -> list[str]:
    out = ["| run | seeds | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for rid, by_seed in rows.items():
        cells = [ms([v[k] for v in by_seed.values() if k in v], 1 if k.endswith("epoch") else 2) for _, k in cols]
        out.append(f"| {rid} | {','.join(map(str, sorted(by_seed)))} | " + " | ".join(cells) + " |")
    return out


def calibration(rows: dict[str, dict[int, dict]]) -> tuple[list[str], int | None]:
    sym, clean = rows.get(PREFIX + "sym40_ce", {}), rows.get(PREFIX + "clean_ce", {})
    lines = ["## CE calibration (before any LaCoL run)", ""]
    lines += table({k: v for k, v in rows.items() if k in (PREFIX + "sym40_ce", PREFIX + "clean_ce")},
                   [("best (oracle)", "best"), ("best epoch", "best_epoch"), ("last", "last"),
                    ("best - last", "best_minus_last"), ("held-out noisy peak epoch", "holdout_peak_epoch"),
                    ("test at that epoch", "at_holdout_peak")])
    lines.append("")
    per_seed = "; ".join(f"seed {s}: best {v['best']:.2f} (epoch {v['best_epoch']}), last {v['last']:.2f}, "
                         f"held-out peak epoch {v.get('holdout_peak_epoch')}" for s, v in sorted(sym.items()))
    lines.append(f"sym40 per seed: {per_seed}")
    warmup = None
    if sym:
        mem = statistics.fmean(v["best_minus_last"] for v in sym.values())
        ok = mem >= GATE_MEMORISE and len(sym) >= 3
        lines.append(f"gate 1, CE memorises at sym40 (mean best - last >= {GATE_MEMORISE:g} over >= 3 seeds): "
                     f"{mem:.2f} over {len(sym)} seeds -> {'PASS' if ok else 'FAIL'}")
        peaks = [v["holdout_peak_epoch"] for v in sym.values() if "holdout_peak_epoch" in v]
        if peaks:
            warmup = int(statistics.median(peaks))  # a half rounds down: the earlier epoch
            lines.append(f"warm-up chosen on the held-out noisy labels: median of {sorted(peaks)} = {warmup} epochs")
    if clean:
        dec = statistics.fmean(v["best_minus_last"] for v in clean.values())
        lines.append(f"gate 2, CE on clean labels does not decline (mean best - last < {GATE_CLEAN:g}): "
                     f"{dec:.2f} over {len(clean)} seeds -> {'PASS' if dec < GATE_CLEAN else 'FAIL'}")
    return lines, warmup


def comparison(rows: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["## LaCoL against CE (matched seeds)", ""]
    lines += table(rows, [("last", "last"), ("last10", "last10"), ("at held-out peak", "at_holdout_peak"),
                          ("best (oracle)", "best"), ("selection precision (last epoch)", "sel_precision"),
                          ("selected % (last epoch)", "sel_frac")])
    lines += ["", "| left - right | metric | per seed | mean ± std | verdict |", "|---|---|---|---|---|"]
    pairs = [(f"{n}_lacol", f"{n}_ce") for n in ("sym40", "asym40")]
    pairs += [("sym40_lacol", f"sym40_{a}") for a in ("wo_ms", "wo_sc", "wo_diversity")]
    for left, right in pairs:
        a, b = rows.get(PREFIX + left, {}), rows.get(PREFIX + right, {})
        seeds = sorted(set(a) & set(b))
        for metric in ("last", "last10", "at_holdout_peak"):
            d = [a[s][metric] - b[s][metric] for s in seeds if metric in a[s] and metric in b[s]]
            each = ", ".join(f"{x:+.2f}" for x in d) or "-"
            lines.append(f"| {left} - {right} | {metric} | {each} | {ms(d)} | {verdict(d)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["benchmarks/results/calib/runs", "benchmarks/results/cpu/runs"],
                    help="folders of run folders (a run found in several: the first wins)")
    ap.add_argument("--calibration-only", action="store_true")
    args = ap.parse_args(argv)
    rows: dict[str, dict[int, dict]] = {}
    for d in args.runs:
        for rid, runs in sorted(collect(Path(d)).items()):
            if rid.startswith(PREFIX):
                for r in runs:
                    nums = run_numbers(r["metrics"])
                    if nums is not None:
                        rows.setdefault(rid, {}).setdefault(r["seed"], nums)
    lines, _ = calibration(rows)
    if not args.calibration_only:
        lines += [""] + comparison(rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
