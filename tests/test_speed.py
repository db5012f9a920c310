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
