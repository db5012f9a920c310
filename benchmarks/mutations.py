"""Does the regression check catch real bugs? (issue #27) Each mutation is one realistic one-line
bug (a flipped sign, a missing detach, a wrong temperature, an off-by-one, a dropped term) applied
to a copy of the working tree; the smoke rows it should break run on that copy, and
`benchmarks.check` compares them with benchmarks/baselines/smoke.json as CI would.

    python -m benchmarks.mutations --list                       # the mutations and their rows
    python -m benchmarks.mutations --only lacol --out benchmarks/results/mutations

A mutation names an exact fragment of one line of one file; it must occur exactly once in that
file, or the run stops with an error (the list must follow the code, never silently test
nothing). The matrix (mutation x row: caught or not) is written to <out>/matrix.md and
<out>/matrix.json. Slow (a smoke row per mutation and seed): not part of the test command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import check as chk
from benchmarks.suites import SUITES

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str  # an exact fragment, found exactly once in `file`
    new: str
    what: str  # the bug, in words
    rows: tuple[str, ...]  # the smoke run ids expected to catch it


L = ("lacol_smoke_lacol",)
MUTATIONS: list[Mutation] = [
    Mutation("lacol_infonce_sign", "lacol.py", "pos = (z_anchor * z_pos).sum(1, keepdim=True) / tau",
             "pos = -(z_anchor * z_pos).sum(1, keepdim=True) / tau", "Eq. 2: the positive's similarity negated", L),
    Mutation("lacol_select_inverted", "lacol.py", "return probs_weak.argmax(dim=1) == given",
             "return probs_weak.argmax(dim=1) != given", "Eq. 3: selects the samples the model disagrees with", L),
    Mutation("lacol_sc_tau", "lacol.py", "return F.log_softmax(s / tau, dim=1)", "return F.log_softmax(s * tau, dim=1)",
             "Eq. 6: temperature multiplied instead of divided", L),
    Mutation("lacol_diversity_swapped", "lacol.py", "ls_logits = lw if args.wo_diversity else ls1",
             "ls_logits = ls1 if args.wo_diversity else lw", "L_LS trains on the weak view that selected (the "
             "w/o-diversity branch swapped)", L),
    Mutation("lacol_ms_dropped", "lacol.py", "loss = loss + args.lambda_ms * terms[\"l_ms\"]", "loss = loss",
             "L_MS computed and logged but left out of the total", L),
    Mutation("lacol_negatives_same_label", "lacol.py", "allowed = given[None, :] != given[:, None]",
             "allowed = given[None, :] == given[:, None]", "Eq. 1: negatives drawn from the anchor's own label", L),
]


def apply(m: Mutation, root: Path) -> None:
    """Write the mutation into root/m.file; raises ValueError unless m.old occurs exactly once."""
    path = root / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise ValueError(f"{m.id}: the fragment occurs {n} times in {m.file} (must be once): {m.old!r}")
    path.write_text(text.replace(m.old, m.new))


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked-not-ignored files (no runs, no venv) into dst."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def caught_rows(baseline: dict, fresh: dict, rows: tuple[str, ...], crash_only: set[str],
                groups: dict[str, str]) -> dict[str, str]:
    """row -> the check's problem line for it ("" where the check passes that row)."""
    base = {**baseline, "runs": {r: baseline["runs"][r] for r in rows if r in baseline["runs"]}}
    problems = chk.check(base, fresh, baseline.get("floor", chk.FLOOR), baseline.get("k_std", chk.K_STD), groups,
                         crash_only, spread_from=baseline)
    return {r: next((p for p in problems if p.startswith(r + ":")), "") for r in rows}


def run_mutation(m: Mutation, seeds: list[int], work: Path, baseline: dict) -> dict:
    tree = work / m.id
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    copy_tree(tree)
    apply(m, tree)
    env = {**os.environ, "LIS_SHARED_DATA": os.environ.get("LIS_SHARED_DATA", str(ROOT.parent / "shared" / "data"))}
    out = tree / "runs"
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--only", *m.rows, "--seeds",
           *map(str, seeds), "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    fresh = chk.fresh_values("smoke", out / "smoke")
    suite = SUITES["smoke"]
    crash_only = {r.id for r in suite.runs if not r.compare}
    caught = caught_rows(baseline, fresh, m.rows, crash_only, {r.id: r.group for r in suite.runs})
    crashed = [r for r in m.rows if r not in fresh]
    for r in crashed:  # a run that crashed is caught too: CI fails on a failed smoke run
        caught[r] = caught[r] or f"{r}: the run failed (exit {proc.returncode})"
    shutil.rmtree(tree, ignore_errors=True)
    return {**asdict(m), "caught": caught, "any_caught": any(caught.values()),
            "fresh": {r: fresh[r]["mean"] for r in fresh}}


def matrix_md(results: list[dict]) -> str:
    lines = ["| mutation | bug | row | caught | check's line |", "|---|---|---|---|---|"]
    for res in results:
        for row, why in res["caught"].items():
            lines.append(f"| `{res['id']}` | {res['what']} | `{row}` | {'yes' if why else '**no**'} | {why or '-'} |")
    n = sum(r["any_caught"] for r in results)
    lines += ["", f"caught: {n} of {len(results)} mutations"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", nargs="*", help="mutations whose id contains one of these strings")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="as the baseline's (default 0 1)")
    ap.add_argument("--out", default=None, help="write matrix.md and matrix.json here")
    ap.add_argument("--work", default=None, help="scratch folder for the mutated copies (default: a temp dir)")
    args = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if not args.only or any(s in m.id for s in args.only)]
    if args.list:
        for m in todo:
            print(f"{m.id:32s} {m.file:12s} {m.what}  -> {', '.join(m.rows)}")
        return 0
    for m in todo:  # every mutation must apply before anything runs
        text = (ROOT / m.file).read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"{m.id}: the fragment occurs {text.count(m.old)} times in {m.file} (must be once)")
    baseline = json.loads((ROOT / "benchmarks" / "baselines" / "smoke.json").read_text())
    work = Path(args.work or tempfile.mkdtemp(prefix="mutations-"))
    results = []
    for i, m in enumerate(todo, 1):
        res = run_mutation(m, args.seeds, work, baseline)
        print(f"[{i}/{len(todo)}] {m.id}: {'caught' if res['any_caught'] else 'NOT caught'}", flush=True)
        results.append(res)
    md = matrix_md(results)
    print(md)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "matrix.md").write_text(md)
        (Path(args.out) / "matrix.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
