"""benchmarks/lacol_tables.py: the numbers it reads from metrics.jsonl, the calibration gate and
the warm-up rule, on hand-made runs."""

from benchmarks import lacol_tables as lt


def curve(accs, holdout=None, sel=None):
    rows = []
    for i, a in enumerate(accs):
        r = {"epoch": i + 1, "split": "test", "acc": a}
        if holdout is not None:
            r["holdout_noisy_acc"] = holdout[i]
        if sel is not None:
            r.update(selected_precision=sel, selected_frac=0.5)
        rows.append(r)
    return [{"split": "train", "epoch": 1, "l_ce": 2.0}] + rows


def test_run_numbers_last_best_and_the_holdout_peak():
    n = lt.run_numbers(curve([60, 80, 85, 70, 65], holdout=[40, 50, 49, 45, 44], sel=0.9))
    assert (n["last"], n["best"], n["best_epoch"], n["best_minus_last"]) == (65, 85, 3, 20)
    assert n["last10"] == sum([60, 80, 85, 70, 65]) / 5
    # the held-out noisy accuracy peaks at epoch 2: the test accuracy there, not the oracle's
    assert (n["holdout_peak_epoch"], n["at_holdout_peak"]) == (2, 80)
    assert abs(n["sel_precision"] - 90) < 1e-9 and n["sel_frac"] == 50
    assert lt.run_numbers([{"split": "train"}]) is None
    assert "holdout_peak_epoch" not in lt.run_numbers(curve([1, 2]))


def test_calibration_gate_and_warmup_rule():
    sym = {s: lt.run_numbers(curve([70, 85, 75, 70], holdout=h)) for s, h in
           enumerate(([1, 3, 2, 1], [1, 2, 3, 1], [3, 2, 1, 1]))}
    clean = {s: lt.run_numbers(curve([80, 89, 90, 90], holdout=[1, 2, 3, 4])) for s in range(3)}
    lines, warmup = lt.calibration({lt.PREFIX + "sym40_ce": sym, lt.PREFIX + "clean_ce": clean})
    text = "\n".join(lines)
    assert "15.00 over 3 seeds -> PASS" in text and "0.00 over 3 seeds -> PASS" in text
    assert warmup == 2  # median of the peaks [2, 3, 1]
    # two seeds are not enough for the gate, and a half rounds down to the earlier epoch
    lines, warmup = lt.calibration({lt.PREFIX + "sym40_ce": {0: sym[0], 1: sym[1]}})
    assert "FAIL" in "\n".join(lines) and warmup == 2
    small = {s: lt.run_numbers(curve([70, 85, 80, 79])) for s in range(3)}
    assert "FAIL" in "\n".join(lt.calibration({lt.PREFIX + "sym40_ce": small})[0])


def test_verdict_follows_the_report_rule():
    assert lt.verdict([3.0, 2.0, 4.0]) == "held"
    assert lt.verdict([-3.0, -2.0, -4.0]) == "did not hold"
    assert lt.verdict([1.0, -1.0, 0.5]) == "within noise"
    assert lt.verdict([1.0]) == "one seed only" and lt.verdict([]) == "not run"
