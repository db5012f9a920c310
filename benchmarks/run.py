"""Run a suite: expand suite x seeds into script invocations and run them.

    python -m benchmarks.run --suite cpu --seeds 0 1 2 --only lacol
    python -m benchmarks.run --suite paper --dry-run           # print every command
    python -m benchmarks.run --suite paper --launcher slurm --slurm-partition gpu

Each run writes to <out-dir>/<suite>/<run id>__seed<S>/. A run whose summary.json exists is
skipped, one with a checkpoint but no summary is resumed (`--resume`), so an interrupted
benchmark continues where it stopped. A finished or started run whose args.json disagrees with
an argument the suite now gives it explicitly is "stale" and runs again from the start (its new
files replace the old). A failed run is recorded in failures.jsonl (command,
exit code, the end of its stderr) and the others go on. `--results-dir` copies each finished
run's small files (args, metrics, summary) there, e.g. benchmarks/results/cpu/runs/, so they
can be committed as they complete; a run already there is skipped too, so a benchmark spread
over several machines or sessions continues from what was committed.

A run whose arguments name another run's folder (`{out}/<id>__seed<S>`: conlst.py's
--stage0-from, MSMO-Distill's --teachers) waits for that run. Checkpoints are never
committed, so when the run it needs is only in --results-dir it is run again first to rebuild
its model; the rerun's metrics are compared with the committed ones and the committed files
are left as they are. Every rerun gets a line in <results-dir>/../reruns/reruns.jsonl. The
rerun is the model the later run reads, so when it differs its small files are kept there too,
in reruns/<run>__<time>/, to be committed with the run that used it (a rerun in another
session can differ from the committed run).

`--launcher slurm` submits the same runs (one job each, through submitit) with the same
skip/stale rules, a dependent run held until the jobs it needs end well (`afterok`). The
cluster jobs do not copy into --results-dir; run the same command with the local launcher
afterwards and it skips the finished runs and copies their small files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import threading
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.suites import SUITES, Run

ROOT = Path(__file__).resolve().parent.parent
SMALL_FILES = ("args.json", "data_subsets.json", "metrics.jsonl", "summary.json")
THREADS: int | None = None  # --threads


def run_dir(out: Path, run: Run, seed: int) -> Path:
    return out / f"{run.id}__seed{seed}"


def expand(suite: str, seeds: list[int] | None, only: list[str] | None) -> list[tuple[Run, int]]:
    """seeds x suite, filtered by --only (substrings of the run id)."""
    s = SUITES[suite]
    out = []
    # seed-major within a phase: every row has a first seed early on; a later phase (runs that
    # read other runs' outputs, e.g. MSMO-Distill's teachers) starts after all seeds of the earlier
    for phase, seed in sorted((p, sd) for p in {r.phase for r in s.runs} for sd in (seeds or s.default_seeds)):
        for run in (r for r in s.runs if r.phase == phase):
            if only and not any(o in run.id for o in only):
                continue
            if run.only_seeds is not None and seed not in run.only_seeds:
                continue
            out.append((run, seed))
    return out


def command(run: Run, seed: int, out: Path, python: str = sys.executable) -> list[str]:
    """The script invocation of one run; a started run with a checkpoint is resumed."""
    d = run_dir(out, run, seed)
    script = run.script.split()
    if (d / "checkpoint.pt").exists() and not (d / "summary.json").exists():
        return [python, *script, "--resume", str(d)]
    args = [a.replace("{seed}", str(seed)).replace("{out}", str(out)) for a in run.args]
    return [python, *script, *args, "--seed", str(seed), "--out-dir", str(out), "--exp-name", d.name]


NEEDS = re.compile(r"\{out\}/([A-Za-z0-9_.-]+?)__seed(\{seed\}|\d+)")


def needs(run: Run, seed: int) -> list[tuple[str, int]]:
    """The (run id, seed) pairs whose output folders this run's arguments name."""
    found = []
    for a in run.args:
        for rid, sd in NEEDS.findall(a):
            key = (rid, seed if sd == "{seed}" else int(sd))
            if key not in found:
                found.append(key)
    return found


