import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from common import utils
from common.utils import MissingError, UsageError, arg


@dataclasses.dataclass
class Args:
    """A toy argument set."""

    seed: int = arg(1, "random seed")
    lr: float = arg(0.1, "learning rate")
    method: str = arg("a", "which method", choices=["a", "b"])
    flag: bool = arg(True, "a switch")
    name: str | None = arg(None, "optional name")
    ids: list[int] = arg(None, "several ids")
    preset: str | None = arg(None, "named settings")


PRESETS = {"fast": {"lr": 1.0, "seed": 7, "_doc": "quick"}}


def test_parse_args_types_and_bools():
    a = utils.parse_args(Args, ["--seed", "3", "--lr", "0.5", "--no-flag", "--ids", "1", "2"])
    assert (a.seed, a.lr, a.flag, a.ids, a.name) == (3, 0.5, False, [1, 2], None)
    assert utils.parse_args(Args, ["--flag", "false"]).flag is False
    assert utils.parse_args(Args, ["--flag"]).flag is True


def test_preset_then_flags_override():
    a = utils.parse_args(Args, ["--preset", "fast", "--seed", "2"], presets=PRESETS)
    assert (a.lr, a.seed, a.preset) == (1.0, 2, "fast")


def test_bad_choice_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        with utils.cli_errors():
            utils.parse_args(Args, ["--method", "zzz"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method" in err and "'a', 'b'" in err


def test_cli_errors_exit_codes(capsys):
    for exc, code in [(UsageError("--x 1: bad"), 2), (MissingError("data: gone"), 3)]:
        with pytest.raises(SystemExit) as e:
            with utils.cli_errors():
                raise exc
        assert e.value.code == code
    assert capsys.readouterr().err.count("error:") == 2


def test_seed_everything_reproducible():
    utils.seed_everything(5)
    a = torch.rand(3)
    utils.seed_everything(5)
    assert torch.equal(a, torch.rand(3))


def test_auto_precision_follows_native_cpu_bf16(monkeypatch, tmp_path):
    """`auto` on CPU: bf16 where the CPU has native bf16, fp32 elsewhere (capability faked both
    ways, through the cpuinfo flags and through the LIS_CPU_BF16 override); summary.json records it."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("LIS_CPU_BF16", raising=False)
    for flags, native in (("fpu sse2 avx2 avx512f avx512_bf16", True), ("fpu sse2 amx_tile amx_bf16", True),
                          ("fpu sse2 avx2 avx512f", False)):
        real_open = open
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f,
                                                                           *a, **k))
        assert utils.cpu_has_native_bf16() is native
        assert utils.resolve_precision("auto", cpu) == ((torch.bfloat16, False) if native else (None, False))
        assert utils.resolve_precision("fp32", cpu) == (None, False)  # fp32 stays available everywhere
        monkeypatch.setattr("builtins.open", real_open)
        summary = utils.write_summary(tmp_path, {})
        assert summary["precision"] == "fp32" and "cpu_bf16" in summary  # the last call asked for fp32
    for forced, want in (("1", torch.bfloat16), ("0", None)):
        monkeypatch.setenv("LIS_CPU_BF16", forced)
        assert utils.resolve_precision("auto", cpu) == (want, False)
        assert utils.write_summary(tmp_path, {})["precision"] == ("bf16" if want else "fp32")


def test_device_and_precision_on_cpu():
    dev = utils.resolve_device("auto")
    if not torch.cuda.is_available():
        assert dev.type == "cpu"
        with pytest.raises(UsageError, match="--device cuda"):
            utils.resolve_device("cuda")
        with pytest.raises(UsageError, match="--precision fp16"):
            utils.resolve_precision("fp16", dev)
    cpu = torch.device("cpu")
    assert utils.resolve_precision("auto", cpu) == (None, False)
    assert utils.resolve_precision("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(UsageError, match="--precision"):
        utils.resolve_precision("int8", cpu)
    with pytest.raises(UsageError, match="--device"):
        utils.resolve_device("tpu")
    with utils.autocast(cpu, torch.bfloat16):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with utils.autocast(cpu, None):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_run_dir_never_reused(tmp_path):
    a = utils.make_run_dir(tmp_path, "r")
    b = utils.make_run_dir(tmp_path, "r")
    assert a.name == "r" and b.name == "r-2"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_run_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UsageError, match="--out-dir"):
        utils.make_run_dir(ro, "r")


def test_run_dir_out_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="--out-dir"):
        utils.make_run_dir(f, "r")


def test_atomic_write_keeps_old_file_when_writer_dies(tmp_path):
    p = tmp_path / "summary.json"
    utils.atomic_write_json(p, {"a": 1})

    class Boom(Exception):
        pass

    def bad(fh):
        fh.write('{"a": 2, "trunc')
        raise Boom

    with pytest.raises(Boom):
        utils._atomic_replace(p, bad, "w")
    assert json.loads(p.read_text()) == {"a": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind


def test_atomic_write_survives_sigkill(tmp_path):
    """A process killed in the middle of writing a large checkpoint leaves the old one."""
    p = tmp_path / "checkpoint.pt"
    utils.atomic_torch_save({"step": 1}, p)
    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(utils.Path(utils.__file__).parent.parent)!r})
        from common import utils
        class Killer:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)
        utils.atomic_torch_save({{"big": torch.zeros(2_000_000), "k": Killer()}}, {str(p)!r})
    """)
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9
    assert torch.load(p)["step"] == 1


def test_metrics_writer_and_truncate(tmp_path):
    w = utils.MetricsWriter(tmp_path)
    for s in (1, 2, 3):
        w.write(s, "test", epoch=s, acc=s / 10)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "spl')  # a line cut by a crash
    w.truncate_after(2)
    recs = utils.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2] and recs[1]["acc"] == 0.2


