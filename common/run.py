"""The run object: everything about a training run that is not the method.

A script's `main` makes one `Run` before it loads data and then calls a handful of methods;
the method's own code never sees a file. The guarantees the reliability tests check live here:

- nothing is written before the data and model load (`Run(...)` only reads: on `--resume` the
  run's own args.json and its last checkpoint; otherwise it checks that `--out-dir` is usable);
- `open` creates the run directory (never reusing one) and writes args.json and the run's data
  files atomically; on `--resume` it cuts metrics.jsonl back to the checkpoint's records;
- `save` writes the checkpoint atomically (model, optimizer, ... state dicts, every random
  generator, the metrics line count, the wall time so far, and the script's own counters), so a
  kill at any moment leaves the previous checkpoint and a resume gives the same numbers;
- `with run:` turns Ctrl-C / SIGTERM into `run.stopped`; `interrupt` then says how to resume
  and exits 130; a non-finite loss exits 4 or, with `--skip-nonfinite`, is counted and skipped;
- `finish` writes summary.json (with versions, commit, CPU and precision) atomically.

    run = Run("x.py", Args, args, validate, keys=("model", "optimizer", "step"))  # before data
    ...load data and model...
    state = run.restore(model=model, optimizer=opt)                    # {} for a new run
    run.open(name, files={"labels.npz": {...}})                          # the run directory
    with run:
        for step in ...:
            ...
            if run.finite(loss, step, terms): backward, optimizer step; run.add(terms)
            if due: run.log(step, "dev", acc=..., **run.means()); run.save(step=step)
            if run.stopped: run.save(step=step); run.interrupt(f"at step {step}")
    run.finish(summary)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch

from common import utils


@dataclass
class RunArgs:
    """The flags every script shares (run directory, device, precision, resume, ...). A script's
    `Args(RunArgs)` adds the method's own and may redeclare one of these with its own help."""

    exp_name: str = utils.arg("", "run directory name (default: method__data__setting__seedN__time)")
    seed: int = utils.arg(0, "random seed (initialisation, data order and subsets, dropout, sampling)")
    device: str = utils.arg("auto", "auto, cpu, cuda or cuda:N")
    precision: str = utils.arg("auto", "auto (bf16 on CUDA if supported, fp16 on older GPUs; on CPU bf16 if it "
                               "has native bf16, else fp32), fp32, bf16, fp16",
                               choices=["auto", "fp32", "bf16", "fp16"])
    deterministic: bool = utils.arg(False, "deterministic kernels (CUDA: slower) and one CPU thread: bit-identical "
                                    "reruns")
    out_dir: str = utils.arg("runs", "parent of the run directory")
    track: bool = utils.arg(False, "also write TensorBoard events to <run>/tb")
    resume: str = utils.arg("", "run directory to continue from its last checkpoint; its own arguments are used, "
                            "except --max-steps when given")
    skip_nonfinite: bool = utils.arg(False, "skip a step whose loss is NaN or infinite (no update; counted in "
                                     "metrics.jsonl and summary.json) instead of stopping the run with exit code 4")
    preset: str | None = utils.arg(None, "named group of settings, applied before the other flags")
    max_steps: int | None = utils.arg(None, "stop after this many optimizer steps (for smoke tests; default: no limit)")
    limit_train: int | None = utils.arg(None, "train on a fixed random subset of this many examples (default: all)")
    limit_eval: int | None = utils.arg(None, "evaluate on the first N examples of each evaluation set (default: all)")


