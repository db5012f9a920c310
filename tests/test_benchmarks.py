"""The benchmark harness on hand-made run folders: expansion, skip/resume, failure
recording, report statistics, regression check."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from benchmarks import check, report, run, suites
from benchmarks.suites import Run, Suite

HERE = Path(__file__).resolve().parent.parent / "benchmarks"


def _write_run(folder: Path, run_id: str, seed: int, curve: list[float], metric: str = "acc"):
    d = folder / f"{run_id}__seed{seed}"
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as fh:
        for i, v in enumerate(curve):
            fh.write(json.dumps({"step": i + 1, "epoch": i + 1, "split": "test", metric: v}) + "\n")
    best = max(curve)
    (d / "summary.json").write_text(json.dumps({
        "final": {metric: curve[-1]}, "best": {metric: best, "epoch": curve.index(best) + 1}, "seed": seed,
        "machine": "test", "git_commit": "abc"}))
    return d


@pytest.fixture
def toy_suite(monkeypatch):
    s = Suite("toy", [Run("a", "lacol.py", ("--x", "1"), "Toy table", "lacol/cifar10/sym40/lacol"),
                      Run("b", "lacol.py", ("--x", "2"), "Toy table")], (0, 1, 2),
              [suites.Claim("a beats b", "a", "b")])
    monkeypatch.setitem(suites.SUITES, "toy", s)
    monkeypatch.setitem(run.SUITES, "toy", s)
    monkeypatch.setitem(report.SUITES, "toy", s)
    monkeypatch.setitem(check.SUITES, "toy", s)
    return s


def test_expansion_suite_times_seeds_and_only(toy_suite):
    jobs = run.expand("toy", None, None)
    assert [(r.id, s) for r, s in jobs] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [(r.id, s) for r, s in run.expand("toy", [5], ["b"])] == [("b", 5)]
    cmd = run.command(toy_suite.runs[0], 1, Path("out"), "python")
    assert cmd == ["python", "lacol.py", "--x", "1", "--seed", "1", "--out-dir", "out", "--exp-name", "a__seed1"]


def test_paper_suite_covers_every_lacol_table_row():
    rows = {r.row for r in suites.SUITES["paper"].runs if r.row}
    with open(HERE / "reported.csv") as fh:
        lacol_rows = {r["id"] for r in csv.DictReader(fh) if r["paper"] == "lacol"}
    assert lacol_rows <= rows  # every reproducible LaCoL number has a run


def test_paper_suite_covers_every_reported_row_or_says_why_not():
    p = suites.SUITES["paper"]
    refs = {r.row for r in p.runs} | {v.row for r in p.runs for v in r.views} | {a.row for a in p.averages}
    with open(HERE / "reported.csv") as fh:
        ids = {r["id"] for r in csv.DictReader(fh)}
    assert ids - refs == set(suites.PAPER_LEFT_OUT)
    assert all(suites.PAPER_LEFT_OUT.values())


def test_reported_rows_referenced_by_suites_exist():
    with open(HERE / "reported.csv") as fh:
        ids = {r["id"] for r in csv.DictReader(fh)}
    for s in suites.SUITES.values():
        for r in s.runs:
            assert r.row is None or r.row in ids, r.row
            assert all(v.row is None or v.row in ids for v in r.views), r.id
        assert all(a.row is None or a.row in ids for a in s.averages)
        assert all(set(a.runs) <= {r.id for r in s.runs} for a in s.averages)
        names = {r.id for r in s.runs} | {a.id for a in s.averages}
        assert all(c.left in names and c.right in names for c in s.claims)


def test_skip_if_done_resume_if_checkpoint_and_record_failures(toy_suite, tmp_path, monkeypatch):
    a, b = toy_suite.runs
    _write_run(tmp_path, "a", 0, [1.0, 2.0])
    assert run.status(a, 0, tmp_path) == "done"
    rec = run.execute(a, 0, tmp_path, None, log=lambda *x: None)
    assert rec["status"] == "skipped"
    # a started run with a checkpoint is resumed
    d = tmp_path / "b__seed0"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(b"x")
    assert run.status(b, 0, tmp_path) == "resume"
    assert run.command(b, 0, tmp_path, "python")[-2:] == ["--resume", str(d)]
    # a failing command is recorded, and the runner goes on
    bad = Run("bad", "-c", ("import sys; sys.stderr.write('boom\\n'); sys.exit(7)",), "Toy table")
    monkeypatch.setattr(run, "command", lambda r, s, o, p=None: ["python3", "-c", r.args[0]])
    rec = run.execute(bad, 0, tmp_path, None, log=lambda *x: None)
    assert rec["status"] == "failed" and rec["returncode"] == 7
    failures = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert failures[0]["id"] == "bad" and "boom" in failures[0]["stderr_tail"]


def test_results_dir_gets_the_small_files_only(toy_suite, tmp_path):
    d = _write_run(tmp_path / "runs", "a", 0, [1.0])
    (d / "checkpoint.pt").write_bytes(b"big")
    run.copy_small_files(d, tmp_path / "results")
    assert sorted(p.name for p in (tmp_path / "results" / "a__seed0").iterdir()) == ["metrics.jsonl", "summary.json"]


def test_report_mean_std_best_and_last(toy_suite, tmp_path):
    curves = {0: [50.0, 70.0, 60.0], 1: [55.0, 65.0, 64.0], 2: [40.0, 80.0, 62.0]}
    for seed, c in curves.items():
        _write_run(tmp_path, "a", seed, c)
    _write_run(tmp_path, "b", 0, [10.0, 20.0])
    st = report.row_stats(toy_suite.runs[0], report.collect(tmp_path)["a"])
    assert st["n"] == 3
    assert st["best"][0] == pytest.approx(statistics.fmean([70, 65, 80]))
    assert st["best"][1] == pytest.approx(statistics.stdev([70, 65, 80]))
    assert st["last"][0] == pytest.approx(statistics.fmean([60, 64, 62]))
    text = report.build_report("toy", tmp_path, tmp_path / "out", plots=True)
    assert "| a | acc | 3 | fp32 | 71.67 ± 7.64 | 62.00 ± 2.00 | 92.33 |" in text
    assert "best (oracle: chosen on the test set)" in text  # lacol.py's best epoch is picked on the test set
    assert "partial (1/3 seeds)" in text  # b has one of three seeds
    # matched seeds: a has 3 seeds, b only seed 0, so the claim compares seed 0 only
    assert "| a beats b | last evaluation | one seed only | +40.00 (seed 0) | 60.00 ± 0.00 | 20.00 ± 0.00 |" in text
    assert (tmp_path / "out" / "report.md").exists() and list((tmp_path / "out").glob("curves_*.png"))


def test_check_passes_on_its_own_baseline_and_fails_on_a_regression(toy_suite, tmp_path):
    for seed, v in enumerate([60.0, 61.0, 62.0]):
        _write_run(tmp_path / "base", "a", seed, [v])
        _write_run(tmp_path / "base", "b", seed, [30.0 + seed])
    base_file = tmp_path / "baseline.json"
    assert check.main(["--suite", "toy", "--runs", str(tmp_path / "base"), "--baseline", str(base_file),
                       "--update"]) == 0
    assert check.main(["--suite", "toy", "--runs", str(tmp_path / "base"), "--baseline", str(base_file)]) == 0
    # a regression: method a drops by 6 points (tolerance = max(3 * std 1.0, floor 2.0) = 3)
    for seed, v in enumerate([54.0, 55.0, 56.0]):
        _write_run(tmp_path / "worse", "a", seed, [v])
        _write_run(tmp_path / "worse", "b", seed, [30.0 + seed])
    assert check.main(["--suite", "toy", "--runs", str(tmp_path / "worse"), "--baseline", str(base_file)]) == 1
    # within tolerance: a drop of 2.5
    for seed, v in enumerate([57.5, 58.5, 59.5]):
        _write_run(tmp_path / "near", "a", seed, [v])
        _write_run(tmp_path / "near", "b", seed, [30.0 + seed])
    assert check.main(["--suite", "toy", "--runs", str(tmp_path / "near"), "--baseline", str(base_file)]) == 0
    # a missing run fails
    _write_run(tmp_path / "missing", "a", 0, [61.0])
    assert check.main(["--suite", "toy", "--runs", str(tmp_path / "missing"), "--baseline", str(base_file)]) == 1


def test_check_compares_each_named_number_a_diagnostic_either_way_and_names_the_run_folder(monkeypatch, tmp_path,
                                                                                          capsys):
    """A run's `checks`: a quality metric fails only when it gets worse; a diagnostic ("both") fails
    when it moves either way beyond max(3 x seed std, floor); "log.<key>" reads the last metrics.jsonl
    record with <key>. The failing line names the number, its baseline, the tolerance and the folders."""
    C = suites.Check
    s = Suite("toy_checks", [Run("r", "x.py", (), "G", checks=(C("acc", "final.acc"),
                                                               C("l_ms", "log.l_ms", "both", floor=0.05)))], (0, 1))
    monkeypatch.setitem(check.SUITES, "toy_checks", s)

    def write(folder, acc, l_ms):
        for seed, (a, lm) in enumerate(zip(acc, l_ms)):
            d = _write_run(folder, "r", seed, [50.0, a])
            with open(d / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": 9, "split": "train", "l_ms": lm}) + "\n")
                fh.write(json.dumps({"step": 10, "split": "test", "acc": a}) + "\n")  # the last record lacks l_ms
    write(tmp_path / "base", [80.0, 81.0], [1.00, 1.02])
    base_file = tmp_path / "b.json"
    assert check.main(["--suite", "toy_checks", "--runs", str(tmp_path / "base"), "--baseline", str(base_file),
                       "--update"]) == 0
    assert json.loads(base_file.read_text())["runs"]["r"]["checks"]["l_ms"]["values"] == [1.00, 1.02]
    seed = {"summary": {}, "metrics": [{"g": 1.0}, {"g": None}, {"h": 5.0}, {"g": 3.0}]}
    assert check.read(seed, "logmean.g") == 2.0 and check.read(seed, "log.g") == 3.0  # mean of all / the last
    cases = {"same": ([80.0, 81.0], [1.00, 1.02], 0), "acc_up": ([90.0, 91.0], [1.00, 1.02], 0),
             "acc_down": ([70.0, 71.0], [1.00, 1.02], 1), "l_ms_down": ([80.0, 81.0], [0.50, 0.52], 1),
             "l_ms_up": ([80.0, 81.0], [1.50, 1.52], 1), "l_ms_within": ([80.0, 81.0], [1.04, 1.06], 0)}
    for name, (acc, l_ms, rc) in cases.items():
        write(tmp_path / name, acc, l_ms)
        capsys.readouterr()
        assert check.main(["--suite", "toy_checks", "--runs", str(tmp_path / name), "--baseline",
                           str(base_file)]) == rc, name
        out = capsys.readouterr().out
        assert len([x for x in out.splitlines() if x.startswith("r ")]) == 2  # one line per number
        if name == "l_ms_down":
            line = next(x for x in out.splitlines() if "l_ms (log.l_ms)" in x)
            assert "0.51 vs baseline 1.01: moved by 0.5 > tolerance 0.05" in line
            assert str(tmp_path / name / "r__seed0") in line and str(tmp_path / name / "r__seed1") in line


def test_check_crash_only_rows_need_a_finite_result_and_new_runs_need_a_baseline(monkeypatch, tmp_path, capsys):
    """A compare=False row is not compared with its baseline (it sits at chance) but must exist
    with a finite metric; a suite run missing from the baseline fails the check."""
    s = Suite("toy_crash", [Run("a", "x.py", (), "G"), Run("c", "x.py", (), "G", compare=False)], (0, 1))
    monkeypatch.setitem(check.SUITES, "toy_crash", s)
    base = {"runs": {"a": {"metric": "acc", "mean": 60.0, "std": 0.0, "values": [60.0, 60.0]},
                     "c": {"metric": "acc", "mean": 50.0, "std": 0.0, "values": [50.0, 50.0]}}}
    fresh = {"a": {"mean": 60.0, "values": [60.0]}, "c": {"mean": 10.0, "values": [10.0]}}
    assert check.check(base, fresh) != []  # compared, c's fall of 40 points fails
    assert check.check(base, fresh, crash_only={"c"}) == []  # crash-only: not compared
    nan = {"a": fresh["a"], "c": {"mean": float("nan"), "values": [float("nan")]}}
    assert [p.split(":")[0] for p in check.check(base, nan, crash_only={"c"})] == ["c"]
    assert [p.split(":")[0] for p in check.check(base, {"a": fresh["a"]}, crash_only={"c"})] == ["c"]
    # through main: the suite's compare=False decides, and the output says which rows are crash-only
    for seed in (0, 1):
        _write_run(tmp_path / "runs", "a", seed, [60.0])
        _write_run(tmp_path / "runs", "c", seed, [5.0])
    (tmp_path / "b.json").write_text(json.dumps(base))
    assert check.main(["--suite", "toy_crash", "--runs", str(tmp_path / "runs"), "--baseline",
                       str(tmp_path / "b.json")]) == 0
    assert "crash-only (at chance)" in capsys.readouterr().out
    monkeypatch.setitem(check.SUITES, "toy_crash", Suite("toy_crash", s.runs + [Run("new", "x.py", (), "G")], (0, 1)))
    assert check.main(["--suite", "toy_crash", "--runs", str(tmp_path / "runs"), "--baseline",
                       str(tmp_path / "b.json")]) == 1
    assert "new: in the suite but not in the baseline" in capsys.readouterr().out


def test_smoke_suite_compares_a_learning_row_of_every_method_with_method_specific_checks():
    """Issue #27: every script has a compared row, and each compared row checks at least one number
    the method itself moves (a loss term or a selection statistic read from metrics.jsonl, or a stage
    gain), not only the backbone's accuracy; the other rows are crash-only."""
    compared = [r for r in suites.SUITES["smoke"].runs if r.compare]
    assert {r.script for r in compared} == {"lacol.py", "scal.py", "uscal.py", "conlst.py", "msmo.py"}
    for r in compared:
        assert any(c.direction == "both" for c in r.checks), r.id
        assert all(c.direction in ("higher", "lower", "both") and c.floor > 0 for c in r.checks), r.id
        assert "--deterministic" in r.args and r.only_seeds is None, r.id  # two seeds: a spread of its own