def test_checkpoint_roundtrip_and_errors(tmp_path):
    utils.save_checkpoint(tmp_path, {"x": torch.arange(3), "rng": utils.rng_state()})
    ck = utils.load_checkpoint(tmp_path)
    assert ck["x"].tolist() == [0, 1, 2]
    utils.set_rng_state(ck["rng"])
    with pytest.raises(MissingError, match="no such run directory"):
        utils.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingError, match="no checkpoint.pt"):
        utils.load_checkpoint(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MissingError, match="corrupt"):
        utils.load_checkpoint(tmp_path / "bad")


def test_check_finite_names_the_term():
    utils.check_finite(torch.tensor(1.0), 3, {"a": torch.tensor(1.0)})
    with pytest.raises(utils.DivergedError, match="step 7.*l_ms"):
        utils.check_finite(torch.tensor(float("nan")), 7,
                           {"l_ce": torch.tensor(1.0), "l_ms": torch.tensor(float("nan"))})


def test_summary_has_versions_and_commit(tmp_path):
    s = utils.write_summary(tmp_path, {"method": "x"})
    assert s["versions"]["torch"] == torch.__version__.split("+")[0] or s["versions"]["torch"]
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "x"
    # the CPU model and the kernels' instruction set: reruns on another CPU can differ
    assert s["cpu"].endswith(", " + torch.backends.cpu.get_cpu_capability()) and len(s["cpu"]) > 2 + len(
        torch.backends.cpu.get_cpu_capability())


def test_check_out_dir_fails_early_and_creates_nothing(tmp_path):
    utils.check_out_dir(tmp_path / "a" / "b")  # creatable: fine, and nothing is created
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="--out-dir .*file is not a directory"):
        utils.check_out_dir(tmp_path / "file" / "runs")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="--out-dir .*not writable"):
            utils.check_out_dir(ro / "runs")


@dataclasses.dataclass
class RunArgs:
    seed: int = arg(0, "seed")
    max_steps: int | None = arg(None, "limit")
    resume: str = arg("", "run directory")


def test_resume_run_keeps_the_runs_arguments_unless_given(tmp_path):
    utils.atomic_write_json(tmp_path / "args.json", {"seed": 3, "max_steps": 8, "resume": ""})
    cli = utils.parse_args(RunArgs, ["--resume", str(tmp_path)])
    assert utils.flags_given(cli) == {"resume"}
    args, ckpt = utils.resume_run(RunArgs, tmp_path, {"resume": str(tmp_path)})
    assert (args.seed, args.max_steps, ckpt) == (3, 8, None)  # no checkpoint yet: the run starts over
    args, _ = utils.resume_run(RunArgs, tmp_path, {"resume": str(tmp_path), "max_steps": 20})
    assert args.max_steps == 20
    utils.atomic_write_json(tmp_path / "args.json", {"seed": 3, "noise": "sym40"})  # another script's run
    with pytest.raises(MissingError, match="not from this script"):
        utils.resume_run(RunArgs, tmp_path, {})
    utils.atomic_write_json(tmp_path / "args.json", {"seed": 3})
    torch.save({"step": 1}, tmp_path / "checkpoint.pt")
    _, ckpt = utils.resume_run(RunArgs, tmp_path, {})
    with pytest.raises(MissingError, match="does not fit this script .*'model'"):
        utils.require_keys(ckpt, ("step", "model"), tmp_path)
    with pytest.raises(MissingError, match="does not fit this run .*RuntimeError"):
        with utils.restoring(tmp_path):
            torch.nn.Linear(2, 2).load_state_dict({"weight": torch.zeros(3, 3)})


def test_metrics_writer_counts_records_and_resumes_to_a_count(tmp_path):
    w = utils.MetricsWriter(tmp_path)
    for s in (1, 2, 2, 3):  # two records at step 2 (e.g. an evaluation-only item between checkpoints)
        w.write(s, "eval", acc=float(s))
    assert w.lines == 4
    (tmp_path / ".checkpoint.pt.x.tmp").write_bytes(b"half")  # left by a kill during an atomic write
    w2 = utils.MetricsWriter(tmp_path)
    assert w2.lines == 4
    w2.resume({"step": 2, "metrics_lines": 2}, 2)  # the checkpoint was written after the second record
    assert [r["step"] for r in utils.read_metrics(tmp_path)] == [1, 2] and w2.lines == 2
    assert not list(tmp_path.glob(".*.tmp"))
    w2.resume({"step": 1}, 1)  # an older checkpoint without a count: by step
    assert [r["step"] for r in utils.read_metrics(tmp_path)] == [1]
    w2.resume(None, 0)  # no checkpoint: the run starts over
    assert utils.read_metrics(tmp_path) == []


def test_check_finite_can_skip(capsys):
    assert utils.check_finite(torch.tensor(float("inf")), 4, {"l_ce": torch.tensor(float("inf"))}, skip=True) is False
    assert "step 4 (term: l_ce); step skipped" in capsys.readouterr().err


def test_cli_errors_turn_ctrl_c_into_exit_130(capsys):
    with pytest.raises(SystemExit) as e:
        with utils.cli_errors():
            raise KeyboardInterrupt
    assert e.value.code == 130 and len(capsys.readouterr().err.strip().splitlines()) == 1
