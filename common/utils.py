"""The few utilities every method script needs.

Arguments (a dataclass turned into argparse), clear one-line errors, seeding, device and
precision selection, the run directory, atomic writes, the metrics writer, checkpoints and
the run summary. Nothing here knows about any method.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

# ------------------------------------------------------------------------------------------
# Errors: one line, a fixed exit code, no traceback
# ------------------------------------------------------------------------------------------
EXIT_USAGE = 2  # a bad argument
EXIT_MISSING = 3  # missing or corrupt data, model or run directory
EXIT_DIVERGED = 4  # a NaN or infinite loss


class UsageError(Exception):
    """A bad command-line value. Message format: `--flag VALUE: what is allowed`."""

    exit_code = EXIT_USAGE


class MissingError(Exception):
    """Data, weights or a run directory that is not there (or is corrupt)."""

    exit_code = EXIT_MISSING


class DivergedError(Exception):
    """A loss became NaN or infinite."""

    exit_code = EXIT_DIVERGED


EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) or SIGTERM


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn the project's own errors into one line on stderr and the matching exit code; a
    Ctrl-C outside the training loop (loading, or a second Ctrl-C) exits 130 without a traceback."""
    try:
        yield
    except (UsageError, MissingError, DivergedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); a run keeps its last checkpoint, continue it with --resume RUN_DIR",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


# ------------------------------------------------------------------------------------------
# Arguments: a dataclass with a help string per field -> argparse
# ------------------------------------------------------------------------------------------
SEED_MAX = 2**32 - 1  # numpy's seeds: 0..2**32-1