def test_dry_run_lists_the_paper_suite(capsys):
    assert run.main(["--suite", "paper", "--dry-run", "--only", "lacol"]) == 0
    out = capsys.readouterr().out
    assert "lacol.py --preset cifar100 --noise asym40 --wo-sc --seed 4" in out
    assert "180 runs" in out


def test_placeholders_phases_views_averages_and_claims_on_paths(monkeypatch, tmp_path):
    V = suites.View
    s = Suite("toy2", [Run("t_x", "conlst.py", ("--from", "{out}/base__seed{seed}/stage0.pt"), "G", phase=1),
                       Run("m_fr", "msmo.py", (), "G", metric="f1_fr"), Run("m_es", "msmo.py", (), "G", metric="f1_es"),
                       Run("multi", "conlst.py", (), "G", views=(V("fr zero-shot", "per_lang.fr.stage0.acc",
                                                                   "per_lang.fr.stage0.acc"),
                                                                 V("avg", "avg.best", "avg.final")))],
              (0, 1), [suites.Claim("final above zero-shot", "multi", "multi", left_path="avg.final",
                                    right_path="per_lang.fr.stage0.acc"),
                       suites.Claim("avg of m above 50", "m_avg", "multi", "best", right_path="avg.best")],
              averages=[suites.Average("m_avg", ("m_fr", "m_es"), "G")])
    for mod in (suites, run, report, check):
        monkeypatch.setitem(mod.SUITES, "toy2", s)
    # a later phase runs after every seed of the earlier phase; placeholders are filled
    assert [(r.id, sd) for r, sd in run.expand("toy2", None, None)] == [
        ("m_fr", 0), ("m_es", 0), ("multi", 0), ("m_fr", 1), ("m_es", 1), ("multi", 1), ("t_x", 0), ("t_x", 1)]
    assert run.command(s.runs[0], 1, Path("o"), "python")[2:4] == ["--from", "o/base__seed1/stage0.pt"]
    # views read dotted paths; the average is per seed over the runs, then over seeds
    for seed in (0, 1):
        for rid, metric, v in (("m_fr", "f1_fr", 40.0 + seed), ("m_es", "f1_es", 60.0 + 3 * seed)):
            d = tmp_path / f"{rid}__seed{seed}"
            d.mkdir()
            (d / "summary.json").write_text(json.dumps({"best": {metric: v}, "final": {metric: v - 1}}))
        d = tmp_path / f"multi__seed{seed}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"avg": {"best": 45.0 + seed, "final": 44.0},
                                                    "per_lang": {"fr": {"stage0": {"acc": 41.0}}}}))
    data = report.collect(tmp_path)
    st = report.row_stats(s.runs[3], data["multi"], s.runs[3].views[0])
    assert st["n"] == 2 and st["best"] == (41.0, 0.0)
    av = report.average_stats(s.averages[0], {r.id: r for r in s.runs}, data)
    assert av["best_values"] == [50.0, 52.0] and av["last"][0] == pytest.approx(50.0)
    text = report.build_report("toy2", tmp_path, tmp_path / "out", plots=False)
    assert "| multi | fr zero-shot | 2 | fp32 | 41.00 ± 0.00 | 41.00 ± 0.00 |" in text
    assert "| m_avg | mean over runs | 2 | fp32 | 51.00 ± 1.41 | 50.00 ± 1.41 |" in text
    assert ("| final above zero-shot | `avg.final` vs `per_lang.fr.stage0.acc` | held | +3.00 ± 0.00 (n=2) | "
            "44.00 ± 0.00 | 41.00 ± 0.00 |") in text
    # a best checkpoint that no dev split selected is an oracle, never a claim
    assert "| avg of m above 50 | best (oracle: chosen on the test set): `the per-seed mean of its runs` vs " \
           "`avg.best` | not a claim (best chosen on the test set) | +5.50 ± 0.71 (n=2) |" in text
    # the regression check reads the first view's last value
    assert check.fresh_values("toy2", tmp_path)["multi"]["values"] == [41.0, 41.0]


