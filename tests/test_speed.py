"""benchmarks/speed.py on a small batch: it writes the figures the speed suite reports."""
import json

from benchmarks import speed, suites


def test_scal_speed_writes_ratio_floor_and_throughput(tmp_path):
    assert speed.main(["--method", "scal", "--reps", "2", "--batch-size", "16", "--out-dir", str(tmp_path),
                       "--exp-name", "s"]) == 0
    best = json.loads((tmp_path / "s" / "summary.json").read_text())["best"]
    for view in suites._speed_views("scal"):  # every figure the report reads is there
        assert view.best.split(".", 1)[1] in best
    # a SCAL step does ft's work plus a second forward/backward (at batch 16 the optimizer step
    # is not yet the larger part of a step, as it is at batch 4): both ratios are well above 1
    assert best["ratio"] > 1.2 and best["floor_ratio"] > 1.2
    assert best["fwd_s"] < best["fwd_grad_embeds_s"] and best["fwd_s"] < best["fwd_bwd_s"]


def test_conlst_steps_time_method_and_baseline_on_the_same_batch(shared_data, tmp_path):
    """CoNLST's stage-1 and stage-2 steps against fine-tuning and plain FixMatch (moved from conlst.py)."""
    import conlst
    from common.utils import parse_args

    a = parse_args(conlst.Args, ["--preset", "smoke", "--gamma", "0.34", "--out-dir", str(tmp_path)],
                   presets=conlst.PRESETS)
    t = speed.conlst_step_times(a, repeats=1)
    assert set(t) == {"ft_s", "conl_s", "fixmatch_s", "st_s", "conl_over_ft", "st_over_fixmatch"}
    assert all(v > 0 for v in t.values())