def _same(expected: list[str], got) -> bool:
    """Does a value of args.json equal what the command line gave (tokens after the flag)?"""
    if isinstance(got, bool):
        return got == ((expected or ["true"])[0].lower() in ("true", "1", "yes"))
    if isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(_same([e], g) for e, g in zip(expected, got))
    if len(expected) != 1:
        return False
    if isinstance(got, (int, float)):
        try:
            return float(expected[0]) == float(got)
        except ValueError:
            return False
    return str(got) == expected[0]


def stale_args(run: Run, seed: int, d: Path) -> list[str]:
    """The arguments the suite gives this run explicitly whose value in the finished run's
    args.json differs: the suite changed after the run was made (a preset's own contents are
    not checked). Values naming {out} are left out, since the output folder may move."""
    try:
        recorded = json.loads((d / "args.json").read_text())
    except (OSError, ValueError):
        return []
    given: dict[str, list[str]] = {}
    key = None
    for a in run.args:
        if a.startswith("--"):
            key = a[2:].replace("-", "_")
            given[key] = []
        elif key is not None:
            given[key].append(a.replace("{seed}", str(seed)))
    return [f"--{k.replace('_', '-')}: {recorded[k]!r} in the run, {' '.join(v) or 'true'} in the suite"
            for k, v in given.items()
            if k in recorded and not any("{out}" in t for t in v) and not _same(v, recorded[k])]


def status(run: Run, seed: int, out: Path, results_dir: Path | None = None) -> str:
    """todo, done (summary.json in out), resume (a checkpoint, no summary), committed (only in
    results_dir), or stale (finished or started with arguments the suite no longer gives: run
    again from the start)."""
    d = run_dir(out, run, seed)
    if (d / "summary.json").exists():
        return "stale" if stale_args(run, seed, d) else "done"
    if (d / "checkpoint.pt").exists():
        return "stale" if stale_args(run, seed, d) else "resume"
    if results_dir is not None and (results_dir / d.name / "summary.json").exists():
        return "stale" if stale_args(run, seed, results_dir / d.name) else "committed"
    return "todo"


def schedule(jobs: list[tuple[Run, int]], suite: str, out: Path, results_dir: Path | None,
             ) -> tuple[list[tuple[Run, int]], set[tuple[str, int]]]:
    """The jobs with the runs they need put before them. A needed run that is only committed
    (its folder, with the model, is not in `out`) must run again: it is returned in `rerun`."""
    by_id = {r.id: r for r in SUITES[suite].runs}
    ordered: list[tuple[Run, int]] = []
    rerun: set[tuple[str, int]] = set()

    def add(run: Run, seed: int, chain: tuple = ()) -> None:
        if any((r.id, s) == (run.id, seed) for r, s in ordered):
            return
        if status(run, seed, out, results_dir) not in ("done", "committed"):
            for rid, sd in needs(run, seed):
                if rid not in by_id or (rid, sd) in chain:
                    continue  # not a run of this suite (a user's folder) or a cycle
                if status(by_id[rid], sd, out, results_dir) == "committed":
                    rerun.add((rid, sd))
                add(by_id[rid], sd, chain + ((run.id, seed),))
        ordered.append((run, seed))

    for run, seed in jobs:
        add(run, seed)
    return ordered, rerun


def clear_for_fresh_start(st: str, d: Path) -> None:
    """A run that does not resume begins in an empty folder: a start that died before its
    first checkpoint, a stale run, or a committed run rebuilt for its model (both launchers)."""
    if st in ("todo", "committed", "stale") and d.exists():
        shutil.rmtree(d)