def test_committed_runs_are_skipped_and_needed_ones_rerun_and_compared(monkeypatch, tmp_path):
    """A run already in --results-dir is skipped; a later run that needs its folder (its model)
    makes it run again first, and the rerun is compared with the committed metrics."""
    s = Suite("toy3", [Run("base", "x.py", (), "G"), Run("other", "x.py", (), "G"),
                       Run("dep", "x.py", ("--from", "{out}/base__seed{seed}", "--t", "{out}/other__seed0"), "G",
                           phase=1)], (0, 1))
    for mod in (suites, run):
        monkeypatch.setitem(mod.SUITES, "toy3", s)
    out, results = tmp_path / "out", tmp_path / "results"
    assert run.needs(s.runs[2], 1) == [("base", 1), ("other", 0)]
    for rid in ("base", "other"):
        for seed in (0, 1):
            _write_run(results, rid, seed, [1.0, 2.0 + seed])
    assert run.status(s.runs[0], 0, out, results) == "committed"
    jobs, rerun = run.schedule(run.expand("toy3", None, ["dep"]), "toy3", out, results)
    # each dep job comes after what it needs; other__seed1 is not needed and not scheduled
    assert [(r.id, sd) for r, sd in jobs] == [("base", 0), ("other", 0), ("dep", 0), ("base", 1), ("dep", 1)]
    assert rerun == {("base", 0), ("other", 0), ("base", 1)}
    # without a dependent, a committed run is skipped
    assert run.execute(s.runs[1], 1, out, results, log=lambda *x: None)["status"] == "skipped"
    assert not (out / "other__seed1").exists()

    # a rerun that reproduces the committed metrics, and one that does not
    def fake_run(cmd, **kw):
        name = cmd[cmd.index("--exp-name") + 1]
        seed = int(name[-1])
        _write_run(out, name.split("__")[0], seed, [1.0, 2.0 + seed + (0.5 if name == "base__seed1" else 0.0)])
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    committed_before = (results / "base__seed1" / "summary.json").read_text()
    assert run.execute(s.runs[0], 0, out, results, log=lambda *x: None, rerun=True)["same_as_committed"] is True
    assert run.execute(s.runs[0], 1, out, results, log=lambda *x: None, rerun=True)["same_as_committed"] is False
    assert (results / "base__seed1" / "summary.json").read_text() == committed_before  # committed files kept
    # both reruns are logged once, beside the results; the one that differs is kept there,
    # since a later run reads its model
    assert not (out / "reruns.jsonl").exists()
    kept = [json.loads(x) for x in (tmp_path / "reruns" / "reruns.jsonl").read_text().splitlines()]
    assert [(r["run"], r["same_as_committed"]) for r in kept] == [("base__seed0", True), ("base__seed1", False)]
    copies = [p.name for p in (tmp_path / "reruns").iterdir() if p.is_dir()]
    assert kept[0]["copy"] is None and copies == [kept[1]["copy"]]
    rerun1 = json.loads((tmp_path / "reruns" / kept[1]["copy"] / "summary.json").read_text())
    assert rerun1 == json.loads((out / "base__seed1" / "summary.json").read_text()) != json.loads(committed_before)


