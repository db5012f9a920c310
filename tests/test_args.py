"""Every script's arguments: --help works, and a bad value of any flag is refused with one line naming
the flag (a UsageError: exit code 2 under cli_errors), before anything is written. The bad values are
generated from each field's type and bounds (common.utils.field_rules), not from a list kept by hand."""

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import utils
from common.utils import UsageError, parse_args

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("lacol", "scal", "uscal", "conlst", "msmo")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_lists_every_flag(script):
    r = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    mod = importlib.import_module(script)
    missing = [flag(f.name) for f in dataclasses.fields(mod.Args) if flag(f.name) not in r.stdout]
    assert not missing and "--seed" in r.stdout and "--preset" in r.stdout, missing


def bad_values(name: str, rule: tuple) -> list[str]:
    """Values the field must refuse, from its type, bounds and choices."""
    base, _, bounds, choices = rule
    if name == "preset":
        return ["no-such-preset"]
    out = ["not-a-choice"] if choices else []
    if base is bool:
        out.append("maybe")
    if base in (int, float):
        out += [bounds["ge"] - 1] if "ge" in bounds else [bounds["gt"]] if "gt" in bounds else []
        out += [bounds["le"] + 1] if "le" in bounds else [bounds["lt"]] if "lt" in bounds else []
    out += ["nan", "inf", "-inf"] if base is float else ["1.5", "x"] if base is int else []
    return [str(v) for v in out]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_field_refuses_its_bad_values(script):
    mod = importlib.import_module(script)
    rules = utils.field_rules(mod.Args)
    defaults = parse_args(mod.Args, [], presets=mod.PRESETS)  # the defaults themselves are valid
    tried, wrong = 0, []
    for name, rule in rules.items():
        base, is_list = rule[0], rule[1]
        if base in (int, float, bool):
            assert bad_values(name, rule), name  # every number and switch has something to refuse
        if base in (int, float) and name != "preset":
            assert "gt" in rule[2] or "ge" in rule[2], name  # and a lower bound
        for bad in bad_values(name, rule):
            # a list: its valid default elements, then the bad one (each element is checked)
            argv = [flag(name), *map(str, getattr(defaults, name) or []), bad] if is_list else [f"{flag(name)}={bad}"]
            tried += 1
            try:
                parse_args(mod.Args, argv, presets=mod.PRESETS)
                wrong.append(f"{argv}: accepted")
            except UsageError as e:
                msg = str(e)
                if "\n" in msg or not re.match(rf"(argument )?{re.escape(flag(name))}[ :]", msg):
                    wrong.append(f"{argv}: {msg!r}")
    assert tried > 3 * len([r for r in rules.values() if r[0] in (int, float)]), tried
    assert not wrong, "\n".join(wrong)


def test_seeds_and_bounds_in_messages():
    import conlst
    import lacol

    for argv, msg in [(["--seed", str(2**32)], "--seed 4294967296: must be in [0, 4294967295]"),
                      (["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
                      (["--lr=nan"], "--lr nan: must be finite and > 0"),
                      (["--momentum=inf"], "--momentum inf: must be finite and >= 0"),
                      (["--lr-gamma", "-1"], "--lr-gamma -1.0: must be > 0"),
                      (["--randaug-ops", "-7"], "--randaug-ops -7: must be >= 0"),
                      (["--randaug-magnitude", "31"], "--randaug-magnitude 31: must be in [0, 30]"),
                      (["--milestones", "3", "0"], "--milestones 0: must be >= 1"),
                      (["--limit-train", "0"], "--limit-train 0: must be >= 1 (or leave it out)")]:
        with pytest.raises(UsageError) as e:
            parse_args(lacol.Args, argv, presets=lacol.PRESETS)
        assert str(e.value) == msg
    with pytest.raises(UsageError, match=r"^--s2-lr nan: must be finite and > 0$"):
        parse_args(conlst.Args, ["--s2-lr", "nan"], presets=conlst.PRESETS)
    assert parse_args(lacol.Args, ["--seed", str(2**32 - 1), "--warmup-epochs", "0"]).seed == 2**32 - 1


def test_bad_value_exits_2_in_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "msmo.py", "--lr", "nan", "--out-dir", str(tmp_path / "runs")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: --lr nan: must be finite and > 0", r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_value_with_a_preset_or_on_resume_is_refused(script, tmp_path):
    mod = importlib.import_module(script)
    for preset in mod.PRESETS:
        with pytest.raises(UsageError, match=r"^--seed 4294967296: "):
            parse_args(mod.Args, ["--preset", preset, "--seed", str(2**32)], presets=mod.PRESETS)
    with pytest.raises(UsageError, match=r"^--max-steps 0: "):  # a flag --resume may change
        parse_args(mod.Args, ["--resume", str(tmp_path), "--max-steps", "0"], presets=mod.PRESETS)
    # a run whose args.json holds a bad value (edited by hand): refused after reading it, nothing written
    saved = dataclasses.asdict(parse_args(mod.Args, ["--out-dir", str(tmp_path / "runs")], presets=mod.PRESETS))
    name = next(n for n, r in utils.field_rules(mod.Args).items() if r[0] is float and saved[n] is not None)
    utils.atomic_write_json(tmp_path / "args.json", {**saved, name: float("nan")})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UsageError, match=rf"^{flag(name)} nan: must be finite"):
        mod.main(parse_args(mod.Args, ["--resume", str(tmp_path)], presets=mod.PRESETS))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
