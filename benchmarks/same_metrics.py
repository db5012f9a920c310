"""Are two sets of runs the same, number for number? (A refactor must not change a metric.)

    python -m benchmarks.same_metrics BEFORE_DIR AFTER_DIR          # e.g. two smoke suites' folders
    python -m benchmarks.same_metrics BEFORE_DIR AFTER_DIR --only scal

Each run folder (one holding summary.json) in BEFORE_DIR is matched by name with AFTER_DIR, and
every evaluation record of metrics.jsonl and every number of summary.json is compared exactly
(==, so bit for bit), except wall-clock fields, versions, the commit and the run's own path.
Prints one line per run (same / differs: the first differing fields with both values) and exits
1 when any run differs or is missing. A field only the AFTER run has (a new diagnostic) makes the
run differ, unless `--allow-new-fields`: then the verdict is "same on every old field, +N new"
and the new field names are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

VOLATILE = {"elapsed_s", "wall_s", "samples_per_s", "train_time_s", "process_wall_s", "step_s", "versions",
            "git_commit", "machine", "torch_threads", "cpu", "cpu_bf16"}


def flat(obj, prefix: str = "") -> dict:
    """{"a.b.0": value} for every leaf of a JSON object, without the volatile fields."""
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() if k not in VOLATILE for k2, v2 in flat(v, f"{prefix}{k}.").items()}
    if isinstance(obj, list):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in flat(v, f"{prefix}{i}.").items()}
    if isinstance(obj, float) and math.isnan(obj):
        obj = "nan"
    return {prefix.rstrip("."): obj}


def run_numbers(run: Path) -> dict:
    out = flat(json.loads((run / "summary.json").read_text()), "summary.")
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for i, line in enumerate(metrics.read_text().splitlines()):
            out.update(flat(json.loads(line), f"metrics.{i}."))
    return {k: (v.replace(str(run), "<run>") if isinstance(v, str) else v) for k, v in out.items()}


def compare(before: Path, after: Path, only: list[str] | None = None,
            allow_new: bool = False) -> list[tuple[str, str]]:
    rows = []
    for s in sorted(before.rglob("summary.json")):
        name = s.parent.name
        if only and not any(o in name for o in only):
            continue
        other = next(iter(after.rglob(f"{name}/summary.json")), None)
        if other is None:
            rows.append((name, "missing in " + str(after)))
            continue
        a, b = run_numbers(s.parent), run_numbers(other.parent)
        a = {k: v for k, v in a.items() if not isinstance(v, str) or k.endswith(("method", "split", "setting"))}
        b = {k: v for k, v in b.items() if not isinstance(v, str) or k.endswith(("method", "split", "setting"))}
        new = sorted(set(b) - set(a)) if allow_new else []
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted((set(a) | set(b)) - set(new))
                if a.get(k) != b.get(k)]
        names = sorted({k.split(".")[-1] if not k.split(".")[-1].isdigit() else k.split(".")[-2] for k in new})
        same = "same" if not new else f"same on every old field, +{len(new)} new ({', '.join(names)})"
        rows.append((name, same if not diff else f"differs ({len(diff)}): " + "; ".join(diff[:4])))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--only", nargs="*", help="runs whose name contains one of these strings")
    ap.add_argument("--allow-new-fields", action="store_true", help="fields only AFTER has do not count as a change")
    args = ap.parse_args(argv)
    rows = compare(args.before, args.after, args.only, args.allow_new_fields)
    for name, verdict in rows:
        print(f"{name:55s} {verdict}")
    bad = sum(not v.startswith("same") for _, v in rows)
    print(f"{len(rows) - bad} of {len(rows)} runs identical" + ("" if rows else " (no runs found)"))
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
