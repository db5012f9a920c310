"""benchmarks/gpu_check.py in its --tiny mode on the CPU: every method's check runs end to end (bf16
autocast, dtype hooks, checkpoint and resume) and passes. The paper-scale run needs a CUDA machine:
`python -m benchmarks.gpu_check` there."""

import json
import math

from benchmarks import gpu_check


def test_tiny_cpu_all_methods_pass(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["device_type"] == "cpu" and summary["precision"] == "bfloat16" and summary["tiny"]
    assert set(summary["methods"]) == set(gpu_check.METHODS)
    for name, res in summary["methods"].items():
        assert res["status"] == "PASS", (name, res.get("error"), res.get("checks"))
        assert len(res["losses"]) == 2 and all(math.isfinite(x) for x in res["losses"]), name
        checks = res["checks"]
        assert checks["finite_loss"] and checks["autocast_dtype"] and checks["params_fp32"], name
        assert checks["resume_state"] and checks["resume_loss"], (name, res["resume"])
        assert checks["channels_last"] is None, name  # the scripts use channels-last on CUDA only
        assert set(res["layer_output_dtypes"]) == {"bfloat16"}, name
        assert res["peak_memory_bytes"] is None, name
        assert res["samples_per_s"] > 0, name
        assert f"{name:7s} PASS" in printed
    assert summary["status"] == "PASS" and rc == 0
    assert printed.strip().splitlines()[-1].startswith("PASS: 5/5")


def test_tiny_cpu_fp32_xlmr_family(tmp_path):
    """--precision fp32 expects fp32 layer outputs; --text-model switches to the RoBERTa-type encoders (no token
    types, other special ids); --only runs a subset."""
    out = tmp_path / "x.json"
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--precision", "fp32", "--text-model", "xlm-roberta-base",
                         "--only", "scal", "msmo", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert rc == 0 and set(summary["methods"]) == {"scal", "msmo"}
    for name, res in summary["methods"].items():
        assert res["status"] == "PASS", (name, res.get("error"), res.get("checks"))
        assert set(res["layer_output_dtypes"]) == {"float32"}, name
        assert res["config"]["model"] == "xlm-roberta-base"


def test_fp32_fallback_is_caught(tmp_path, monkeypatch):
    """With autocast switched off behind the script's back, the layers compute in fp32: the check fails."""
    import contextlib

    from common import utils

    monkeypatch.setattr(utils, "autocast", lambda device, dtype: contextlib.nullcontext())
    out = tmp_path / "f.json"
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--only", "uscal", "--out", str(out)])
    res = json.loads(out.read_text())["methods"]["uscal"]
    assert rc == 1 and res["status"] == "FAIL"
    assert res["checks"]["autocast_dtype"] is False and set(res["layer_output_dtypes"]) == {"float32"}