def arg(default: Any, help: str, choices: list | tuple | None = None, *, gt: float | None = None,
        ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with its --help text, its allowed values and bounds, checked by parse_args
    and check_args (each element of a list): a float must be finite and >= 0, an int >= 1, a seed
    (`seed`, `*_seed`) in 0..2**32-1, unless `gt`/`ge` (a lower bound: > or >=) or `lt`/`le` (an
    upper bound) say otherwise, e.g. `ge=0` where 0 means "off", `gt=0` for a learning rate."""
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    meta = {"help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict)):  # mutable defaults need a factory
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_rules(cls: type) -> dict[str, tuple[type, bool, dict, list | tuple | None]]:
    """{field: (element type, whether it is a list, bounds, choices)}: what check_args enforces."""
    hints = typing.get_type_hints(cls)
    rules = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        is_list = typing.get_origin(kind) is list
        args_ = [a for a in typing.get_args(kind) if a is not type(None)]
        base = args_[0] if (is_list or typing.get_origin(kind) is not None) and args_ else kind
        declared = f.metadata.get("bounds", {})
        bounds = {}
        if base in (int, float):
            seed = base is int and (f.name == "seed" or f.name.endswith("_seed"))
            default = {"ge": 0, "le": SEED_MAX} if seed else {"ge": 1 if base is int else 0}
            for side in (("gt", "ge"), ("lt", "le")):
                source = declared if any(k in declared for k in side) else default
                bounds.update({k: source[k] for k in side if k in source})
        rules[f.name] = (base, is_list, bounds, f.metadata.get("choices"))
    return rules


def _allowed(bounds: dict) -> str:
    """{"ge": 0, "lt": 1} -> "in [0, 1)"; {"gt": 0} -> "> 0"."""
    lo = ("(", ">", bounds["gt"]) if "gt" in bounds else ("[", ">=", bounds["ge"]) if "ge" in bounds else None
    hi = (")", "<", bounds["lt"]) if "lt" in bounds else ("]", "<=", bounds["le"]) if "le" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{lo[2]}, {hi[2]}{hi[0]}"
    return f"{lo[1]} {lo[2]}" if lo else f"{hi[1]} {hi[2]}" if hi else ""


def _problem(v: Any, base: type, bounds: dict, choices: Any) -> str | None:
    """What is wrong with one value of a field (None: nothing)."""
    if choices and v not in choices:
        return "allowed are " + ", ".join(map(str, choices))
    if base is bool and not isinstance(v, bool):
        return "must be true or false"
    if base not in (int, float):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (base is int and not isinstance(v, int)):
        return "must be an integer" if base is int else "must be a number"
    finite = base is int or math.isfinite(v)
    ok = finite and not (("gt" in bounds and v <= bounds["gt"]) or ("ge" in bounds and v < bounds["ge"])
                         or ("lt" in bounds and v >= bounds["lt"]) or ("le" in bounds and v > bounds["le"]))
    if ok:
        return None
    rule = _allowed(bounds)
    return "must be " + rule if finite else "must be finite" + (f" and {rule}" if rule else "")


def check_args(args: Any) -> None:
    """UsageError for the first field whose value breaks its rules (see `arg`), one line:
    `--flag VALUE: what is allowed`. parse_args calls it; so does each script's validate(), which
    also sees the values of a --resume run's args.json and of arguments built in code."""
    rules = field_rules(type(args))
    for f in dataclasses.fields(args):
        base, is_list, bounds, choices = rules[f.name]
        value = getattr(args, f.name)
        for v in (value if is_list and isinstance(value, list) else [value]):
            problem = None if v is None else _problem(v, base, bounds, choices)
            if problem:
                hint = " (or leave it out)" if f.default is None and base in (int, float) else ""
                raise UsageError(f"--{f.name.replace('_', '-')} {v}: {problem}{hint}")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; cli_errors prints one line
        raise UsageError(f"{message} (see --help)")


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def parse_args(cls: type, argv: list[str] | None = None, presets: dict | None = None,
               description: str | None = None) -> Any:
    """Parse argv into the dataclass `cls`.

    Booleans take `--flag`, `--no-flag` or `--flag false`. With `presets` (name -> dict of
    field overrides, plus an optional "_doc"), `cls` must have a `preset` field: the chosen
    preset's values replace the defaults, and flags given on the command line replace the
    preset's. Every value is checked (check_args): a bad one is a UsageError naming its flag.
    """
    parser = _OneLineParser(description=description or (cls.__doc__ or "").strip(),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        helptext = meta.get("help", "")
        if f.name == "preset" and presets:
            helptext += " (" + "; ".join(f"{k}: {v.get('_doc', '')}" for k, v in presets.items()) + ")"
        kw: dict[str, Any] = {"help": helptext.replace("%", "%%"), "default": default}  # argparse formats with %
        if kind is bool:
            parser.add_argument(name, nargs="?", const=True, type=_str2bool, metavar="BOOL", **kw)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)
            continue
        origin = typing.get_origin(kind)
        args_ = [a for a in typing.get_args(kind) if a is not type(None)]
        if origin is list:
            kw["nargs"] = "*"
            kw["type"] = args_[0]
        elif kind in (int, float, str):
            kw["type"] = kind
        else:  # `X | None`
            kw["type"] = args_[0] if args_ else str
        choices = meta.get("choices") or (sorted(presets) if f.name == "preset" and presets else None)
        if choices:
            kw["choices"] = choices
        parser.add_argument(name, **kw)
    values = vars(parser.parse_args(argv))
    preset = values.get("preset")
    given = _flags_given(argv if argv is not None else sys.argv[1:])
    if presets and preset:
        for k, v in presets[preset].items():
            if not k.startswith("_") and k not in given:
                values[k] = v
    args = cls(**values)
    check_args(args)  # the final values (flags, preset, defaults): refused before anything is written
    args.__dict__["_given_flags"] = frozenset(given)  # not a field: args.json and asdict() leave it out
    return args


def flags_given(args: Any) -> frozenset[str]:
    """The fields whose flags were on the command line (recorded by parse_args; none otherwise).
    On --resume a run keeps its own values except for those given explicitly."""
    return args.__dict__.get("_given_flags", frozenset())


def _flags_given(argv: list[str]) -> set[str]:
    given = set()
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0]
            if name.startswith("no-"):
                name = name[3:]
            given.add(name.replace("-", "_"))
    return given


