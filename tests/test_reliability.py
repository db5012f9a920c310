"""Reliability of the five scripts (issue #9), on tiny models and offline data.

(a) Reproducibility: the same arguments and seed give the same metrics.jsonl records (the
    wall-clock field aside) and summary.json, bit for bit, on CPU; each run saves what defines
    its data (lacol.py: labels.npz; the text scripts: data_subsets.json); a second run of the
    same name gets a new directory and leaves the first one as it was.
(b) Resume: a run killed with SIGKILL at a random point (after a number of evaluation records
    and a delay both drawn from a fixed seed) and continued with `--resume RUN_DIR` ends with
    the same records and summary as an uninterrupted run (conlst.py: killed in a stage after
    stage 0; msmo.py: in teacher training and in distillation). Ctrl-C (SIGINT) exits 130
    with a checkpoint and a line saying how to resume, and resuming from it gives the same
    result again.
(c) Bad input: a table of the issue's bad inputs against every script each applies to: exit
    code 2 (argument) or 3 (missing or corrupt data, model or run directory), exactly one line
    on stderr naming the flag (and the value), no traceback, nothing written (a fresh --out-dir
    stays absent, a run directory given to --resume is unchanged). Most rows call the script's
    main in-process the way `python SCRIPT.py` does (parse_args + cli_errors); at least one
    row per script runs as a real subprocess.
(d) Divergence: a NaN loss at one step stops a run with exit code 4 and one line naming the
    step and the loss term, the last checkpoint kept; with --skip-nonfinite the step is
    skipped, counted in metrics.jsonl and summary.json, and the run finishes.
"""

import dataclasses
import hashlib
import importlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.suites import SCAL_SMOKE, USCAL_SMOKE
from common import data as image_data
from common import utils
from common.utils import parse_args, shared_data_dir

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("lacol", "scal", "uscal", "conlst", "msmo")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

# Tiny configurations (seconds each), with several evaluations so that a kill can land between them.
CONFIGS = {
    "lacol": ["--preset", "demo", "--limit-train", "256", "--limit-eval", "200", "--epochs", "3",
              "--warmup-epochs", "1",
              "--batch-size", "32", "--milestones", "2", "--num-workers", "0", "--deterministic"],
    "scal": [*SCAL_SMOKE, "--task", "trec", "--limit-train", "128", "--batch-size", "16", "--epochs", "2",
             "--eval-every", "4", "--max-steps", "1000", "--max-length", "32"],
    "uscal": [*USCAL_SMOKE, "--limit-train", "96", "--batch-size", "16", "--epochs", "2", "--eval-every", "4",
              "--max-steps", "1000", "--limit-eval", "30"],
    "conlst": ["--preset", "smoke", "--s0-epochs", "3"],
    "msmo": ["--preset", "smoke", "--steps", "8", "--eval-every", "4", "--distill", "--distill-steps", "12"],
}
N_RECORDS = {"lacol": 3, "scal": 4, "uscal": 3, "conlst": 7, "msmo": 5}  # evaluation records of each configuration
# wall-clock and machine fields: everything else of a record or summary must be identical
VOLATILE = {"elapsed_s", "wall_s", "samples_per_s", "train_time_s", "process_wall_s", "step_s", "versions",
            "git_commit", "machine", "torch_threads"}


def need_data(script: str) -> None:
    if script == "lacol":
        dirs = [ROOT / "data" / d for d in image_data.FASHION_MNIST_DIRS] + [image_data.DEBIAN_FASHION_MNIST]
        if image_data._find_idx(dirs, "train-images-idx3-ubyte") is None:
            pytest.skip("Fashion-MNIST is absent (apt-get install dataset-fashion-mnist)")
    elif not shared_data_dir().is_dir():
        pytest.skip(f"the offline data folder {shared_data_dir()} is absent (set LIS_SHARED_DATA)")


def run_in_process(script: str, argv: list[str]) -> dict:
    mod = importlib.import_module(script)
    return mod.main(parse_args(mod.Args, list(argv), presets=mod.PRESETS))


