"""LaCoL: the losses on hand-made tensors, and short runs on real Fashion-MNIST."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lacol
from common.utils import parse_args

ROOT = Path(__file__).resolve().parent.parent


def test_selection_picks_exactly_the_agreeing_samples():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    given = torch.tensor([0, 2, 2, 1])
    assert lacol.select_high_confidence_eq3(probs, given).tolist() == [True, False, True, False]


def test_class_weights_by_hand():
    labels = torch.tensor([0, 0, 0, 1])  # eps = [3, 1, 0]
    inv = lacol.class_weights_eq4(labels, 3, "inverse")
    assert torch.allclose(inv, torch.tensor([(4 / 3) / 3, (4 / 3) / 1, 0.0]))
    prop = lacol.class_weights_eq4(labels, 3, "proportional")
    assert torch.allclose(prop, torch.tensor([0.75, 0.25, 0.0]))
    assert lacol.class_weights_eq4(labels, 3, "none").tolist() == [1.0, 1.0, 1.0]


def test_weighted_ce_is_a_weighted_mean_over_selected():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    given = torch.tensor([0, 1, 0])
    sel = torch.tensor([True, True, False])
    w = torch.tensor([1.0, 3.0])
    ce = F.cross_entropy(logits, given, reduction="none")
    expected = (1.0 * ce[0] + 3.0 * ce[1]) / 4.0
    assert torch.allclose(lacol.weighted_ce_eq4(logits, given, sel, w), expected)
    assert lacol.weighted_ce_eq4(logits, given, torch.zeros(3, dtype=torch.bool), w).item() == 0.0


def test_negative_sampler_respects_labels_and_k():
    given = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    g = torch.Generator().manual_seed(0)
    idx, valid = lacol.sample_negatives_eq1(given, k=5, generator=g)
    assert idx.shape == (10, 5)
    for i in range(10):
        chosen = idx[i][valid[i]].tolist()
        assert all(given[j] != given[i] for j in chosen)
        assert len(chosen) == len(set(chosen)) == min(5, int((given != given[i]).sum()))
    # fewer candidates than K: all of them, the rest masked out
    idx, valid = lacol.sample_negatives_eq1(torch.tensor([0, 0, 0, 1]), k=3)
    assert valid[3].sum() == 3 and sorted(idx[3].tolist()) == [0, 1, 2]
    assert valid[0].sum() == 1 and idx[0][valid[0]].tolist() == [3]
    # a batch smaller than K still gives K columns
    idx, valid = lacol.sample_negatives_eq1(torch.tensor([0, 1]), k=15)
    assert idx.shape == (2, 15) and valid.sum(1).tolist() == [1, 1]


def test_negative_sampler_is_uniform():
    given = torch.tensor([0] + [1] * 20)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(21)
    for _ in range(400):
        idx, valid = lacol.sample_negatives_eq1(given, k=5, generator=g)
        counts.index_add_(0, idx[0][valid[0]], torch.ones(int(valid[0].sum())))
    assert counts[0] == 0 and counts[1:].min() > 60 and counts[1:].max() < 140  # expected 100 each


def test_l_ms_matches_the_formula_term_by_term():
    torch.manual_seed(0)
    b, d, k, tau = 6, 4, 3, 0.2
    za, zp = F.normalize(torch.randn(b, d), dim=1), F.normalize(torch.randn(b, d), dim=1)
    given = torch.tensor([0, 0, 1, 1, 2, 2])
    idx, valid = lacol.sample_negatives_eq1(given, k)
    valid[0, 2] = False  # one masked slot must not count
    got = lacol.latent_contrastive_loss_eq2(za, zp, idx, valid, tau)
    total = 0.0
    for i in range(b):
        pos = math.exp(float(za[i] @ zp[i]) / tau)
        neg = sum(math.exp(float(za[i] @ zp[j]) / tau) for j, v in zip(idx[i].tolist(), valid[i].tolist()) if v)
        total += -math.log(pos / (pos + neg))
    assert abs(got.item() - total / b) < 1e-5


def test_l_ms_without_negatives_is_zero():
    za = F.normalize(torch.randn(3, 4), dim=1)
    idx = torch.zeros(3, 2, dtype=torch.long)
    valid = torch.zeros(3, 2, dtype=torch.bool)
    assert abs(lacol.latent_contrastive_loss_eq2(za, za, idx, valid, 0.2).item()) < 1e-6


def test_label_similarity_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # cosine: p0.p1 = 0.8 (>= 0.8 kept), p0.p2 = 0, p1.p2 = 0.6 (dropped)
    w = lacol.label_similarity_eq5(p, rho=0.8, sim="cosine")
    expected = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(w, expected / expected.sum(1, keepdim=True))
    # dot product of probability vectors (CoMatch): same here for one-hot rows; differs on soft rows
    soft = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert torch.allclose(lacol.label_similarity_eq5(soft, 0.8, "cosine"), torch.full((2, 2), 0.5))
    assert torch.allclose(lacol.label_similarity_eq5(soft, 0.8, "dot"), torch.eye(2))  # 0.5 < 0.8


def test_metric_similarity_by_hand():
    zs = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    zs2 = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    tau = 0.5
    logw = lacol.metric_log_similarity_eq6(zs, zs2, tau)
    row0 = torch.tensor([math.exp(math.sqrt(0.5) / tau), math.exp(0.0)])
    row1 = torch.tensor([math.exp(0.0), math.exp(1.0 / tau)])
    assert torch.allclose(logw.exp(), torch.stack([row0 / row0.sum(), row1 / row1.sum()]), atol=1e-6)


def test_l_sc_has_zero_gradient_when_the_similarities_agree():
    w_label = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    s = w_label.log().clone().requires_grad_(True)  # metric logits whose softmax equals W^l
    lacol.similarity_consistency_eq7(w_label, F.log_softmax(s, 1)).backward()
    assert s.grad.abs().max() < 1e-6
    s2 = torch.zeros(3, 3, requires_grad=True)  # disagreeing: non-zero gradient
    lacol.similarity_consistency_eq7(w_label, F.log_softmax(s2, 1)).backward()
    assert s2.grad.abs().max() > 0.05


def _args(tmp_path, *extra):
    return parse_args(lacol.Args, ["--preset", "demo", "--out-dir", str(tmp_path), "--num-workers", "0", *extra],
                      presets=lacol.PRESETS)


@pytest.fixture(scope="module")
def fmnist():
    from common.data import load_fashion_mnist
    from common.utils import MissingError

    try:
        load_fashion_mnist()
    except MissingError as e:
        pytest.skip(str(e))


def test_smoke_run_on_fashion_mnist_writes_run_files(tmp_path, fmnist):
    s = lacol.main(_args(tmp_path, "--limit-train", "2048", "--limit-eval", "500", "--epochs", "4",
                         "--warmup-epochs", "2", "--batch-size", "64", "--exp-name", "smoke"))
    run = tmp_path / "smoke"
    for f in ("args.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "labels.npz"):
        assert (run / f).exists(), f
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert "l_ce" in recs[0] and {"l_ls", "l_ms", "l_sc", "selected_frac", "selected_precision"} <= set(recs[2])
    assert recs[1]["l_ce"] < recs[0]["l_ce"]  # warm-up learns
    assert recs[1]["acc"] > 40  # well above chance (10%) after two short warm-up epochs
    # the LaCoL losses go down from the first LaCoL epoch to the next
    assert recs[3]["l_ls"] + recs[3]["l_ms"] < recs[2]["l_ls"] + recs[2]["l_ms"]
    # selection precision: the selected samples are far cleaner than the data (36% noise)
    assert recs[2]["selected_precision"] > 0.8
    # per-class selection diagnostics, every LaCoL epoch (none in the warm-up)
    per_class = ("sel_count_per_class", "sel_precision_per_class", "sel_recall_per_class", "class_weight")
    assert not set(per_class) & set(recs[1]) and all(len(recs[e][k]) == 10 for e in (2, 3) for k in per_class)
    assert sum(recs[2]["sel_count_per_class"]) == round(recs[2]["selected_frac"] * 2048)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["acc"] == max(r["acc"] for r in recs) and summary["final"]["acc"] == recs[-1]["acc"]
    assert 0.3 < summary["noise"]["realized_rate"] < 0.42
    assert s["steps"] == 4 * (2048 // 64)


def test_ce_loss_decreases_and_shares_noisy_labels_with_lacol(tmp_path, fmnist):
    lacol.main(_args(tmp_path, "--method", "ce", "--limit-train", "1024", "--limit-eval", "200", "--epochs", "3",
                     "--exp-name", "ce"))
    lacol.main(_args(tmp_path, "--limit-train", "1024", "--limit-eval", "200", "--epochs", "2",
                     "--exp-name", "lc", "--max-steps", "20"))
    recs = [json.loads(x) for x in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert recs[2]["l_ce"] < recs[0]["l_ce"]
    a, b = np.load(tmp_path / "ce" / "labels.npz"), np.load(tmp_path / "lc" / "labels.npz")
    assert (a["noisy"] == b["noisy"]).all() and (a["subset"] == b["subset"]).all()


@pytest.mark.parametrize("flag", ["--wo-ms", "--wo-sc", "--wo-diversity", "--selection=batch",
                                  "--class-weight=proportional", "--label-sim=dot", "--sc-stopgrad"])
def test_ablation_and_reading_flags_run(tmp_path, fmnist, flag):
    s = lacol.main(_args(tmp_path, flag, "--limit-train", "256", "--limit-eval", "100", "--epochs", "2",
                         "--warmup-epochs", "1", "--batch-size", "64"))
    assert s["epochs_done"] == 2


def test_warm_up_builds_only_the_weak_view(tmp_path, fmnist, monkeypatch):
    """CE and LaCoL's warm-up train on the weak view only, so no strong (RandAugment) view is made
    in those epochs; the LaCoL epochs make two per sample."""
    calls = {"weak": 0, "strong": 0}
    make_views = lacol.make_views

    def counting_views(*a, **k):
        weak, strong, test_view = make_views(*a, **k)

        def count(kind, view):
            def f(x):
                calls[kind] += 1
                return view(x)
            return f
        return count("weak", weak), count("strong", strong), test_view
    monkeypatch.setattr(lacol, "make_views", counting_views)
    lacol.main(_args(tmp_path, "--limit-train", "256", "--limit-eval", "100", "--epochs", "2", "--warmup-epochs", "1",
                     "--batch-size", "64", "--num-workers", "0", "--max-steps", "4"))
    # epoch 1 (warm-up): 4 batches of 64, weak views only; the selection pass of epoch 2 makes 256 weak
    # views, and the steps budget (4) ends training before any LaCoL batch: no strong view at all
    assert calls["strong"] == 0 and calls["weak"] >= 256
    calls.update(weak=0, strong=0)
    lacol.main(_args(tmp_path, "--limit-train", "256", "--limit-eval", "100", "--epochs", "2", "--warmup-epochs", "1",
                     "--batch-size", "64", "--num-workers", "0", "--exp-name", "two"))
    assert calls["strong"] == 2 * 256  # the LaCoL epoch: two strong views per sample (4 full batches)


def test_paper_path_resnet34_on_cifar_shaped_fake_data(tmp_path):
    """Code path of the paper's CIFAR-10 configuration (ResNet-34, 32x32x3, K=15, three views)
    for a few steps. FakeData: random images and labels; the accuracy means nothing."""
    args = parse_args(lacol.Args, ["--dataset", "fake_cifar10", "--out-dir", str(tmp_path), "--num-workers", "0",
                                   "--batch-size", "32", "--warmup-epochs", "0", "--epochs", "1", "--max-steps", "2",
                                   "--noise", "sym40"])
    assert args.backbone == "resnet34" and args.k_neg == 15 and args.tau == 0.2 and args.lambda_sc == 0.5
    s = lacol.main(args)
    assert s["steps"] == 2


def _run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "lacol.py", *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cifar_offline_exits_3_with_one_line(tmp_path):
    r = _run("--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "runs"))
    assert r.returncode == 3, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cifar10" in err[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("argv,flag", [(["--noise", "sym100"], "--noise"), (["--noise", "bogus"], "--noise"),
                                       (["--dataset", "mnist"], "--dataset"), (["--limit-train", "0"], "--limit-train"),
                                       (["--method", "xx"], "--method")])
def test_bad_arguments_exit_2(tmp_path, argv, flag):
    r = _run(*argv, "--out-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_flag():
    r = _run("--help")
    assert r.returncode == 0
    for flag in ("--noise", "--wo-ms", "--wo-sc", "--wo-diversity", "--preset", "--resume", "--k-neg",
                 "--class-weight"):
        assert flag in r.stdout


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, fmnist):
    common = ["--limit-train", "512", "--limit-eval", "300", "--epochs", "3", "--warmup-epochs", "1",
              "--batch-size", "64", "--milestones", "2", "--deterministic"]
    full = lacol.main(_args(tmp_path, *common, "--exp-name", "full"))
    # the same run stopped after two epochs (as if killed there), then resumed
    lacol.main(_args(tmp_path, *common, "--exp-name", "cut", "--max-steps", str(2 * (512 // 64))))
    # --max-steps given with --resume replaces the cut run's own limit
    resumed = lacol.main(parse_args(lacol.Args, ["--resume", str(tmp_path / "cut"), "--max-steps", "1000"]))
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    recs = lambda name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["acc"] for r in recs("cut")] == [r["acc"] for r in recs("full")]


def test_same_seed_same_metrics(tmp_path, fmnist):
    common = ["--limit-train", "256", "--limit-eval", "200", "--epochs", "2", "--warmup-epochs", "1",
              "--batch-size", "64",
              "--deterministic"]
    a = lacol.main(_args(tmp_path, *common, "--exp-name", "a"))
    b = lacol.main(_args(tmp_path, *common, "--exp-name", "b"))
    recs = lambda name: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}  # noqa: E731
                         for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert recs("a") == recs("b") and a["final"] == b["final"]


def test_resume_errors(tmp_path):
    r = _run("--resume", str(tmp_path / "nope"))
    assert r.returncode == 3 and "--resume" in r.stderr and "Traceback" not in r.stderr


# ---- issue 28: per-class selection diagnostics, --weak-aug, --holdout, the cpu-mem preset, skipped epochs
def test_selection_per_class_by_hand():
    from common.diagnostics import selection_per_class

    given = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    clean = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2])  # wrong given labels: samples 2 and 4
    sel = torch.tensor([True, False, True, True, True, False, False, False])
    out = selection_per_class(sel, given, clean, 4)
    assert out["sel_count_per_class"] == [2, 2, 0, 0]
    # precision = P(given right | selected, given k): class 0: {0 right, 2 wrong}; class 1: {3 right, 4 wrong}
    assert out["sel_precision_per_class"] == [0.5, 0.5, None, None]
    # recall = P(selected | given right, given k): class 0: {0, 1} right, 0 selected; class 1: {3}; class 2: none
    assert out["sel_recall_per_class"] == [0.5, 1.0, 0.0, None]
    assert selection_per_class(sel, given, None, 4) == {"sel_count_per_class": [2, 2, 0, 0]}


def test_batch_selection_log_by_hand():
    from common.diagnostics import batch_selection_log, selection_log

    given, clean = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 1, 2])
    drawn = torch.tensor([1, 1, 0, 1, -1, -1], dtype=torch.int8)  # samples 4, 5 were in no step
    log = batch_selection_log(drawn, given, clean, 3)
    assert log["selected_frac"] == 3 / 4 and log["selected_precision"] == 2 / 3
    assert log["sel_count_per_class"] == [2, 1, 0] and log["sel_recall_per_class"] == [1.0, 0.5, None]
    assert batch_selection_log(torch.zeros(6, dtype=torch.int8), given, None, 3) == {
        "selected_frac": 0.0, "sel_count_per_class": [0, 0, 0]}
    log = selection_log(drawn == 1, given, clean, 3)
    assert log["selected_frac"] == 0.5 and math.isclose(log["selected_precision"], 2 / 3, rel_tol=1e-6)
    assert log["sel_precision_per_class"] == [0.5, 1.0, None]


def test_weak_aug_none_is_the_identity_and_strong_is_randaugment_alone():
    x = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    weak, strong, test = lacol.make_views("fashion_mnist", 28, 2, 9, "none")
    assert torch.equal(weak(x), x) and weak(x).dtype == torch.uint8 and torch.equal(test(x), x)
    assert [type(t).__name__ for t in strong.transforms] == ["Identity", "RandAugment"]
    torch.manual_seed(0)
    assert strong(x).dtype == torch.uint8 and any(not torch.equal(strong(x), x) for _ in range(5))
    crop_flip = lacol.make_views("fashion_mnist", 28, 2, 9)[0]  # the default
    assert [type(t).__name__ for t in crop_flip.transforms] == ["RandomCrop", "RandomHorizontalFlip"]
    assert parse_args(lacol.Args, []).weak_aug == "crop_flip"


def test_cpu_mem_preset_and_the_cpu_preset_unchanged():
    a = parse_args(lacol.Args, ["--preset", "cpu-mem"], presets=lacol.PRESETS)
    want = {"dataset": "fashion_mnist", "backbone": "cnn_fc", "weak_aug": "none", "weight_decay": 0.0,
            "limit_train": 12000, "epochs": 40, "milestones": [30, 35], "lr": 0.05, "momentum": 0.9,
            "warmup_epochs": 10, "batch_size": 128, "lr_gamma": 0.1, "holdout": 0, "inst_pixels": "raw"}
    assert {k: getattr(a, k) for k in want} == want
    c = parse_args(lacol.Args, ["--preset", "cpu"], presets=lacol.PRESETS)
    assert (c.backbone, c.weak_aug, c.weight_decay, c.limit_train, c.epochs, c.milestones, c.warmup_epochs, c.lr) == (
        "small_cnn", "crop_flip", 5e-4, 4000, 20, [12, 17], 4, 0.05)


def test_holdout_logs_noisy_accuracy_and_keeps_the_labels(tmp_path, fmnist):
    common = ["--method", "ce", "--limit-train", "512", "--limit-eval", "100", "--epochs", "2", "--batch-size", "64",
              "--preset", "cpu-mem", "--num-workers", "0"]
    lacol.main(_args(tmp_path, *common, "--holdout", "128", "--exp-name", "h"))
    lacol.main(_args(tmp_path, *common, "--exp-name", "all", "--max-steps", "1"))
    recs = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["holdout_noisy_acc"] <= 100 for r in recs) and len(recs) == 2
    h, full = np.load(tmp_path / "h" / "labels.npz"), np.load(tmp_path / "all" / "labels.npz")
    assert len(h["subset"]) == 384 and len(h["holdout_subset"]) == 128 and "holdout_subset" not in full
    noisy = dict(zip(full["subset"].tolist(), full["noisy"].tolist()))
    assert [noisy[i] for i in h["subset"].tolist()] == h["noisy"].tolist()
    assert [noisy[i] for i in h["holdout_subset"].tolist()] == h["holdout_noisy"].tolist()
    summary = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert summary["n_train"] == 384 and summary["noise"]["holdout"] == 128


def test_every_step_skipped_under_skip_nonfinite_finishes(tmp_path, fmnist, monkeypatch):
    """A run whose every step has a non-finite loss (--skip-nonfinite): no update, and no KeyError
    for the missing step count (issue 28: sums["n"]); the epochs are logged without loss terms."""
    def nan(step):
        def f(*a, **k):
            loss, terms, *rest = step(*a, **k)
            return (loss * float("nan"), {t: v * float("nan") for t, v in terms.items()}, *rest)
        return f
    monkeypatch.setattr(lacol, "ce_step", nan(lacol.ce_step))
    monkeypatch.setattr(lacol, "lacol_step", nan(lacol.lacol_step))
    for sel in ("epoch", "batch"):
        s = lacol.main(_args(tmp_path, "--limit-train", "256", "--limit-eval", "100", "--epochs", "2",
                             "--warmup-epochs", "1", "--batch-size", "64", "--skip-nonfinite", f"--selection={sel}",
                             "--exp-name", sel))
        recs = [json.loads(x) for x in (tmp_path / sel / "metrics.jsonl").read_text().splitlines()]
        assert s["skipped_nonfinite_steps"] == 8 and [r["skipped_nonfinite"] for r in recs] == [4, 8]
        assert not any(k.startswith("l_") for r in recs for k in r) and 0 <= recs[1]["selected_frac"] <= 1