# ------------------------------------------------------------------------------------------
# Seeding, device, precision
# ------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). `deterministic` also asks PyTorch for
    deterministic kernels (on CUDA this needs CUBLAS_WORKSPACE_CONFIG, set here) and uses one
    intra-op CPU thread: measured here, two runs of the same seed with 2 CPU threads differed
    in the 5th digit of a loss after a few hundred steps, with 1 thread they were identical."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.set_num_threads(1)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU. Asking for `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"--device {name}: allowed are auto, cpu, cuda, cuda:N")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), where bf16 autocast
    was measured 2-3x faster than fp32 (benchmarks/speed.py); without them bf16 is emulated and
    slower. `LIS_CPU_BF16=0` or `=1` overrides the detection (the tests set 0, so that `auto`
    means fp32 on every CI machine)."""
    forced = os.environ.get("LIS_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


RESOLVED_PRECISION = {"precision": "fp32"}  # what resolve_precision chose in this process (for summary.json)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Return (autocast dtype or None for fp32, whether a GradScaler is needed).

    `auto`: bf16 on a CUDA device that supports it, fp16 + GradScaler on older CUDA devices;
    on CPU bf16 where the CPU has native bf16 (`cpu_has_native_bf16`), fp32 elsewhere.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {precision}: allowed are auto, fp32, bf16, fp16")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16: needs a CUDA device; use bf16 or fp32 on CPU")
    RESOLVED_PRECISION["precision"] = precision
    if precision == "fp32":
        return None, False
    return (torch.bfloat16, False) if precision == "bf16" else (torch.float16, True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` when a reduced precision was chosen, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ------------------------------------------------------------------------------------------
# Files: atomic writes, run directory, metrics, checkpoints, summary
# ------------------------------------------------------------------------------------------
def _atomic_replace(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_replace(Path(path), lambda fh: fh.write(text), "w")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic_replace(Path(path), lambda fh: torch.save(obj, fh), "wb")


def atomic_savez(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed, atomically."""
    _atomic_replace(Path(path), lambda fh: np.savez_compressed(fh, **arrays), "wb")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def check_out_dir(out_dir: str | Path) -> None:
    """Fail at once (UsageError) when `out_dir` cannot hold a run directory: its nearest
    existing ancestor is not a directory or not writable. Creates nothing, so a script can call
    it before loading data (make_run_dir checks again when it creates the directory)."""
    out = Path(out_dir)
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out-dir {out_dir}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir {out_dir}: not writable ({probe})")