def comparable(obj, run: Path):
    """A record or summary without its wall-clock fields; the run's own path reads <run>."""
    if isinstance(obj, dict):
        return {k: comparable(v, run) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [comparable(v, run) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(run), "<run>")
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    return obj


def records(run: Path) -> list[dict]:
    return [comparable(json.loads(x), run) for x in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return comparable(json.loads((run / "summary.json").read_text()), run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """script -> (run directory, summary) of one uninterrupted in-process run of CONFIGS[script]."""
    runs: dict[str, tuple[Path, dict]] = {}

    def get(script: str) -> tuple[Path, dict]:
        if script not in runs:
            need_data(script)
            out = tmp_path_factory.mktemp(f"ref_{script}")
            runs[script] = (out / "ref", run_in_process(script, [*CONFIGS[script], "--out-dir", str(out),
                                                                  "--exp-name", "ref"]))
        return runs[script]

    return get


# ------------------------------------------------------------------------------------------
# (a) the same seed, the same metrics; the data a run used is saved with it
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_gives_identical_metrics_and_saves_its_data(script, reference, tmp_path):
    ref, _ = reference(script)
    before = tree(ref)
    # the same arguments, even the same --out-dir and --exp-name: a new directory, the first run untouched
    run_in_process(script, [*CONFIGS[script], "--out-dir", str(ref.parent), "--exp-name", "ref"])
    run = ref.parent / "ref-2"
    assert tree(ref) == before
    # evaluation records (conlst adds a 'flexmatch' line per stage-2 step, not an evaluation)
    assert len([r for r in records(ref) if r["split"] != "flexmatch"]) == N_RECORDS[script]
    assert records(run) == records(ref)
    assert summary(run) == summary(ref)
    if script == "lacol":  # the training subset, its clean and noisy labels, the test samples
        a, b = np.load(ref / "labels.npz"), np.load(run / "labels.npz")
        assert set(a.files) == {"subset", "clean", "noisy", "test_indices"}
        assert len(a["subset"]) == len(a["noisy"]) == 256 and a["test_indices"].tolist() == list(range(200))
        assert all((a[k] == b[k]).all() for k in a.files)
        assert (a["noisy"] != a["clean"]).mean() == summary(ref)["noise"]["realized_rate"]
        return
    saved = json.loads((ref / "data_subsets.json").read_text())
    assert saved == json.loads((run / "data_subsets.json").read_text())
    if script == "scal":
        assert len(saved["train"]["indices"]) == 128 and saved["train"]["n_all"] == 5452
        assert saved["eval"] == {"test": {"test": {"n_all": 500, "first": 64}}}
    elif script == "uscal":
        assert len(saved["train"]["indices"]) == 96 and saved["eval"]["stsb_dev"] == {"dev": 30}
    elif script == "conlst":
        assert len(saved["source"]["indices"]) == 64 and len(saved["pool_fr"]["indices"]) == 96
        assert len(saved["eval_fr"]["indices"]) == 96 and len(saved["select"]["indices"]) == 96
    else:
        assert saved["files"]["gold-en-train"] == {"n_all": 1600, "first": 64}
        assert saved["files"]["gold-fr-test"]["first"] == 32


# ------------------------------------------------------------------------------------------
# (b) killed (SIGKILL) or interrupted (SIGINT) runs, resumed
# ------------------------------------------------------------------------------------------
def start(script: str, argv: list[str], out: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = out / f"{name}.log"
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, f"{script}.py", *argv, "--out-dir", str(out), "--exp-name", name],
                             cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    return p, log


def count_records(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def wait_until(p: subprocess.Popen, run: Path, n_records: int, file: str, timeout: float = 600) -> None:
    """Until `run/file` exists and metrics.jsonl holds n_records complete records."""
    t0 = time.time()
    while not ((run / file).exists() and count_records(run) >= n_records):
        if p.poll() is not None:
            pytest.fail(f"the run ended (exit {p.returncode}) before {n_records} records")
        if time.time() - t0 > timeout:
            p.kill()
            pytest.fail(f"no {n_records} records after {timeout} s")
        time.sleep(0.01)


def resume(script: str, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"{script}.py", "--resume", str(run)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)


def assert_same_as_reference(run: Path, ref: Path) -> None:
    assert records(run) == records(ref)
    assert summary(run) == summary(ref)
    assert not list(run.glob(".*.tmp"))  # no temporary file of an interrupted atomic write is left


KILLS = [  # (script, numbers of evaluation records to wait for before the kill: one is drawn)
    ("lacol", (0, 1)), ("scal", (0, 1, 2)), ("uscal", (0, 1)),
    ("conlst", (4, 5)),  # after stage 0's three evaluations and the zero-shot one: in stage 1 or 2
    ("msmo", (0, 1)),  # teacher training
    ("msmo", (2, 3)),  # distillation: after the last evaluation of training
]


@pytest.mark.parametrize("script,choices", KILLS, ids=[f"{s}-after{c[0]}" for s, c in KILLS])
def test_killed_run_resumes_to_the_same_result(script, choices, reference, tmp_path):
    ref, _ = reference(script)
    # the kill point is random, and reproducible (RELIABILITY_SEED=N draws other points, for a longer search)
    rng = random.Random(f"issue9/kill/{script}/{choices}/{os.environ.get('RELIABILITY_SEED', '')}")
    n, delay = rng.choice(choices), rng.uniform(0.0, 0.5)
    run = tmp_path / "killed"
    p, log = start(script, CONFIGS[script], tmp_path, "killed")
    wait_until(p, run, n, "args.json")
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL, f"the run ended before the kill:\n{log.read_text()[-2000:]}"
    killed_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"] if (run / "checkpoint.pt").exists() \
        else None
    r = resume(script, run)
    assert r.returncode == 0, \
        f"killed after {n} records + {delay:.2f} s (checkpoint step {killed_at}):\n{r.stderr[-3000:]}"
    assert_same_as_reference(run, ref)


INTERRUPTS = [  # (script, evaluation records before Ctrl-C, file to wait for)
    ("lacol", 0, "checkpoint.pt"),  # in the first epoch: the starting checkpoint is there
    ("scal", 1, "checkpoint.pt"),  # in the middle of an epoch
    ("conlst", 5, "checkpoint.pt"),  # in stage 1 or 2
]


@pytest.mark.parametrize("script,n,file", INTERRUPTS, ids=[s for s, _, _ in INTERRUPTS])
def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_resumes(script, n, file, reference, tmp_path):
    ref, _ = reference(script)
    delay = random.Random(f"issue9/sigint/{script}/{os.environ.get('RELIABILITY_SEED', '')}").uniform(0.0, 0.3)
    run = tmp_path / "interrupted"
    p, log = start(script, CONFIGS[script], tmp_path, "interrupted")
    wait_until(p, run, n, file)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=300)
    out = log.read_text()
    assert code == 130, out[-3000:]
    assert f"Resume with: python {script}.py --resume {run}" in out
    assert "Traceback" not in out and (run / "checkpoint.pt").exists()
    if script != "conlst":  # conlst.py writes a partial summary after each finished stage
        assert not (run / "summary.json").exists()
    r = resume(script, run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_as_reference(run, ref)


def test_a_run_that_stopped_before_its_first_checkpoint_starts_over(reference, tmp_path):
    """--resume of a run directory holding only args.json (killed before its first checkpoint)."""
    ref, _ = reference("scal")
    run = tmp_path / "early"
    run.mkdir()
    (run / "args.json").write_text((ref / "args.json").read_text())
    (run / "metrics.jsonl").write_text('{"step": 4, "spl')  # a record cut short by the kill
    s = run_in_process("scal", ["--resume", str(run)])
    assert s["steps"] == 16
    assert_same_as_reference(run, ref)


# ------------------------------------------------------------------------------------------
# (c) bad input: one line, exit code 2 or 3, no traceback, nothing written
# ------------------------------------------------------------------------------------------
RESUME_ROWS = [  # (kind of broken --resume directory, what the message must say)
    ("missing", ["--resume", "no such run directory"]),
    ("corrupt_checkpoint", ["--resume", "checkpoint.pt is corrupt"]),
    ("corrupt_args", ["--resume", "args.json is corrupt"]),
    ("other_script", ["--resume", "args.json is not from this script"]),
    ("foreign_checkpoint", ["--resume", "does not fit"]),
]
IN, SUB = "in-process", "subprocess"
BAD = [  # (script, extra arguments, exit code, the message contains, how)
    # -- lacol.py: noise spec, data set, model, sizes, noisy-label files, data missing offline, --out-dir
    ("lacol", ["--noise", "bogus"], 2, ["--noise bogus", "allowed are"], IN),
    ("lacol", ["--noise", "sym100"], 2, ["--noise sym100", "[0, 100)"], IN),
    ("lacol", ["--noise", "inst250"], 2, ["--noise inst250", "[0, 100)"], IN),
    ("lacol", ["--dataset", "mnist"], 2, ["--dataset", "'mnist'", "fashion_mnist"], IN),
    ("lacol", ["--backbone", "vgg16"], 2, ["--backbone", "'vgg16'", "resnet34"], IN),
    ("lacol", ["--limit-train", "0"], 2, ["--limit-train 0", ">= 1"], IN),
    ("lacol", ["--limit-train", "100000"], 2, ["--limit-train 100000", "60000"], IN),
    ("lacol", ["--batch-size", "512"], 2, ["--batch-size 512", "256 training samples"], SUB),
    ("lacol", ["--k-neg", "32"], 2, ["--k-neg 32", "31"], IN),
    ("lacol", ["--noise-file", "{malformed_txt}"], 3, ["--noise-file", "malformed"], IN),
    ("lacol", ["--noise-file", "{short_npy}"], 3, ["--noise-file", "has 10 labels", "60000"], IN),
    ("lacol", ["--noise-file", "{classes_npy}"], 3, ["--noise-file", "0..11", "10 classes"], SUB),
    ("lacol", ["--noise-file", "{labels_csv}", "--noise-column", "worst"], 3, ["--noise-column worst", "aggre"], IN),
    ("lacol", ["--noise-file", "{missing}/labels.npy"], 3, ["--noise-file", "no such file"], IN),
    ("lacol", ["--dataset", "cifar10", "--backbone", "resnet18", "--data-dir", "{empty}"], 3, ["cifar10", "offline"],
     IN),
    ("lacol", ["--out-dir", "{file}/runs"], 2, ["--out-dir {file}/runs", "directory"], IN),
    # -- scal.py: task, training tasks and split, model, sizes, data missing offline, --out-dir
    ("scal", ["--task", "mnist"], 2, ["--task", "'mnist'", "trec"], IN),
    ("scal", ["--train-tasks", "bogus"], 2, ["--train-tasks bogus", "allowed are"], IN),
    ("scal", ["--train-split", "dev"], 2, ["--train-split dev", "train, test"], IN),
    ("scal", ["--model", "no-such-model"], 3, ["model no-such-model", "offline"], SUB),
    ("scal", ["--limit-train", "0"], 2, ["--limit-train 0"], IN),
    ("scal", ["--limit-train", "100000"], 2, ["--limit-train 100000", "5452"], IN),
    ("scal", ["--batch-size", "256"], 2, ["--batch-size 256", "128 training examples"], IN),
    ("scal", ["--data-dir", "{empty}"], 3, ["TREC train", "{empty}"], IN),
    ("scal", ["--source", "hub"], 3, ["TREC train", "offline"], IN),
    ("scal", ["--out-dir", "{file}/runs"], 2, ["--out-dir {file}/runs", "directory"], IN),
    # -- uscal.py: training data, model, sizes, data missing offline, --out-dir
    ("uscal", ["--train-data", "bogus"], 2, ["--train-data", "'bogus'", "senteval"], IN),
    ("uscal", ["--model", "no-such-model"], 3, ["model no-such-model"], IN),
    ("uscal", ["--limit-train", "0"], 2, ["--limit-train 0"], IN),
    ("uscal", ["--limit-train", "10000000"], 2, ["--limit-train 10000000", "39017"], IN),
    ("uscal", ["--batch-size", "128"], 2, ["--batch-size 128", "96 training sentences"], SUB),
    ("uscal", ["--data-dir", "{empty}"], 3, ["SentEval", "{empty}"], IN),
    ("uscal", ["--train-data", "wiki1m", "--source", "auto"], 3, ["wiki1m", "offline"], IN),
    ("uscal", ["--out-dir", "{file}/runs"], 2, ["--out-dir {file}/runs", "directory"], IN),
    # -- conlst.py: languages, source data set, model, sizes and K, data missing offline, files, --out-dir
    ("conlst", ["--lang", "xx"], 2, ["--lang xx", "allowed are", "fr"], IN),
    ("conlst", ["--langs", "fr", "xx"], 2, ["--langs xx", "allowed are"], IN),
    ("conlst", ["--select-lang", "xx"], 2, ["--select-lang xx"], IN),
    ("conlst", ["--source-task", "imdb"], 2, ["--source-task", "'imdb'", "snli"], IN),
    ("conlst", ["--model", "no-such-model"], 3, ["model no-such-model"], IN),
    ("conlst", ["--limit-train", "0"], 2, ["--limit-train 0"], IN),
    ("conlst", ["--s0-batch-size", "128"], 2, ["--s0-batch-size 128", "64 labeled source pairs"], IN),
    ("conlst", ["--s2-batch-size", "200"], 2, ["--s2-batch-size 200", "96 pairs of the unlabeled pool"], IN),
    ("conlst", ["--k-neg", "96"], 2, ["--k-neg 96", "at most 95"], SUB),
    ("conlst", ["--data-dir", "{empty}"], 3, ["SNLI dev", "offline"], IN),
    ("conlst", ["--bt", "file", "--bt-file", "{malformed_txt}"], 3, ["malformed.txt:1", "back-translation"], IN),
    ("conlst", ["--stage0-from", "{empty}"], 3, ["--stage0-from", "no stage0.pt"], IN),
    ("conlst", ["--out-dir", "{file}/runs"], 2, ["--out-dir {file}/runs", "directory"], IN),
    # -- msmo.py: languages, domain (data set), model, sizes, data missing offline, teachers, --out-dir
    ("msmo", ["--lang", "de"], 2, ["--lang", "'de'", "fr"], IN),
    ("msmo", ["--eval-langs", "fr", "xx"], 2, ["--eval-langs xx", "allowed are"], IN),
    ("msmo", ["--domain", "laptops"], 2, ["--domain laptops", "rest"], IN),
    ("msmo", ["--model", "no-such-model"], 3, ["model no-such-model"], IN),
    ("msmo", ["--limit-train", "0"], 2, ["--limit-train 0"], IN),
    ("msmo", ["--batch-size", "300"], 2, ["--batch-size 300", "256 training sentences"], IN),
    ("msmo", ["--cons-batch", "1000"], 2, ["--cons-batch 1000", "aligned sentence pairs"], SUB),
    ("msmo", ["--data-dir", "{empty}"], 3, ["XABSA gold-en-train", "not found"], IN),
    ("msmo", ["--method", "distill", "--teachers", "{empty}"], 3, ["--teachers", "not a run directory"], IN),
    ("msmo", ["--out-dir", "{file}/runs"], 2, ["--out-dir {file}/runs", "directory"], IN),
    # -- every script: a missing or corrupt --resume directory (one of them as a subprocess)
    *[(s, ["--resume", f"{{resume:{kind}}}"], 3, expect, SUB if (s, kind) == ("msmo", "corrupt_checkpoint") else IN)
      for s in SCRIPTS for kind, expect in RESUME_ROWS],
]
BASE = {"lacol": CONFIGS["lacol"], "scal": CONFIGS["scal"], "uscal": CONFIGS["uscal"], "conlst": ["--preset", "smoke"],
        "msmo": ["--preset", "smoke"]}


def tree(path: Path) -> dict:
    """Every file under `path` with its size, modification time and content hash."""
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns,
                                       hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(path.rglob("*")) if f.is_file()}


def broken_run_dir(script: str, kind: str, where: Path) -> Path:
    """A run directory of `script` broken as `kind` says (its args.json points --out-dir at where/saved_out)."""
    run = where / f"run_{kind}"
    if kind == "missing":
        return run
    run.mkdir(parents=True)
    other = "scal" if script == "lacol" else "lacol"
    mod = importlib.import_module(other if kind == "other_script" else script)
    args = dataclasses.asdict(parse_args(mod.Args, [*BASE[mod.__name__], "--out-dir", str(where / "saved_out")],
                                         presets=mod.PRESETS))
    (run / "args.json").write_text("{\"seed\": 0, " if kind == "corrupt_args" else json.dumps(args))
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "test", "acc": 10.0}\n')
    if kind == "corrupt_checkpoint":
        (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    elif kind == "foreign_checkpoint":
        torch.save({"step": 3, "model": {"w": torch.zeros(2)}}, run / "checkpoint.pt")
    else:
        torch.save({"step": 3}, run / "checkpoint.pt")
    return run


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "malformed.txt").write_text("3\n7\nseven\n")
    np.save(d / "short.npy", np.arange(10))
    np.save(d / "classes.npy", np.arange(60000) % 12)  # Fashion-MNIST has 10 classes
    (d / "labels.csv").write_text("train_index,aggre,random1\n0,1,2\n")
    (d / "file").write_text("a file, not a directory\n")
    return d


@pytest.mark.parametrize("script,argv,code,expect,how", BAD,
                         ids=[f"{s}:{' '.join(a).replace('{', '').replace('}', '')}" for s, a, *_ in BAD])
def test_bad_input_is_one_line_with_its_exit_code_and_writes_nothing(script, argv, code, expect, how, bad_files,
                                                                      tmp_path, capsys):
    need_data(script)
    empty = tmp_path / "empty"
    empty.mkdir()
    paths = {"empty": str(empty), "missing": str(tmp_path / "missing"), "file": str(bad_files / "file"),
             **{k: str(bad_files / k.replace("_", ".", 1)) for k in ("malformed_txt", "short_npy", "classes_npy",
                                                                       "labels_csv")}}
    argv = [a.format(**paths) if not a.startswith("{resume:") else a for a in argv]
    expect = [e.format(**paths) for e in expect]
    resume_dir = None
    if argv[0] == "--resume":
        resume_dir = broken_run_dir(script, argv[1][len("{resume:"):-1], tmp_path)
        argv = ["--resume", str(resume_dir)]
        expect = [e.replace("--resume", f"--resume {resume_dir}") for e in expect]
    before = tree(resume_dir) if resume_dir is not None and resume_dir.exists() else None
    out = tmp_path / "runs"
    full = [*BASE[script], *argv] if resume_dir is None else argv
    if "--out-dir" not in argv:
        full += ["--out-dir", str(out)]
    file_before = (bad_files / "file").read_text()

    if how == SUB:
        r = subprocess.run([sys.executable, f"{script}.py", *full], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
        got, err = r.returncode, r.stderr
    else:
        mod = importlib.import_module(script)
        with pytest.raises(SystemExit) as e:
            with utils.cli_errors():
                mod.main(parse_args(mod.Args, full, presets=mod.PRESETS))
        got, err = e.value.code, capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for part in expect:
        assert part in lines[0], (part, lines[0])
    # nothing written: no run directory, the --resume directory as it was, the data folders untouched
    assert not out.exists() and not (tmp_path / "saved_out").exists()
    assert not any(empty.iterdir()) and not (tmp_path / "missing").exists()
    assert (bad_files / "file").read_text() == file_before
    if before is not None:
        assert tree(resume_dir) == before


def test_the_table_covers_every_bad_input_of_the_issue():
    """Rows per script, and the issue's list of bad inputs, each against the scripts it applies to."""
    per_script = {s: sum(row[0] == s for row in BAD) for s in SCRIPTS}
    assert all(n >= 13 for n in per_script.values()), per_script
    assert all(any(row[0] == s and row[4] == SUB for row in BAD) for s in SCRIPTS)

    def flags(script):
        return {a for row in BAD if row[0] == script for a in row[1] if a.startswith("--")}

    applies = {
        "noise spec": (("lacol",), "--noise"), "noisy-label file": (("lacol",), "--noise-file"),
        "data set": (SCRIPTS, None), "task": (("scal",), "--task"), "language": (("conlst", "msmo"), None),
        "model": (SCRIPTS, None), "limit-train 0": (SCRIPTS, "--limit-train"),
        "batch size": (SCRIPTS, None), "K negatives": (("lacol", "conlst"), "--k-neg"), "resume": (SCRIPTS, "--resume"),
        "out-dir": (SCRIPTS, "--out-dir"), "data missing offline": (SCRIPTS, None),
    }
    alternatives = {"data set": {"--dataset", "--task", "--train-data", "--source-task", "--domain"},
                    "language": {"--lang", "--langs", "--eval-langs"},
                    "model": {"--model", "--backbone"},
                    "batch size": {"--batch-size", "--s0-batch-size", "--s2-batch-size"},
                    "data missing offline": {"--data-dir", "--source"}}
    for what, (scripts, flag) in applies.items():
        for s in scripts:
            assert (flags(s) & alternatives[what]) if flag is None else flag in flags(s), (what, s)


# ------------------------------------------------------------------------------------------
# (d) a NaN loss: exit code 4 naming step and term, the last checkpoint kept; or skipped
# ------------------------------------------------------------------------------------------
DIVERGE = {  # script -> (loss function made NaN, at its n-th call, arguments, failing step, term, checkpoint step)
    "lacol": ("latent_contrastive_loss_eq2", 2,
              ["--preset", "demo", "--limit-train", "128", "--limit-eval", "100", "--epochs", "2",
               "--warmup-epochs", "1",
               "--batch-size", "32", "--num-workers", "0"], 5, "l_ms", 4),
    "scal": ("infonce_eq7", 3, [*SCAL_SMOKE, "--task", "trec", "--eval-every", "1", "--max-steps", "4"], 2,
             "l_ct",
             2),
    "uscal": ("infonce_eq4", 6, [*USCAL_SMOKE, "--eval-every", "1", "--max-steps", "4"], 2, "l_adv", 2),
    "conlst": ("ft_step", 3, ["--preset", "smoke", "--s0-epochs", "1", "--s0-eval-every", "1", "--wo-conl", "--wo-st"],
               2, "l_ce", 2),
    "msmo": ("aspect_consistency", 2, ["--preset", "smoke", "--eval-every", "1"], 5, "l_cons", 5),
}


def nan_at(fn, call: int):
    """`fn` whose result (a loss, or (loss, terms)) is NaN at its call-th call."""
    calls = {"n": 0}

    def wrapped(*a, **k):
        out = fn(*a, **k)
        calls["n"] += 1
        if calls["n"] != call:
            return out
        if isinstance(out, tuple):
            return out[0] * float("nan"), {t: v * float("nan") for t, v in out[1].items()}
        return out * float("nan")

    return wrapped


@pytest.mark.parametrize("script", SCRIPTS)
def test_nonfinite_loss_stops_with_exit_4_or_is_skipped(script, tmp_path, monkeypatch, capsys):
    need_data(script)
    fn, call, argv, step, term, ckpt_step = DIVERGE[script]
    mod = importlib.import_module(script)
    real = getattr(mod, fn)
    monkeypatch.setattr(mod, fn, nan_at(real, call))
    with pytest.raises(SystemExit) as e:
        with utils.cli_errors():
            mod.main(parse_args(mod.Args, [*argv, "--out-dir", str(tmp_path), "--exp-name", "stop"],
                                presets=mod.PRESETS))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 4 and len(err) == 1, err
    assert f"non-finite loss at step {step} (term: {term})" in err[0] and "checkpoint is kept" in err[0]
    run = tmp_path / "stop"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == ckpt_step
    assert not (run / "summary.json").exists()

    monkeypatch.setattr(mod, fn, nan_at(real, call))
    s = mod.main(parse_args(mod.Args, [*argv, "--out-dir", str(tmp_path), "--exp-name", "skip", "--skip-nonfinite"],
                            presets=mod.PRESETS))
    assert s["skipped_nonfinite_steps"] == 1
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["skipped_nonfinite_steps"] == 1
    recs = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped_nonfinite"] == 1 and recs[0]["skipped_nonfinite"] == (1 if recs[0]["step"] > step else 0)
    assert all(math.isfinite(v) for r in recs for v in r.values() if isinstance(v, float))
    assert f"step {step} (term: {term}); step skipped" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_after_every_step_resumes_to_the_same_result(script, reference, tmp_path, monkeypatch):
    """Exhaustive (minutes): Ctrl-C after each training step in turn (a SIGINT sent to this process
    from the step's loss check), then --resume, in-process; every resumed run equals the reference."""
    ref, ref_summary = reference(script)
    real = utils.check_finite
    total = sum(ref_summary["stages"][s]["steps"] for s in ref_summary["stages"]) if script == "msmo" \
        else ref_summary["steps"]
    for k in range(total):
        calls = {"n": 0}

        def interrupt_at_k(*a, **kw):
            calls["n"] += 1
            if calls["n"] == k + 1:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **kw)

        monkeypatch.setattr(utils, "check_finite", interrupt_at_k)
        with pytest.raises(SystemExit) as e:
            run_in_process(script, [*CONFIGS[script], "--out-dir", str(tmp_path), "--exp-name", f"k{k}"])
        assert e.value.code == 130, k
        monkeypatch.setattr(utils, "check_finite", real)
        run_in_process(script, ["--resume", str(tmp_path / f"k{k}")])
        assert records(tmp_path / f"k{k}") == records(ref), k
        assert summary(tmp_path / f"k{k}") == summary(ref), k
