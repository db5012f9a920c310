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