def test_a_run_whose_dependency_failed_is_recorded_and_not_started(tmp_path, monkeypatch):
    dep = Run("dep", "x.py", ("--from", "{out}/base__seed{seed}"), "G")
    ev = run.threading.Event()
    ev.ok = False
    ev.set()
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: pytest.fail("must not start"))
    rec = run.execute(dep, 0, tmp_path, None, log=lambda *x: None, wait={("base", 0): ev})
    assert rec["status"] == "failed" and "base__seed0" in rec["stderr_tail"]
    assert json.loads((tmp_path / "failures.jsonl").read_text())["id"] == "dep"


def test_a_one_seed_row_takes_its_groups_seed_spread(tmp_path):
    """A single-seed baseline row is checked with the largest seed std of its group's
    several-seed rows, not with the floor alone; other groups keep their own spread."""
    base = {"runs": {
        "g_multi": {"metric": "acc", "mean": 50.0, "std": 5.0, "values": [46.5, 53.5]},
        "g_one": {"metric": "acc", "mean": 40.0, "std": 0.0, "values": [40.0]},
        "h_one": {"metric": "acc", "mean": 40.0, "std": 0.0, "values": [40.0]}}}
    groups = {"g_multi": "G", "g_one": "G", "h_one": "H"}
    assert check.seed_spread(base, groups) == {("g_multi", "acc"): 5.0, ("g_one", "acc"): 5.0, ("h_one", "acc"): 0.0}

    def fresh(g_one, h_one):
        return {"g_multi": {"mean": 50.0}, "g_one": {"mean": g_one}, "h_one": {"mean": h_one}}

    assert check.check(base, fresh(30.0, 39.0), groups=groups) == []  # 10 below: within 3 x 5
    assert [p.split(":")[0] for p in check.check(base, fresh(20.0, 39.0), groups=groups)] == ["g_one"]  # 20 below
    assert [p.split(":")[0] for p in check.check(base, fresh(30.0, 37.0), groups=groups)] == ["h_one"]  # floor 2