def make_run_dir(out_dir: str | Path, run_name: str) -> Path:
    """Create `out_dir/run_name` and return it. Never reuses an existing directory: a second
    run of the same name gets a `-2`, `-3`, ... suffix. Fails clearly if out_dir is not
    writable."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir}: cannot create it ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out-dir {out_dir}: not writable")
    for i in range(1, 1000):
        path = out / (run_name if i == 1 else f"{run_name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UsageError(f"--exp-name: 999 runs named {run_name} already exist in {out_dir}")


def run_name(method: str, dataset: str, setting: str, seed: int, exp_name: str = "") -> str:
    """method__dataset__setting__seedN__YYYYmmdd-HHMMSS (exp_name replaces it when given)."""
    if exp_name:
        return exp_name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{method}__{dataset}__{setting}__seed{seed}__{stamp}"


class MetricsWriter:
    """Appends one JSON object per evaluation to metrics.jsonl (and TensorBoard with --track).

    Each line is flushed and fsync'ed, so a crash loses at most the line being written; on
    resume the file is cut back to the lines up to the checkpoint's step.
    """

    def __init__(self, run_dir: Path, track: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if track:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        self.start = time.time()
        self.lines = len(self._complete_lines())  # records in the file (checkpoints store it)

    def _complete_lines(self) -> list[str]:
        """The file's records up to the first line a crash cut short (if any)."""
        if not self.path.exists():
            return []
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break  # a line half-written by a crash: drop it and everything after
            keep.append(line)
        return keep

    def truncate_after(self, step: int) -> None:
        """Keep only records with step <= `step` (resume from a checkpoint without a line count)."""
        if not self.path.exists():
            return
        keep = [x for x in self._complete_lines() if json.loads(x).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))
        self.lines = len(keep)

    def truncate_to(self, lines: int) -> None:
        """Keep the first `lines` records: those written before the checkpoint being resumed
        (exact even where several records share a step)."""
        keep = self._complete_lines()[:lines]
        if self.path.exists():
            atomic_write_text(self.path, "".join(x + "\n" for x in keep))
        self.lines = len(keep)

    def resume(self, checkpoint: dict | None, step: int) -> None:
        """On --resume: cut the file back to the checkpoint's records (its line count when it has
        one, `metrics_lines`, else the records up to its step; none without a checkpoint), and
        remove the temporary files a kill during an atomic write left in the run directory."""
        if checkpoint is None:
            self.truncate_to(0)
        elif checkpoint.get("metrics_lines") is not None:
            self.truncate_to(checkpoint["metrics_lines"])
        else:
            self.truncate_after(step)
        for tmp in self.path.parent.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def write(self, step: int, split: str, epoch: float | None = None, **metrics: float) -> dict:
        rec = {"step": int(step), "epoch": epoch, "split": split,
               "elapsed_s": round(time.time() - self.start, 3), **metrics}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec, default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.lines += 1
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        return rec

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def rng_state() -> dict:
    """All random generator states, for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on torch's CPU generator (and `device`'s, a CUDA device) seeded with `seed`,
    then put their states back: what the block draws (dropout masks, an initialisation) leaves the
    random stream of the rest of the run as it was (msmo.py: an MSMO run whose added terms weigh 0
    reproduces the ACS run of the same seed). Seeding from the step number needs no checkpoint state."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def save_checkpoint(run_dir: Path, state: dict, name: str = "checkpoint.pt") -> Path:
    """Write the checkpoint atomically (a kill during the write keeps the previous one)."""
    path = Path(run_dir) / name
    atomic_torch_save(state, path)
    return path


def load_checkpoint(resume_dir: str | Path, name: str = "checkpoint.pt") -> dict:
    """Load `resume_dir/checkpoint.pt`; a missing or unreadable file is a MissingError."""
    path = Path(resume_dir) / name
    if not Path(resume_dir).is_dir():
        raise MissingError(f"--resume {resume_dir}: no such run directory")
    if not path.exists():
        raise MissingError(f"--resume {resume_dir}: no {name} in it (the run stopped before its first checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise MissingError(f"--resume {resume_dir}: {name} is corrupt ({type(e).__name__})") from None


def load_resume_args(resume_dir: str | Path) -> dict:
    """The args.json of the run being resumed."""
    path = Path(resume_dir) / "args.json"
    if not Path(resume_dir).is_dir():
        raise MissingError(f"--resume {resume_dir}: no such run directory")
    if not path.exists():
        raise MissingError(f"--resume {resume_dir}: no args.json in it (not a run directory)")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MissingError(f"--resume {resume_dir}: args.json is corrupt") from None
    if not isinstance(saved, dict):
        raise MissingError(f"--resume {resume_dir}: args.json is corrupt (not an object)")
    return saved


def resume_run(cls: type, resume_dir: str | Path, keep: dict) -> tuple[Any, dict | None]:
    """For --resume: the run's own arguments (an instance of the script's `cls`; `keep` holds
    the values this invocation may change, e.g. the step limit) and its last checkpoint, or
    None when the run stopped before writing one (it then starts over in its directory).
    A missing or corrupt directory, or one of another script, is a MissingError."""
    saved = load_resume_args(resume_dir)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise MissingError(f"--resume {resume_dir}: args.json is not from this script (unknown fields "
                           f"{', '.join(unknown[:3])})")
    try:
        args = cls(**{**saved, **keep})
    except TypeError as e:
        raise MissingError(f"--resume {resume_dir}: args.json is corrupt ({e})") from None
    ckpt = load_checkpoint(resume_dir) if (Path(resume_dir) / "checkpoint.pt").exists() else None
    if ckpt is not None and not isinstance(ckpt, dict):
        raise MissingError(f"--resume {resume_dir}: checkpoint.pt is corrupt (not a checkpoint)")
    return args, ckpt


def require_keys(ckpt: dict, keys: tuple[str, ...] | list[str], resume_dir: str | Path) -> None:
    """MissingError unless the checkpoint has every key (it belongs to another script or version)."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise MissingError(f"--resume {resume_dir}: checkpoint.pt does not fit this script (no '{missing[0]}')")


