"""fp32 against bf16 on the same seed: each method's `cpu` preset cut to a few hundred steps.

    python -m benchmarks.run --suite parity --threads 2 --results-dir benchmarks/results/parity/runs
    python -m benchmarks.parity --runs benchmarks/results/parity/runs

Prints, per method, the metric of the last and of the best evaluation in both precisions, their
difference (bf16 - fp32), and the whole run's wall time in both (evaluation and loading
included, so the ratio is below the step-time speed-up of benchmarks/speed.py). A bf16 run far
from its fp32 twin is a finding to explain. Writes parity.md beside the runs with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.suites import PARITY, _parity


def dotted(d: dict, path: str):
    for k in path.split("."):
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return d if isinstance(d, (int, float)) else None


def table(runs_dir: Path, seed: int = 0) -> list[str]:
    by_id = {r.id: r for r in _parity()}
    lines = ["| method | metric | fp32 last | bf16 last | diff last | fp32 best | bf16 best | diff best | "
             "wall fp32 (s) | wall bf16 (s) | fp32 / bf16 wall |", "|" + "---|" * 11]
    for method, _, _, metric, _ in PARITY:
        got = {}
        for prec in ("fp32", "bf16"):
            f = runs_dir / f"parity_{method}_{prec}__seed{seed}" / "summary.json"
            if f.exists():
                run = by_id[f"parity_{method}_{prec}"]
                s = json.loads(f.read_text())
                paths = (run.views[0].last, run.views[0].best) if run.views else (f"final.{metric}", f"best.{metric}")
                got[prec] = (dotted(s, paths[0]), dotted(s, paths[1]), s.get("wall_s"), s.get("precision"))
        if len(got) < 2 or None in got["fp32"][:3] or None in got["bf16"][:3]:
            lines.append(f"| {method} | {metric} | " + " | ".join(["not run"] * 9) + " |")
            continue
        (l32, b32, w32, _), (l16, b16, w16, p16) = got["fp32"], got["bf16"]
        if p16 not in (None, "bf16"):
            raise SystemExit(f"{method}: the bf16 run recorded precision {p16}")
        lines.append(f"| {method} | {metric} | {l32:.2f} | {l16:.2f} | {l16 - l32:+.2f} | {b32:.2f} | {b16:.2f} | "
                     f"{b16 - b32:+.2f} | {w32:.0f} | {w16:.0f} | {w32 / w16:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/bench/parity", help="folder holding parity_<method>_<prec>__seed0/")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    lines = table(Path(args.runs))
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("# fp32 vs bf16, same seed (python -m benchmarks.parity)\n\n"
                                  + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