def test_a_run_made_with_other_explicit_arguments_is_stale_and_runs_again(tmp_path, monkeypatch):
    """After a suite changes a run's arguments (e.g. a new --lr), the finished run, fresh or
    committed, no longer counts as done, and a started one is not resumed: it runs again from
    the start and its files replace the old ones."""
    r = Run("a", "x.py", ("--preset", "cpu", "--lr", "1e-4", "--langs", "fr", "de", "--wo-st",
                          "--from", "{out}/base__seed{seed}"), "G")
    out, results = tmp_path / "out", tmp_path / "results"
    d = _write_run(results, "a", 0, [1.0, 2.0])
    args = {"preset": "cpu", "lr": 0.0001, "langs": ["fr", "de"], "wo_st": True, "from": "elsewhere/base__seed0",
            "seed": 0}
    (d / "args.json").write_text(json.dumps(args))
    assert run.stale_args(r, 0, d) == [] and run.status(r, 0, out, results) == "committed"
    for change, flag in (({"lr": 3e-5}, "--lr"), ({"langs": ["fr"]}, "--langs"), ({"wo_st": False}, "--wo-st"),
                         ({"preset": "cpu-pairs"}, "--preset")):
        (d / "args.json").write_text(json.dumps({**args, **change}))
        assert [x.split(":")[0] for x in run.stale_args(r, 0, d)] == [flag]
        assert run.status(r, 0, out, results) == "stale"
    # a fresh run folder is checked the same way
    fresh = _write_run(out, "a", 0, [5.0])
    (fresh / "args.json").write_text(json.dumps({**args, "lr": 3e-5}))
    assert run.status(r, 0, out, results) == "stale"
    (fresh / "summary.json").unlink()  # started, not finished: resumed only with the suite's arguments
    (fresh / "checkpoint.pt").write_bytes(b"")
    assert run.status(r, 0, out, results) == "stale"
    (fresh / "args.json").write_text(json.dumps(args))
    assert run.status(r, 0, out, results) == "resume"
    (fresh / "args.json").write_text(json.dumps({**args, "lr": 3e-5}))

    def fake_run(cmd, **kw):
        assert not fresh.exists()  # the stale folder was cleared first
        d2 = _write_run(out, "a", 0, [7.0])
        (d2 / "args.json").write_text(json.dumps(args))
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    assert run.execute(r, 0, out, results, log=lambda *x: None)["status"] == "ok"
    assert json.loads((results / "a__seed0" / "summary.json").read_text())["best"]["acc"] == 7.0
    assert run.status(r, 0, out, results) == "done"


def test_slurm_launcher_skips_done_clears_stale_and_chains_dependencies(monkeypatch, tmp_path):
    """The Slurm launcher submits what the local one would run, in the same order: done and
    committed runs are skipped (a committed one a later run needs is submitted again), a stale
    folder is cleared before submission, and a run waits (afterok) for the jobs it needs."""
    pytest.importorskip("submitit")
    s = Suite("toy4", [Run("base", "x.py", ("--lr", "1"), "G"), Run("done", "x.py", (), "G"),
                       Run("dep", "x.py", ("--from", "{out}/base__seed{seed}"), "G", phase=1)], (0,))
    for mod in (suites, run):
        monkeypatch.setitem(mod.SUITES, "toy4", s)
    out, results = tmp_path / "out", tmp_path / "results"
    _write_run(out, "done", 0, [1.0])
    stale = _write_run(out, "base", 0, [1.0])
    (stale / "args.json").write_text(json.dumps({"lr": 2.0, "seed": 0}))
    _write_run(results, "other", 0, [1.0])  # not in the suite: ignored

    class FakeExecutor:
        def __init__(self):
            self.params, self.submitted = {}, []

        def update_parameters(self, **kw):
            self.params = kw

        def submit(self, fn):
            name = fn.command[fn.command.index("--exp-name") + 1]
            self.submitted.append((name, self.params["slurm_additional_parameters"]))
            return type("J", (), {"job_id": str(100 + len(self.submitted))})()

    ex = FakeExecutor()
    jobs, rerun = run.schedule(run.expand("toy4", None, None), "toy4", out, results)
    args = type("A", (), {"slurm_time_min": 10, "slurm_partition": "p", "slurm_gpus": 1, "slurm_cpus": 2})()
    assert run.submit_slurm(jobs, out, args, results, rerun, executor=ex) == [("base", 0), ("dep", 0)]
    assert not stale.exists()  # the stale folder was cleared before its job was submitted
    assert ex.submitted == [("base__seed0", {}), ("dep__seed0", {"dependency": "afterok:101"})]
    assert ex.params["timeout_min"] == 10 and ex.params["cpus_per_task"] == 2