@contextlib.contextmanager
def restoring(resume_dir: str | Path) -> Iterator[None]:
    """Around the code that loads a checkpoint into the model, optimizer, ...: a checkpoint
    that does not fit them is a one-line MissingError, not a traceback."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise MissingError(f"--resume {resume_dir}: checkpoint.pt does not fit this run "
                           f"({type(e).__name__}: {text})") from None


def shared_data_dir() -> Path:
    """Where the offline copies of the papers' data live: $LIS_SHARED_DATA if set, else
    `../shared/data` beside the checkout (as on the development machines and in CI)."""
    env = os.environ.get("LIS_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


#: The top-level folders of the offline text data (docs/data.md; common/data_manifest.csv).
TEXT_DATA_SETS = ("agnews", "cifar_n", "glue", "senteval_transfer", "sick", "sts", "xabsa", "xnli")


def resolve_text_data_dir(data_dir: str | Path | None = None) -> Path:
    """The one place that decides where the offline text data is read from (docs/data.md):
    a --data-dir given explicitly (non-empty) is used as it is; otherwise $LIS_SHARED_DATA if
    set, then ./data if it holds one of TEXT_DATA_SETS (`python -m common.get_data --to data`
    fills it; a ./data with only image data does not count), then ../shared/data beside the
    checkout. When none is there: ./data, so that errors name the folder get_data would fill."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get("LIS_SHARED_DATA"):
        return Path(os.environ["LIS_SHARED_DATA"])
    local = Path.cwd() / "data"
    if any((local / name).is_dir() for name in TEXT_DATA_SETS):
        return local
    sibling = shared_data_dir()
    return sibling if sibling.is_dir() else local


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "transformers", "datasets", "numpy", "scipy", "scikit-learn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def cpu_description() -> str:
    """The CPU model and the vector instructions PyTorch's CPU kernels use, e.g. "AMD EPYC,
    AVX512". Two x86_64 machines with other CPUs can round differently (MKL and oneDNN choose
    their kernels by CPU), and a training run amplifies that: a rerun of the same command on
    another machine need not match."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def write_summary(run_dir: Path, summary: dict) -> dict:
    """summary.json: the caller's fields plus versions, commit, machine and CPU. Atomic."""
    full = {**summary, "versions": library_versions(), "git_commit": git_commit(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
            "cpu": cpu_description(), "cpu_bf16": cpu_has_native_bf16(),
            "precision": RESOLVED_PRECISION["precision"], "torch_threads": torch.get_num_threads()}
    atomic_write_json(Path(run_dir) / "summary.json", full)
    return full


def check_finite(loss: torch.Tensor, step: int, terms: dict[str, torch.Tensor], skip: bool = False) -> bool:
    """True when the loss is finite. Otherwise raise DivergedError naming the step and the
    non-finite loss terms, or, with `skip` (--skip-nonfinite), print that the step is skipped
    and return False: the caller then leaves out its backward pass and optimizer step."""
    if torch.isfinite(loss).item():
        return True
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all().item()] or ["total"]
    if skip:
        print(f"warning: non-finite loss at step {step} (term: {', '.join(bad)}); step skipped (--skip-nonfinite)",
              file=sys.stderr, flush=True)
        return False
    raise DivergedError(f"non-finite loss at step {step} (term: {', '.join(bad)}); the last good checkpoint is "
                        "kept (--skip-nonfinite skips such steps instead)")


class StopFlag:
    """Set by SIGINT/SIGTERM so the training loop can checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