def execute(run: Run, seed: int, out: Path, results_dir: Path | None, log=print, rerun: bool = False,
            wait: dict | None = None) -> dict:
    """Run one job (or skip it). `wait` maps (id, seed) to an Event set when that job has ended,
    with `.ok` telling whether it succeeded: a job waits for the runs it needs."""
    d = run_dir(out, run, seed)
    for key in needs(run, seed):
        if wait and key in wait:
            wait[key].wait()
            if not wait[key].ok:
                msg = f"the run it needs, {key[0]}__seed{key[1]}, did not finish"
                log(f"FAILED {d.name}: {msg}")
                return _failure(run, seed, out, [], -1, msg)
    st = status(run, seed, out, results_dir)
    if st == "done":
        log(f"skip   {d.name} (summary.json exists)")
        copy_small_files(d, results_dir)
        return {"id": run.id, "seed": seed, "status": "skipped"}
    if st == "committed" and not rerun:
        log(f"skip   {d.name} (committed in {results_dir})")
        return {"id": run.id, "seed": seed, "status": "skipped"}
    if st == "committed":
        log(f"rerun  {d.name}: a later run needs its model, which is not kept with the committed results")
    if st == "stale":
        where = d if (d / "summary.json").exists() or (d / "checkpoint.pt").exists() else results_dir / d.name
        log(f"stale  {d.name}: made with other arguments ({'; '.join(stale_args(run, seed, where))}), run again")
    clear_for_fresh_start(st, d)
    cmd = command(run, seed, out)
    log(("resume " if st == "resume" else "run    ") + " ".join(cmd))
    t = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    if THREADS:  # one intra-op thread per run is far less sensitive to a busy shared machine
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    rec = {"id": run.id, "seed": seed, "cmd": cmd, "returncode": p.returncode, "wall_s": round(time.time() - t, 1)}
    if p.returncode != 0:
        rec = _failure(run, seed, out, cmd, p.returncode, p.stderr, rec["wall_s"])
        log(f"FAILED {d.name} (exit {p.returncode}): {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    elif st == "committed":
        rec["status"] = "ok"
        rec["same_as_committed"] = compare_rerun(d, results_dir / d.name)
        keep_rerun(d, results_dir, rec["same_as_committed"])
        log(f"done   {d.name} in {rec['wall_s']} s (rerun; metrics "
            f"{'identical to' if rec['same_as_committed'] else 'DIFFERENT from'} the committed ones)")
    else:
        rec["status"] = "ok"
        copy_small_files(d, results_dir)
        log(f"done   {d.name} in {rec['wall_s']} s")
    return rec


def _failure(run: Run, seed: int, out: Path, cmd: list[str], code: int, stderr: str, wall_s: float = 0.0) -> dict:
    rec = {"id": run.id, "seed": seed, "cmd": cmd, "returncode": code, "wall_s": wall_s, "status": "failed",
           "stderr_tail": stderr[-2000:]}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "failures.jsonl", "a") as fh:
        fh.write(json.dumps({**rec, "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return rec


def compare_rerun(new: Path, committed: Path) -> bool:
    """Whether a rerun reproduced the committed run: its best and final metrics (timings aside)
    and its evaluation records (wall-clock fields aside)."""
    volatile = {"elapsed_s", "wall_s", "samples_per_s", "train_time_s", "step_s"}

    def records(d: Path) -> list[dict]:
        with open(d / "metrics.jsonl") as fh:
            return [{k: v for k, v in json.loads(x).items() if k not in volatile} for x in fh if x.strip()]

    def metrics(d: Path) -> dict:
        s = json.loads((d / "summary.json").read_text())
        return {k: {m: v for m, v in s[k].items() if m not in volatile} if isinstance(s[k], dict) else s[k]
                for k in ("best", "final") if k in s}

    return metrics(new) == metrics(committed) and records(new) == records(committed)


def keep_rerun(d: Path, results_dir: Path, same: bool) -> Path | None:
    """Log a rerun in <results_dir>/../reruns/reruns.jsonl and, when it differs from the committed
    run, copy its small files to <results_dir>/../reruns/<run>__<time>/ (an identical one is the
    committed run already)."""
    where = results_dir.parent / "reruns"
    where.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    copy = None if same else f"{d.name}__{stamp}"
    if copy:
        copy_small_files(d, where, name=copy)
    with open(where / "reruns.jsonl", "a") as fh:
        fh.write(json.dumps({"run": d.name, "copy": copy, "same_as_committed": same, "time": stamp}) + "\n")
    return where / copy if copy else None


def copy_small_files(d: Path, results_dir: Path | None, name: str | None = None) -> None:
    if results_dir is None or not (d / "summary.json").exists():
        return
    dest = results_dir / (name or d.name)
    dest.mkdir(parents=True, exist_ok=True)
    for f in SMALL_FILES:  # summary.json last: its presence means the rest is there
        if (d / f).exists():
            tmp = dest / f".{f}.tmp"
            shutil.copy2(d / f, tmp)
            os.replace(tmp, dest / f)  # atomic: a kill leaves the previous complete file


def submit_slurm(jobs: list[tuple[Run, int]], out: Path, args, results_dir: Path | None = None,
                 rerun: set | None = None, executor=None) -> list[tuple[str, int]]:
    """Submit each command as one Slurm job through submitit, in the order of `schedule`.
    Runs that are done (or committed and not needed again) are skipped; a stale run's or a
    dead start's folder is cleared first, as the local launcher does; a run that needs
    another run's model waits for that job (Slurm `afterok`). Returns the submitted keys."""
    if executor is None:
        import submitit
        executor = submitit.AutoExecutor(folder=str(out / "slurm_logs"))
    from submitit.helpers import CommandFunction

    base = dict(timeout_min=args.slurm_time_min, slurm_partition=args.slurm_partition,
                gpus_per_node=args.slurm_gpus, cpus_per_task=args.slurm_cpus, name="lis-bench")
    job_ids: dict[tuple[str, int], str] = {}
    for run, seed in jobs:
        key, d = (run.id, seed), run_dir(out, run, seed)
        st = status(run, seed, out, results_dir)
        if st == "done" or (st == "committed" and key not in (rerun or set())):
            continue
        clear_for_fresh_start(st, d)
        after = [job_ids[k] for k in needs(run, seed) if k in job_ids]
        extra = {"dependency": "afterok:" + ":".join(after)} if after else {}
        executor.update_parameters(**base, slurm_additional_parameters=extra)
        job_ids[key] = str(executor.submit(CommandFunction(command(run, seed, out, "python"), cwd=str(ROOT))).job_id)
    print(f"submitted {len(job_ids)} of {len(jobs)} jobs (the rest are done); logs in {out / 'slurm_logs'}")
    return list(job_ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--seeds", type=int, nargs="*", help="default: the suite's seeds")
    ap.add_argument("--only", nargs="*", help="keep runs whose id contains one of these strings (e.g. lacol)")
    ap.add_argument("--out-dir", default="runs/bench", help="parent of <suite>/<run>__seed<S>/")
    ap.add_argument("--results-dir", default=None, help="copy finished runs' small files here (to commit them)")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel (local launcher)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads per run (default: PyTorch's choice; 1 is robust on a shared machine)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and their status, run nothing")
    ap.add_argument("--launcher", choices=["local", "slurm"], default="local")
    ap.add_argument("--slurm-partition", default=None)
    ap.add_argument("--slurm-gpus", type=int, default=1)
    ap.add_argument("--slurm-cpus", type=int, default=8)
    ap.add_argument("--slurm-time-min", type=int, default=24 * 60)
    args = ap.parse_args(argv)

    global THREADS
    THREADS = args.threads
    out = Path(args.out_dir) / args.suite
    jobs = expand(args.suite, args.seeds, args.only)
    if not jobs:
        print(f"no runs in suite {args.suite} match --only {args.only}", file=sys.stderr)
        return 2
    results = Path(args.results_dir) if args.results_dir else None
    jobs, rerun = schedule(jobs, args.suite, out, results)
    if args.dry_run:
        for run, seed in jobs:
            st = "rerun" if (run.id, seed) in rerun else status(run, seed, out, results)
            print(f"[{st:6s}] {run.group} | {run.row or '-'}\n    " + " ".join(command(run, seed, out, "python")))
        print(f"{len(jobs)} runs ({sum(status(r, s, out, results) in ('done', 'committed') for r, s in jobs)} done"
              f"{f', {len(rerun)} of them to rerun for their models' if rerun else ''})")
        return 0
    if args.launcher == "slurm":
        submit_slurm(jobs, out, args, results, rerun)
        return 0
    wait = {(r.id, s): threading.Event() for r, s in jobs}

    def job(j: tuple[Run, int]) -> dict:
        key = (j[0].id, j[1])
        try:
            rec = execute(j[0], j[1], out, results, rerun=key in rerun, wait=wait)
        except Exception as e:  # noqa: BLE001 - the runner records it and goes on
            rec = _failure(j[0], j[1], out, [], -1, f"{type(e).__name__}: {e}")
        wait[key].ok = rec["status"] != "failed"
        wait[key].set()
        return rec

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        recs = list(pool.map(job, jobs))
    failed = [r for r in recs if r["status"] == "failed"]
    print(f"{len(recs)} runs: {sum(r['status'] == 'ok' for r in recs)} ran, "
          f"{sum(r['status'] == 'skipped' for r in recs)} skipped, {len(failed)} failed"
          + (f" (see {out / 'failures.jsonl'})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