def test_lookup_takes_a_difference_of_two_paths():
    """A view path "x - y" is a gain over the run's own baseline (conlst.py: over the stage-0
    model that run read); missing parts give None, as for a plain path."""
    s = {"per_lang": {"fr": {"best": {"acc": 47.5}, "stage0": {"acc": 45.0}}}}
    assert report.lookup(s, "per_lang.fr.best.acc - per_lang.fr.stage0.acc") == pytest.approx(2.5)
    assert report.lookup(s, "per_lang.fr.stage0.acc - per_lang.fr.best.acc") == pytest.approx(-2.5)
    assert report.lookup(s, "per_lang.fr.best.acc - per_lang.de.stage0.acc") is None
    assert report.lookup(s, "per_lang.fr.best.acc") == 47.5


def test_conlst_tables_gains_and_pooled_bins(tmp_path, capsys):
    """Gains are taken per run over its own stage 0; bin accuracy is pooled by pair counts."""
    from benchmarks import conlst_tables

    for lang in suites.CONLST_CPU_LANGS:
        for seed, (z, s1, best, mid) in enumerate([(40.0, 44.0, 45.0, (80.0, 10)), (30.0, 31.0, 29.0, (50.0, 30))]):
            for kind, zz in (("full", z), ("wo_conl", z + 1.0)):
                d = tmp_path / f"conlst_cpu_{lang}_{kind}__seed{seed}"
                d.mkdir()
                bins = {f"after_stage{st}": {"mid": {"acc": mid[0] - 10 * st, "n": mid[1] * (st + 1)}} for st in (0, 1)}
                (d / "summary.json").write_text(json.dumps({"per_lang": {lang: {
                    "stage0": {"acc": zz}, "stage1": {"acc": s1}, "best": {"acc": best}, "bins": bins}}}))
    assert conlst_tables.main(["--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # fr: gain of stage 1 = (4, 1) -> 2.50 ± 2.12; gain of stage 2 alone = (45-41, 29-31) -> 1.00 ± 4.24
    assert ("| fr | 35.00 ± 7.07 | 37.50 ± 9.19 | 37.00 ± 11.31 | 2.50 ± 2.12 | 2.00 ± 4.24 | 36.00 ± 7.07 "
            "| 37.00 ± 11.31 | 1.00 ± 4.24 |") in out
    assert "| avg | 35.00 ± 7.07 |" in out
    # mid bin pooled: before (80*10 + 50*30) / 40 = 57.5, after (70*20 + 40*60) / 80 = 47.5
    assert "| fr | mid | 57.5 -> 47.5 | 20 -> 40 |" in out


def test_parity_table_pairs_fp32_and_bf16_runs(tmp_path):
    """benchmarks/parity.py on hand-made summaries: the differences and wall ratios it prints."""
    from benchmarks import parity

    def write(name, summary):
        d = tmp_path / f"{name}__seed0"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(summary))

    write("parity_lacol_fp32", {"final": {"acc": 80.0}, "best": {"acc": 81.0}, "wall_s": 100, "precision": "fp32"})
    write("parity_lacol_bf16", {"final": {"acc": 79.5}, "best": {"acc": 81.5}, "wall_s": 40, "precision": "bf16"})
    stage0 = {"per_lang": {"fr": {"stage0": {"acc": 50.0}}}}
    write("parity_conlst_fp32", {**stage0, "wall_s": 300, "precision": "fp32"})
    write("parity_conlst_bf16", {"per_lang": {"fr": {"stage0": {"acc": 48.0}}}, "wall_s": 100, "precision": "bf16"})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in parity.table(tmp_path)[2:]}
    assert rows["lacol"] == ["acc", "80.00", "79.50", "-0.50", "81.00", "81.50", "+0.50", "100", "40", "2.50"]
    assert rows["conlst"][1:4] == ["50.00", "48.00", "-2.00"] and rows["conlst"][-1] == "3.00"
    assert rows["msmo"][1] == "not run"
    write("parity_scal_fp32", {"final": {"err": 10.0}, "best": {"err": 9.0}, "wall_s": 10, "precision": "fp32"})
    write("parity_scal_bf16", {"final": {"err": 10.0}, "best": {"err": 9.0}, "wall_s": 10, "precision": "fp32"})
    with pytest.raises(SystemExit, match="recorded precision fp32"):  # a "bf16" run that ran in fp32
        parity.table(tmp_path)


# ----------------------------------------------------------------------------- claims: matched seeds
def _summaries(folder: Path, run_id: str, per_seed: dict[int, float | None], metric: str = "acc", **extra):
    for seed, v in per_seed.items():
        d = folder / f"{run_id}__seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"final": {metric: v}, "best": {metric: v}, "seed": seed, **extra}))