class Run:
    def __init__(self, script: str, cls: type, args: Any, validate: Callable[[Any], None] | None = None, *,
                 may_change: tuple[str, ...] = ("max_steps",), keys: tuple[str, ...] = ()):
        """Read, never write. `args` from the command line; with `--resume DIR` they are replaced
        by DIR's args.json (only the fields in `may_change` that were given on this command line
        keep their new value) and DIR's last checkpoint is loaded (`keys` it must hold).
        `validate` runs on the arguments in both cases."""
        if validate:
            validate(args)
        self.script = script  # e.g. "lacol.py", for the resume hint
        self.state: dict | None = None  # the checkpoint being resumed (None: a new run, or none was saved)
        self.dir: Path | None = None
        if args.resume:
            given = {k: getattr(args, k) for k in may_change if k in utils.flags_given(args)}
            args, self.state = utils.resume_run(cls, args.resume, {"resume": args.resume, **given})
            if validate:
                validate(args)
            if self.state is not None:
                utils.require_keys(self.state, keys, args.resume)
            self.dir = Path(args.resume)
        else:
            utils.check_out_dir(args.out_dir)
        self.args = args
        self.objects: dict[str, Any] = {}
        self.sums: dict[str, float] = {}
        self.skipped = 0  # --skip-nonfinite: steps left out
        self.wall_before = 0.0
        self.t_start = time.time()
        self.metrics: utils.MetricsWriter | None = None
        self.flag = utils.StopFlag()

    # ---- the run directory
    def open(self, name: str, files: dict[str, Any] | None = None, resumed_at: str = "") -> Path:
        """Create the run directory `<out_dir>/<name>` and write args.json (a new run), or reuse
        the directory being resumed. `files` (written only when the run starts from scratch):
        file name -> object, `.npz` files from a dict of arrays, anything else as JSON."""
        if self.dir is None:
            self.dir = utils.make_run_dir(self.args.out_dir, name)
            utils.atomic_write_json(self.dir / "args.json", dataclasses.asdict(self.args))
        if self.state is None:
            for fname, obj in (files or {}).items():
                if fname.endswith(".npz"):
                    utils.atomic_savez(self.dir / fname, **{k: np.asarray(v) for k, v in obj.items()})
                else:
                    utils.atomic_write_json(self.dir / fname, obj)
        self.metrics = utils.MetricsWriter(self.dir, self.args.track)
        if self.args.resume:
            self.metrics.resume(self.state, self.state.get("step", 0) if self.state else 0)
            print(f"resuming {self.dir} {resumed_at}".rstrip() if self.state is not None else
                  f"resuming {self.dir}: it stopped before its first checkpoint, so it starts over")
        self.t_start = time.time()
        return self.dir

    def restore(self, **objects: Any) -> dict:
        """Register the objects whose `state_dict` each checkpoint holds (model=..., optimizer=...)
        and, when resuming, load them (before `open`, so that a checkpoint that does not fit changes
        no file) and every random generator from the checkpoint. Returns the
        checkpoint (its counters: step, history, ...), or {} for a run that starts from scratch."""
        self.objects = objects
        if self.state is None:
            return {}
        utils.require_keys(self.state, [*objects, "rng"], self.dir)
        with utils.restoring(self.dir):
            for key, obj in objects.items():
                obj.load_state_dict(self.state[key])
            utils.set_rng_state(self.state["rng"])
        self.wall_before = self.state.get("wall_s", 0.0)
        self.skipped = self.state.get("skipped_nonfinite", 0)
        self.sums = dict(self.state.get("sums", {}))
        return self.state

    def end_stage(self) -> None:
        """A run of several stages, each with its own objects (msmo.py: training, then distillation):
        the checkpoint being resumed belonged to the stage that just ended, so the next stage's
        `restore` starts that stage from scratch (returns {})."""
        self.state = None

    def save(self, **counters: Any) -> None:
        """Checkpoint (atomic): the registered objects, the random generators, the training-loss
        sums since the last log, the skipped-step count, the wall time and `counters`."""
        utils.save_checkpoint(self.dir, {
            **{k: o.state_dict() for k, o in self.objects.items()}, "rng": utils.rng_state(),
            **counters, "wall_s": self.wall(), "sums": dict(self.sums), "skipped_nonfinite": self.skipped,
            "metrics_lines": self.metrics.lines})

    def wall(self) -> float:
        """Seconds of this run so far, over every resume."""
        return self.wall_before + time.time() - self.t_start

    # ---- training-loss bookkeeping and metrics
    def finite(self, loss: torch.Tensor, step: int, terms: dict[str, torch.Tensor]) -> bool:
        """True when the loss is finite. Otherwise exit 4 (DivergedError) or, with
        --skip-nonfinite, count the step as skipped and return False (no backward, no update)."""
        ok = utils.check_finite(loss, step, terms, self.args.skip_nonfinite)
        self.skipped += not ok
        return ok

    def add(self, terms: dict[str, torch.Tensor | float]) -> None:
        """Add one step's loss terms to the sums `means` averages."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.item() if isinstance(v, torch.Tensor) else float(v))
        self.sums["n"] = self.sums.get("n", 0) + 1

    def means(self) -> dict[str, float]:
        """The mean of each term since the last call (and `skipped_nonfinite` with
        --skip-nonfinite); resets the sums."""
        n = self.sums.pop("n", 0)
        out = {k: v / n for k, v in self.sums.items()} if n else {}
        self.sums = {}
        if self.args.skip_nonfinite:
            out["skipped_nonfinite"] = self.skipped
        return out

    def log(self, step: int, split: str, epoch: float | None = None, **metrics: Any) -> dict:
        """One record in metrics.jsonl (and TensorBoard with --track)."""
        return self.metrics.write(step, split, epoch=epoch, **metrics)

    # ---- stopping
    def __enter__(self) -> "Run":
        self.flag.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flag.__exit__(*exc)

    @property
    def stopped(self) -> bool:
        """Ctrl-C or SIGTERM arrived (inside `with run:`)."""
        return bool(self.flag)

    def interrupt(self, where: str, kept: str = "checkpoint saved") -> NoReturn:
        """Say where the run stopped and how to continue it, and exit 130 (call `save` first
        where the checkpoint should hold this point)."""
        print(f"\ninterrupted {where}; {kept}. Resume with: python {self.script} --resume {self.dir}", flush=True)
        sys.exit(utils.EXIT_INTERRUPTED)

    def finish(self, summary: dict) -> dict:
        """Close the metrics file and write summary.json: `summary` plus the wall time, the
        skipped-step count, versions, commit, machine, CPU and precision."""
        if self.metrics is not None:
            self.metrics.close()
        summary = {**summary, "wall_s": round(self.wall(), 2), "skipped_nonfinite_steps": self.skipped}
        utils.write_summary(self.dir, summary)
        return summary

    def write_summary(self, summary: dict) -> dict:
        """summary.json before the end (a run made of parts, e.g. conlst.py's stages and languages,
        writes one after each): as `finish` writes it, but the metrics file stays open."""
        summary = {**summary, "wall_s": round(self.wall(), 2), "skipped_nonfinite_steps": self.skipped}
        utils.write_summary(self.dir, summary)
        return summary


def trained_run(run_dir: str | Path, flag: str, args: Any, same: tuple[str, ...] = (),
                file: str = "model_best.pt", why: str = "") -> dict:
    """The args.json of a finished run that `flag` points to (e.g. a teacher): a MissingError when
    `run_dir` is not a run directory or holds no `file`, a UsageError when one of the fields in
    `same` differs from `args` (one line naming the flag, both values, and `why`)."""
    p = Path(run_dir)
    if not (p / "args.json").is_file():
        raise utils.MissingError(f"{flag} {run_dir}: not a run directory (no args.json)")
    if not (p / file).is_file():
        raise utils.MissingError(f"{flag} {run_dir}: no {file} (the run stopped before its first evaluation)")
    saved = json.loads((p / "args.json").read_text())
    if any(saved.get(k) != getattr(args, k) for k in same):
        raise utils.UsageError(f"{flag} {run_dir}: trained with "
                               + " ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in same)
                               + ", this run uses " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}"
                                                               for k in same)
                               + (f" ({why})" if why else ""))
    return saved


def epoch_history_summary(history: list[float], metric: str) -> dict:
    """summary.json's part for a per-epoch evaluation `history`: epochs_done, the last epoch's value
    (final), the best one with its epoch (an oracle when `history` is test accuracy), the last 10's mean."""
    best = int(np.argmax(history)) if history else -1
    return {"epochs_done": len(history), "final": {metric: history[-1] if history else None, "epoch": len(history)},
            "best": {metric: history[best] if history else None, "epoch": best + 1},
            "last10_mean": {metric: float(np.mean(history[-10:])) if history else None}}


def stages_summary(completed: dict[str, dict], keys: list[str]) -> dict:
    """summary.json's part for a run of stages (`completed`: stage -> its result, with final and best
    evaluation records, steps, sentences and train_time_s): each stage's result under "stages", its
    final and best cut to `keys` and their step; the last stage's final, best and steps; the training
    throughput over all stages (samples_per_s, step_s)."""

    def pick(rec: dict) -> dict:
        return {**{k: rec.get(k) for k in keys}, "step": rec.get("step")}

    per_stage = {name: {**res, "final": pick(res["final"]), "best": pick(res["best"])}
                 for name, res in completed.items()}
    last = per_stage[list(per_stage)[-1]]
    train_time = sum(r["train_time_s"] for r in per_stage.values())
    return {"final": last["final"], "best": last["best"], "stages": per_stage, "steps": last["steps"],
            "samples_per_s": round(sum(r["sentences"] for r in per_stage.values()) / max(train_time, 1e-9), 2),
            "step_s": round(train_time / max(sum(r["steps"] for r in per_stage.values()), 1), 4)}