def _judge(tmp_path, claim, left: dict, right: dict, averages=()):
    ids = {claim.left, claim.right} - {a.id for a in averages} | {r for a in averages for r in a.runs}
    s = Suite("toy_claims", [Run(i, "x.py", (), "G") for i in sorted(ids)], (0, 1, 2), [claim],
              averages=list(averages))
    runs = tmp_path / "runs"
    for name, vals in ((claim.left, left), (claim.right, right)):
        if name not in {a.id for a in averages} and not (runs / f"{name}__seed{next(iter(vals), 0)}").exists():
            _summaries(runs, name, vals)
    return report.judge_claims(s, report.collect(runs))[0]


def test_claim_pairs_matched_seeds_only(tmp_path):
    """3 seeds on the left, seed 0 only on the right: the claim uses seed 0 alone, says so, and is no
    verdict; a 3-seed mean against a 1-seed number (the old rule) would have said 'yes'."""
    j = _judge(tmp_path, suites.Claim("full above ablation", "full", "abl"), {0: 74.0, 1: 70.0, 2: 80.0}, {0: 73.0})
    assert j["n"] == 1 and j["seeds"] == [0] and j["verdict"] == "one seed only"
    assert j["diff"][0] == pytest.approx(1.0) and j["left"][0] == pytest.approx(74.0)
    assert j["left_seeds"] == [0, 1, 2] and j["right_seeds"] == [0]
    assert j["folders"] == "`full__seed0`, `abl__seed0`"
    # seeds that only one side has are left out, on either side
    j = _judge(tmp_path / "b", suites.Claim("c", "l", "r"), {0: 5.0, 2: 7.0, 3: 1.0}, {1: 0.0, 2: 4.0, 3: 0.0})
    assert j["seeds"] == [2, 3] and j["diffs"] == [3.0, 1.0] and j["verdict"] == "held"


@pytest.mark.parametrize("left, right, verdict", [
    ({0: 52.0, 1: 53.0, 2: 54.0}, {0: 50.0, 1: 50.5, 2: 51.0}, "held"),  # d = 2, 2.5, 3: mean 2.5 > std 0.5
    ({0: 48.0, 1: 49.0, 2: 47.0}, {0: 50.0, 1: 50.0, 2: 50.0}, "did not hold"),  # mean -2 < -std 1
    ({0: 51.0, 1: 49.0, 2: 50.5}, {0: 50.0, 1: 50.0, 2: 50.0}, "within noise"),  # mean 0.17, std 1.04
    ({0: 50.0, 1: 50.0}, {0: 50.0, 1: 50.0}, "within noise"),  # no difference at all
    ({0: 60.0}, {0: 50.0, 1: 50.0}, "one seed only"),
    ({0: 60.0}, {1: 50.0}, "not run"),  # no seed on both sides
    ({0: None, 1: None}, {0: None, 1: None}, "not testable at this scale"),  # runs exist, no value (empty bin)
])
def test_claim_verdicts(tmp_path, left, right, verdict):
    j = _judge(tmp_path, suites.Claim("c", "l", "r"), left, right)
    assert j["verdict"] == verdict
    assert verdict in report.VERDICTS and verdict.split()[0] in report.CLAIM_RULE


def test_claim_oracle_best_seedless_side_and_averages(tmp_path):
    # "best" without the split that selected it is an oracle (chosen on the test set): never a claim
    j = _judge(tmp_path / "a", suites.Claim("c", "l", "r", "best"), {0: 2.0, 1: 3.0}, {0: 1.0, 1: 1.0})
    assert j["verdict"] == report.ORACLE_CLAIM
    j = _judge(tmp_path / "b", suites.Claim("c", "l", "r", "best", selected_on="dev"), {0: 2.0, 1: 3.0}, {0: 1.0,
                                                                                                          1: 1.0})
    assert j["verdict"] == "held" and j["reads"] == "checkpoint selected on dev"
    # a seed-independent side (an untrained model, run for seed 0) meets every seed of the other
    c = suites.Claim("trained above untrained", "t", "u", seedless="right")
    j = _judge(tmp_path / "c", c, {0: 76.0, 1: 76.5, 2: 76.2}, {0: 73.7})
    assert j["n"] == 3 and j["verdict"] == "held" and j["diffs"] == pytest.approx([2.3, 2.8, 2.5])
    # an Average side: the per-seed mean of its runs, on the seeds every run has
    runs = tmp_path / "d" / "runs"
    _summaries(runs, "m_fr", {0: 40.0, 1: 42.0, 2: 41.0})
    _summaries(runs, "m_es", {0: 60.0, 1: 58.0})
    _summaries(runs, "z", {0: 45.0, 1: 49.0, 2: 40.0})
    avg = suites.Average("m_avg", ("m_fr", "m_es"), "G")
    j = _judge(tmp_path / "d", suites.Claim("avg above z", "m_avg", "z"), {}, {}, averages=(avg,))
    assert j["seeds"] == [0, 1] and j["diffs"] == pytest.approx([5.0, 1.0]) and j["verdict"] == "held"
    assert j["folders"] == "`m_{fr,es}__seed{0,1}`, `z__seed{0,1}`"


def test_cpu_claims_never_read_an_oracle_best():
    """lacol.py and scal.py pick their best epoch on the split they report: their claims read the
    last evaluation; a claim on a best checkpoint names the dev split that selected it."""
    s = suites.SUITES["cpu"]
    by_id = {r.id: r for r in s.runs}
    avg = {a.id: a for a in s.averages}
    for c in s.claims:
        scripts = {by_id[r].script for side in (c.left, c.right) for r in (avg[side].runs if side in avg else (side,))}
        if c.which == "best":
            assert c.selected_on and not scripts & {"lacol.py", "scal.py"}, c.text
            assert all(report.BEST_SELECTED_ON[x] for x in scripts), c.text


def test_family_rows_and_brace_names():
    assert report.brace(["scal_cpu_rte_scal", "scal_cpu_rte_ft", "scal_cpu_mrpc_scal", "scal_cpu_mrpc_ft"]) == \
        ["scal_cpu_{rte,mrpc}_{scal,ft}"]
    assert report.brace(["lacol_x_lacol", "lacol_x_wo_ms"]) == ["lacol_x_{lacol,wo_ms}"]
    assert report._label(["MSMO: fr, ACS above zero-shot", "MSMO: es, ACS above zero-shot"]) == ["fr", "es"]
    assert report._family_verdict(["within noise", "held", "held"]) == "held 2, within noise 1 (of 3)"
    assert report._family_verdict(["one seed only"] * 3) == "one seed only (3 of 3)"


# ----------------------------------------------------------------------------- README block, header
README_TOY = ("# Title\n\nText before, with trailing spaces   \n\n## Claims at a glance\n\n"
              "<!-- claims:start -->\nold table\n<!-- claims:end -->\n\nText after.\r\nno newline at the end")


def test_readme_block_replacement_is_idempotent_and_touches_nothing_else(tmp_path, toy_suite):
    for seed, (a, b) in enumerate(((60.0, 50.0), (62.0, 51.0), (61.0, 52.0))):
        _write_run(tmp_path / "runs", "a", seed, [a])
        _write_run(tmp_path / "runs", "b", seed, [b])
    readme = tmp_path / "README.md"
    readme.write_bytes(README_TOY.encode())
    assert report.main(["--suite", "toy", "--runs", str(tmp_path / "runs"), "--readme", str(readme)]) == 0
    once = readme.read_bytes()
    start, end = once.index(b"<!-- claims:start -->"), once.index(b"<!-- claims:end -->")
    assert once[:start] == README_TOY.encode()[:README_TOY.index("<!-- claims:start -->")]
    assert once[end:] == README_TOY.encode()[README_TOY.index("<!-- claims:end -->"):]
    assert ("| a beats b | held | +10.00 ± 1.00 (n=3); 61.00 vs 51.00 | `a__seed{0,1,2}`, "
            "`b__seed{0,1,2}` |").encode() in once
    assert b"old table" not in once
    assert report.main(["--suite", "toy", "--runs", str(tmp_path / "runs"), "--readme", str(readme)]) == 0
    assert readme.read_bytes() == once  # idempotent
    with pytest.raises(ValueError):
        report.replace_block("no markers here", "x")


def test_header_names_the_commit_range_and_the_cpus_in_one_line_each():
    sums = [{"git_commit": "zzz0002", "machine": "m 2 cpus"}, {"git_commit": "zzz0001-dirty", "machine": "m 2 cpus"},
            {"git_commit": "zzz0002", "machine": "m 2 cpus", "cpu": "AMD EPYC"}]
    line = report.commit_line(sums)  # hashes git does not know: sorted by name
    assert "\n" not in line and "`zzz0001` .. `zzz0002`" in line and "2 commits, 1 of them" in line
    assert report.cpu_line(sums) == "CPUs: m 2 cpus, CPU model not recorded (2 runs); m 2 cpus, AMD EPYC (1 runs)."
    # commits this repository knows are ordered by commit date
    import subprocess
    log = subprocess.run(["git", "log", "-3", "--format=%h"], cwd=HERE, capture_output=True, text=True).stdout.split()
    if len(log) == 3:
        newest, oldest = log[0], log[-1]
        line = report.commit_line([{"git_commit": newest}, {"git_commit": oldest + "-dirty"}, {"git_commit": log[1]}])
        assert line.startswith(f"Runs made at commits `{oldest}` (")
        assert f".. `{newest}` (" in line and "by commit date" in line


def test_readme_claims_block_is_generated_from_the_committed_runs_and_readme_is_small():
    """README's claims at a glance is the report's output on benchmarks/results/cpu/runs, not typed:
    after a change to the runs or the claims, run `python -m benchmarks.report --suite cpu --readme README.md`."""
    root = HERE.parent
    text = (root / "README.md").read_bytes().decode()
    assert report.replace_block(text, report.glance_block("cpu", Path("benchmarks/results/cpu/runs"),
                                                          report.collect(root / "benchmarks/results/cpu/runs"))) == text
    assert len((root / "README.md").read_bytes()) <= 15_000


def test_same_metrics_finds_a_changed_digit_and_new_fields(tmp_path):
    from benchmarks import same_metrics

    def run(root, name, acc, extra=None):
        d = root / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"final": {"acc": acc}, "wall_s": 1.0 if root.name == "a" else 9.0}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "acc": acc, "elapsed_s": 0.1, **(extra or {})}) + "\n")

    run(tmp_path / "a", "r1", 50.0)
    run(tmp_path / "a", "r2", 50.0)
    run(tmp_path / "b", "r1", 50.0)  # wall time differs only: same
    run(tmp_path / "b", "r2", 50.00000000000001)  # last digit: differs
    rows = dict(same_metrics.compare(tmp_path / "a", tmp_path / "b"))
    assert rows["r1"] == "same" and rows["r2"].startswith("differs (2)")
    assert same_metrics.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    (tmp_path / "c").mkdir()
    run(tmp_path / "c", "r1", 50.0, {"sel_count_per_class": [3, 4]})
    assert dict(same_metrics.compare(tmp_path / "a", tmp_path / "c", ["r1"]))["r1"].startswith("differs")
    allowed = dict(same_metrics.compare(tmp_path / "a", tmp_path / "c", ["r1"], allow_new=True))
    assert "+2 new (sel_count_per_class)" in allowed["r1"]
