"""SCAL: perturbations, InfoNCE and metrics on hand-made tensors; the step functions against a
direct composition; the script's data rules on the shared files; short runs of a tiny random
BERT on real offline text (run files, loss going down, resume, every method)."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scal
from benchmarks.suites import SCAL_SMOKE
from common import text_data
from common import text_tasks as tasks
from common.utils import MissingError, UsageError, parse_args, shared_data_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine two threads wait
    on each other (3x slower here); restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# Perturbations (Eq. 2, Eq. 6)
# ------------------------------------------------------------------------------------------
def test_fgm_has_the_requested_l2_norm_per_example_and_the_gradient_direction():
    g = torch.randn(4, 5, 3)
    g[2] = 0.0  # an example without gradient (e.g. all padding) gets no perturbation
    g[3] *= 1000.0  # the scale of one example must not affect the others
    d = scal.fgm_perturbation_eq6(g, 0.3)
    norms = d.flatten(1).norm(dim=1)
    assert torch.allclose(norms[[0, 1, 3]], torch.full((3,), 0.3), atol=1e-6)
    assert norms[2] == 0
    for i in (0, 1, 3):  # same direction as the gradient of that example
        assert F.cosine_similarity(d[i].flatten(), g[i].flatten(), dim=0) > 0.9999
    assert not d.requires_grad


def test_fgsm_has_max_norm_epsilon_and_the_gradient_sign():
    g = torch.tensor([[[0.5, -2.0, 0.0], [1e-8, -1e-8, 3.0]]])
    d = scal.fgsm_perturbation_eq2(g, 0.1)
    assert torch.equal(d, 0.1 * torch.tensor([[[1.0, -1.0, 0.0], [1.0, -1.0, 1.0]]]))
    assert d.abs().max() == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_setup():
    """A tiny random BERT + SCAL heads and one real TREC batch (eval mode: no dropout)."""
    if not shared_data_dir().is_dir():
        pytest.skip(f"the offline data folder {shared_data_dir()} is absent (set LIS_SHARED_DATA)")
    examples = text_data.load_text_task("trec", "train", shared_data_dir(), "local")[:24]
    args = parse_args(scal.Args, ["--task", "trec", "--model", "tiny", "--max-length", "32"])
    encoder, tok = scal.load_model(args, [e.text_a for e in examples])
    torch.manual_seed(0)
    model = scal.SCALModel(encoder, 6).eval()
    batch = tasks.collate(tasks.encode_examples(tok, examples, 32), tok, torch.device("cpu"), False)
    return model, batch, args


@pytest.mark.parametrize("attack,eps", [("fgm", 0.05), ("fgsm", 0.002)])
def test_the_perturbation_raises_the_loss_and_beats_a_random_one(tiny_setup, attack, eps):
    model, batch, _ = tiny_setup
    x = model.embed(batch["input_ids"]).detach().requires_grad_(True)

    def per_example(emb):
        return scal.task_loss_eq5(model(emb, batch, with_z=False)[0], batch["labels"], "none")

    clean = per_example(x)
    delta = scal.adversarial_perturbation(clean.sum(), x, attack, eps)
    pad = batch["attention_mask"] == 0
    assert pad.any() and delta[pad].abs().max() == 0  # padding does not reach the loss: never perturbed
    with torch.no_grad():
        adv = per_example(x + delta)
        rand = per_example(x + delta[torch.randperm(len(delta))].flip(-1))  # same size, unrelated direction
    rise = (adv - clean).detach()
    assert (rise > 0).float().mean() > 0.9  # nearly every example's own loss goes up
    assert rise.mean() > 0 and adv.mean() > rand.mean()


# ------------------------------------------------------------------------------------------
# InfoNCE (Eq. 7) and the total (Eq. 8)
# ------------------------------------------------------------------------------------------
def _cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


@pytest.mark.parametrize("denominator", ["adv", "anchor"])
def test_infonce_matches_a_direct_loop(denominator):
    torch.manual_seed(1)
    z, zp, tau = torch.randn(5, 4), torch.randn(5, 4), 0.05
    total = 0.0
    for i in range(5):
        other = zp if denominator == "adv" else z
        num = math.exp(_cos(z[i], zp[i]) / tau)
        den = sum(math.exp(_cos(z[i], other[k]) / tau) for k in range(5))
        total += -math.log(num / den)
    got = scal.infonce_eq7(z, zp, tau, denominator).item()
    assert got == pytest.approx(total / 5, rel=1e-5)


def test_infonce_is_small_when_each_positive_is_its_own_view():
    z = torch.eye(4)
    assert scal.infonce_eq7(z, z + 0.01, 0.05).item() < 1e-6
    assert scal.infonce_eq7(z, z.roll(1, 0), 0.05).item() > 10  # positives swapped: large


def test_total_eq8_by_hand():
    got = scal.scal_total_eq8(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(2.0), 0.5)
    assert got.item() == pytest.approx(0.5 * (1 + 3) + 0.5 * 2)


def test_scal_step_is_the_direct_composition(tiny_setup):
    """In eval mode (no dropout) scal_step equals Eq. 8 assembled by hand from its pieces:
    the positive is the adversarial view of the same input embeddings."""
    model, batch, args = tiny_setup
    loss, terms = scal.scal_step(model, batch, args)
    x = model.embed(batch["input_ids"])
    logits, z = model(x, batch)
    ce = F.cross_entropy(logits, batch["labels"])
    (g,) = torch.autograd.grad(ce, x)
    delta = args.epsilon * g / g.flatten(1).norm(dim=1)[:, None, None]
    logits_adv, z_adv = model(x.detach() + delta, batch)
    ce_adv = F.cross_entropy(logits_adv, batch["labels"])
    sim = F.normalize(z, dim=-1) @ F.normalize(z_adv, dim=-1).t() / args.tau
    l_ct = F.cross_entropy(sim, torch.arange(len(sim)))
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["ce_adv"].item() == pytest.approx(ce_adv.item(), rel=1e-5)
    assert terms["l_ct"].item() == pytest.approx(l_ct.item(), rel=1e-4)
    assert loss.item() == pytest.approx((0.5 * (ce + ce_adv) + args.alpha * l_ct).item(), rel=1e-5)
    # baselines: ft is CE only; adv is Eq. 8 without L_ct; cl has no adversarial CE
    assert scal.ft_step(model, batch, args)[0].item() == pytest.approx(ce.item(), rel=1e-5)
    assert scal.adv_step(model, batch, args)[0].item() == pytest.approx((0.5 * (ce + ce_adv)).item(), rel=1e-5)
    cl_loss, cl_terms = scal.cl_step(model, batch, args)
    assert set(cl_terms) == {"ce", "l_ct"}
    loss.backward()  # one backward through both branches works (the graph was kept)


def test_roberta_path_without_token_types(tiny_setup):
    """RoBERTa (the presets' other encoder): no token_type_ids, positions numbered from the
    padding id; the inputs_embeds path gives the same [CLS] as input_ids on a padded batch."""
    from common.text_models import tiny_encoder

    _, batch, args = tiny_setup
    texts = ["what is the capital of france ?", "who wrote hamlet ?", "how far is the moon ?"]
    encoder, tok = tiny_encoder(texts, kind="roberta", hidden=32, layers=1, heads=2)
    model = scal.SCALModel(encoder, 6).eval()
    enc = tasks.encode_examples(tok, [text_data.Example(t, None, i) for i, t in enumerate(texts)], 32)
    batch = {k: v for k, v in tasks.collate(enc, tok, torch.device("cpu"), False).items()
             if k != "token_type_ids"}
    assert batch["attention_mask"].min() == 0  # padded
    with torch.no_grad():
        h_ids = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
        h_emb = encoder(inputs_embeds=model.embed(batch["input_ids"]),
                        attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
    assert torch.allclose(h_ids, h_emb, atol=1e-5)
    loss, terms = scal.scal_step(model.train(), batch, args)
    assert torch.isfinite(loss) and set(terms) == {"ce", "ce_adv", "l_ct"}


# ------------------------------------------------------------------------------------------
# Metrics (GLUE's official ones)
# ------------------------------------------------------------------------------------------
def test_glue_metrics_by_hand():
    pred, gold = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1])
    assert tasks.accuracy(pred, gold) == pytest.approx(80.0)
    assert tasks.f1_binary(pred, gold) == pytest.approx(100 * 2 * 2 / (2 * 2 + 1 + 0))  # TP 2, FP 1, FN 0
    assert tasks.matthews_corrcoef(pred, gold) == pytest.approx(100 * (2 * 2 - 1 * 0) / math.sqrt(3 * 2 * 2 * 3))
    assert tasks.matthews_corrcoef(np.ones(4, int), np.array([0, 1, 0, 1])) == 0.0  # constant prediction
    assert tasks.pearson(np.array([1.0, 2, 3]), np.array([1.0, 2, 4])) == pytest.approx(100 * 3 / math.sqrt(2 * 14 / 3))
    assert tasks.spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(100 * (1 - 6 * 2 / 60))
    trec = tasks.task_metrics("trec", np.array([0, 1, 2, 2]), np.array([0, 1, 2, 3]))
    assert trec == {"acc": 75.0, "err": 25.0}
    assert tasks.task_metrics("cola", pred, gold) == {"acc": 80.0, "mcc": pytest.approx(100 * 4 / 6)}
    assert tasks.task_metrics("mrpc", pred, gold) == {"acc": 80.0, "f1": pytest.approx(80.0)}
    assert set(tasks.task_metrics("stsb", pred.astype(float), gold.astype(float))) == {"pearson", "spearman"}


def test_multiclass_mcc_matches_the_covariance_definition():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.6, gold, rng.integers(0, 3, 200))
    x, y = np.eye(3)[pred], np.eye(3)[gold]
    cov = lambda a, b: np.sum((a - a.mean(0)) * (b - b.mean(0)))  # noqa: E731
    assert tasks.matthews_corrcoef(pred, gold) == pytest.approx(100 * cov(x, y) / math.sqrt(cov(x, x) * cov(y, y)))


def test_sklearn_metrics_equal_the_former_hand_written_formulas():
    """scal.py's metrics (common/text_tasks.py) are scikit-learn's; the formulas they replaced give the same
    values (to 1 ulp: sklearn scales a rounded fraction by 100) and the same 0 / -100 in the edge cases,
    without warnings."""
    def f1_old(p, g):
        tp, fp, fn = np.sum((p == 1) & (g == 1)), np.sum((p == 1) & (g != 1)), np.sum((p != 1) & (g == 1))
        return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    def mcc_old(p, g):
        c = np.array([[np.sum((g == a) & (p == b)) for b in np.union1d(p, g)] for a in np.union1d(p, g)], float)
        s, t, q = c.sum(), c.sum(1), c.sum(0)
        denom = math.sqrt((s * s - q @ q) * (s * s - t @ t))
        return 100.0 * (np.trace(c) * s - t @ q) / denom if denom > 0 else 0.0

    rng = np.random.default_rng(1)
    cases = [(np.ones(4, int), np.array([0, 1, 0, 1])), (np.zeros(4, int), np.zeros(4, int)),
             (np.ones(3, int), np.ones(3, int)), (np.array([1, 0]), np.array([0, 1])),
             (np.zeros(3, int), np.ones(3, int))]
    for k, n in [(2, 50), (2, 1000), (3, 200), (6, 500)]:
        gold = rng.integers(0, k, n)
        cases.append((np.where(rng.random(n) < 0.7, gold, rng.integers(0, k, n)), gold))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pred, gold in cases:
            assert tasks.accuracy(pred, gold) == 100.0 * np.mean(pred == gold)
            assert tasks.matthews_corrcoef(pred, gold) == pytest.approx(mcc_old(pred, gold), rel=1e-15, abs=0)
            if max(pred.max(), gold.max()) <= 1:
                assert tasks.f1_binary(pred, gold) == pytest.approx(f1_old(pred, gold), rel=1e-15, abs=0)
    assert tasks.matthews_corrcoef(np.array([1, 0]), np.array([0, 1])) == -100.0
    empty = np.array([], int)
    assert tasks.accuracy(empty, empty) == tasks.f1_binary(empty, empty) == tasks.matthews_corrcoef(empty, empty) == 0.0


# ------------------------------------------------------------------------------------------
# Data rules of the script, on the shared files
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,preset,n_train,split,n_eval,n_classes", [
    ("rte", "cpu-pairs", 800, "dev", 277, 2), ("mrpc", "cpu-pairs", 800, "test", 1000, 2),
    ("cola", "cpu", 2000, "dev", 1043, 2), ("sst2", "cpu", 2000, "dev", 872, 2), ("trec", "cpu", 2000, "test", 500, 6)])
def test_cpu_protocol_data(shared_data, task, preset, n_train, split, n_eval, n_classes):
    args = parse_args(scal.Args, ["--preset", preset, "--task", task], presets=scal.PRESETS)
    train, evals, tests = tasks.load_task(args, shared_data)
    assert len(train) == n_train and not tests
    (name, suffix, parts), = evals
    assert name == split and suffix == "" and sum(len(p) for p in parts) >= n_eval
    assert {e.label for e in train} == set(range(n_classes))
    # the subset is fixed by --subset-seed, not by --seed
    other = tasks.load_task(parse_args(scal.Args, ["--preset", preset, "--task", task, "--seed", "5"],
                                      presets=scal.PRESETS), shared_data)[0]
    assert other == train


def test_trec_and_mrpc_full_sizes_and_labels(shared_data):
    args = parse_args(scal.Args, ["--task", "trec", "--source", "local"])
    train, evals, _ = tasks.load_task(args, shared_data)
    assert len(train) == 5452 and len(evals[0][2][0]) == 500
    assert text_data.label_names("trec")[train[0].label] == "DESC"  # "DESC:manner How did serfdom develop ..."
    args = parse_args(scal.Args, ["--task", "mrpc", "--source", "local"])
    train, evals, _ = tasks.load_task(args, shared_data)
    assert len(train) == 4076 and len(evals[0][2][0]) == 1725 and train[0].text_b is not None


def test_hub_only_data_offline_is_a_missing_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = parse_args(scal.Args, ["--preset", "anli-roberta-large", "--out-dir", str(tmp_path / "runs")],
                      presets=scal.PRESETS)
    assert args.task == "anli" and args.train_tasks == ["mnli", "snli"] and args.batch_size == 32
    with pytest.raises(MissingError, match="MultiNLI"):
        scal.main(args)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# Runs of a tiny random BERT on real TREC questions
# ------------------------------------------------------------------------------------------
def _args(tmp_path, *extra):
    return parse_args(scal.Args, [*SCAL_SMOKE, "--task", "trec", "--out-dir", str(tmp_path),
                                  "--max-steps", "1000", *extra], presets=scal.PRESETS)


RUN = ["--limit-train", "256", "--limit-eval", "64", "--batch-size", "32", "--epochs", "3", "--lr", "1e-3",
       "--max-length", "32"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One complete 3-epoch run (24 steps), shared by the smoke and the resume test."""
    if not shared_data_dir().is_dir():
        pytest.skip(f"the offline data folder {shared_data_dir()} is absent (set LIS_SHARED_DATA)")
    out = tmp_path_factory.mktemp("scal_runs")
    return out / "full", scal.main(_args(out, *RUN, "--exp-name", "full"))


def test_smoke_run_writes_the_run_files_and_learns(full_run):
    run, s = full_run
    for f in ("args.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run / f).exists(), f
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [8, 16, 24] and [r["epoch"] for r in recs] == [1, 2, 3]
    assert {"acc", "err", "adv_acc", "adv_err", "loss", "ce", "ce_adv", "l_ct", "lr"} <= set(recs[0])
    assert recs[2]["loss"] < recs[0]["loss"] and recs[2]["ce"] < recs[0]["ce"]  # it learns
    assert all(0 <= r["acc"] <= 100 and r["err"] == pytest.approx(100 - r["acc"]) for r in recs)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("script", "method", "dataset", "setting", "seed", "primary_metric", "final", "best", "wall_s",
                "samples_per_s"):
        assert key in summary, key
    assert summary["primary_metric"] == "err" and summary["method"] == "scal" and summary["dataset"] == "trec"
    best = max(recs, key=lambda r: r["acc"])
    assert summary["best"]["acc"] == best["acc"] and summary["best"]["step"] == best["step"]
    assert summary["final"]["err"] == recs[-1]["err"] and summary["final"]["step"] == 24
    assert s["steps"] == 24 and summary["samples_per_s"] > 0


def test_resume_continues_to_the_same_result(tmp_path, full_run):
    full_dir, full = full_run
    scal.main(_args(tmp_path, *RUN, "--exp-name", "cut", "--max-steps", "8"))  # stops after epoch 1
    # as if killed there; --max-steps given with --resume replaces the cut run's own limit
    resumed = scal.main(parse_args(scal.Args, ["--resume", str(tmp_path / "cut"), "--max-steps", "1000"]))
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    # the training losses too (the accuracy of a tiny model barely moves): same dropout, same batches
    assert _records(tmp_path / "cut") == _records(full_dir)
    assert [r["step"] for r in _records(tmp_path / "cut")] == [8, 16, 24]


def _records(run):
    return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra,terms", [
    (["--method", "ft"], {"ce"}), (["--method", "adv"], {"ce", "ce_adv"}), (["--method", "cl"], {"ce", "l_ct"}),
    (["--method", "cl", "--cl-positive", "adv"], {"ce", "l_ct"}),
    (["--attack", "fgsm", "--epsilon", "0.01", "--ct-denominator", "anchor", "--eval-every", "2"],
     {"ce", "ce_adv", "l_ct"})])
def test_every_method_and_reading_flag_runs(tmp_path, shared_data, extra, terms):
    s = scal.main(_args(tmp_path, *extra, "--max-steps", "3", "--exp-name", "m"))
    rec = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert terms | {"loss"} <= set(rec) and s["steps"] == 3
    assert not (set(rec) & ({"ce", "ce_adv", "l_ct"} - terms))


@pytest.mark.parametrize("extra,keys", [
    (["--task", "stsb"], {"pearson", "spearman", "adv_pearson", "adv_spearman"}),
    (["--task", "cola"], {"acc", "mcc", "adv_acc", "adv_mcc"}),
    (["--task", "mrpc", "--robust-attack", "fgsm", "--robust-epsilon", "0.01"], {"acc", "f1", "adv_acc", "adv_f1"}),
    (["--task", "ag_news", "--train-split", "dev"], {"acc", "adv_acc"})])
def test_other_tasks_and_their_metrics(tmp_path, shared_data, extra, keys):
    """STS-B is a regression (MSE, Pearson/Spearman); CoLA MCC; MRPC F1 (offline: MSR test);
    AG News trains on its local dev export."""
    scal.main(_args(tmp_path, *extra, "--max-steps", "2", "--exp-name", "t"))
    rec = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    assert keys <= set(rec)
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["primary_metric"] in rec


def test_bad_values_are_usage_errors():
    for argv, flag in [(["--epsilon", "-1"], "--epsilon"), (["--tau", "0"], "--tau"), (["--alpha", "-0.1"], "--alpha"),
                       (["--limit-train", "0"], "--limit-train"), (["--warmup-ratio", "1"], "--warmup-ratio"),
                       (["--train-tasks", "trec"], "--train-tasks"), (["--batch-size", "1"], "--batch-size")]:
        with pytest.raises(UsageError, match=flag):
            scal.validate(parse_args(scal.Args, argv))


def test_bad_argument_exits_2_with_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "scal.py", "--epsilon", "-1", "--out-dir", str(tmp_path / "runs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--epsilon" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# Issue 22: full training sets, a validation split held out from train, selection on it
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,n_all", [("rte", 2490), ("mrpc", 4076), ("cola", 8551), ("trec", 5452),
                                        ("sst2", 67349)])
def test_full_offline_training_sets_without_limit_train(shared_data, task, n_all):
    train, _, _ = tasks.load_task(parse_args(scal.Args, ["--task", task, "--source", "local"]), shared_data)
    assert len(train) == n_all


def test_val_from_train_is_held_out_disjoint_fixed_and_recorded(shared_data):
    argv = ["--task", "rte", "--source", "local", "--val-from-train", "300"]
    record: dict = {}
    train, evals, _ = tasks.load_task(parse_args(scal.Args, argv), shared_data, record)
    full = text_data.load_text_task("rte", "train", shared_data, "local")
    held, kept = record["val_from_train"]["indices"], record["train"]["indices"]
    assert len(held) == 300 and len(kept) == len(train) == 2490 - 300 and not set(held) & set(kept)
    assert sorted(held + kept) == list(range(2490))
    (name, suffix, (val,)) = evals[-1]
    assert name == "val" and suffix == "_val" and val == [full[i] for i in held] and train == [full[i] for i in kept]
    assert evals[0][0] == "dev"  # the evaluation set stays, reported beside
    # the same rows for every --seed (a fixed seed); --limit-train draws its subset among the others only
    other: dict = {}
    sub, evals2, _ = tasks.load_task(parse_args(scal.Args, [*argv, "--seed", "4", "--limit-train", "500"]),
                                     shared_data, other)
    assert other["val_from_train"]["indices"] == held and evals2[-1][2][0] == val
    assert len(sub) == 500 and not set(other["train"]["indices"]) & set(held)
    # without the flag the --limit-train subset is the one it always was
    plain = tasks.load_task(parse_args(scal.Args, ["--task", "rte", "--source", "local", "--limit-train", "500"]),
                            shared_data)[0]
    assert plain == [full[i] for i in np.sort(np.random.default_rng(0).permutation(2490)[:500])]
    # --limit-eval cuts the evaluation set, never the held-out split
    sets = tasks.make_eval_sets(evals, tiny_tokenizer(full), "rte", 32, 50)
    assert [len(s.gold) for s in sets] == [50, 300]


def tiny_tokenizer(examples):
    args = parse_args(scal.Args, ["--model", "tiny", "--max-length", "32"])
    return scal.load_model(args, [t for e in examples[:200] for t in (e.text_a, e.text_b)])[1]


def test_val_from_train_misuse_is_a_usage_error(shared_data):
    with pytest.raises(UsageError, match="--val-from-train"):
        scal.validate(parse_args(scal.Args, ["--val-from-train", "0"]))
    with pytest.raises(UsageError, match="--val-from-train 2490"):
        tasks.load_task(parse_args(scal.Args, ["--task", "rte", "--source", "local", "--val-from-train", "2490"]),
                        shared_data)
    with pytest.raises(UsageError, match="--limit-train 2400.*left after --val-from-train"):
        tasks.load_task(parse_args(scal.Args, ["--task", "rte", "--source", "local", "--val-from-train", "100",
                                               "--limit-train", "2400"]), shared_data)


def test_the_checkpoint_and_early_stop_are_chosen_on_the_held_out_split(tmp_path, shared_data, monkeypatch):
    """Scripted evaluations: the evaluation set keeps improving, the held-out split peaks at the first
    evaluation. With --patience 2 the run stops two evaluations later; selected is the first
    evaluation (its test-set metric reported), best the oracle on the evaluation set."""
    acc = iter([50.0, 60.0, 70.0, 80.0, 90.0])
    acc_val = iter([70.0, 60.0, 65.0, 40.0, 30.0])

    def scripted(model, sets, args, *rest):
        assert [s.name for s in sets] == ["test", "val"]
        a = next(acc)
        return {"acc": a, "err": 100 - a, "acc_val": next(acc_val)}

    monkeypatch.setattr(scal, "evaluate", scripted)
    s = scal.main(_args(tmp_path, *RUN, "--val-from-train", "64", "--eval-every", "2", "--patience", "2",
                        "--exp-name", "v"))
    assert s["stopped_early"] and s["evaluations"] == 3 and s["steps"] == 6
    assert s["selected_by"] == "acc_val" and s["selected"]["step"] == 2 and s["selected"]["err"] == 50.0
    assert s["best"]["step"] == 6 and s["best"]["err"] == 30.0 and s["final"]["step"] == 6 and s["n_val"] == 64
    data = json.loads((tmp_path / "v" / "data_subsets.json").read_text())
    assert data["val_from_train"]["n"] == 64 and len(data["train"]["indices"]) == 256


def test_without_val_selection_is_on_the_evaluation_set_as_before(full_run):
    _, s = full_run
    assert s["selected_by"] == "acc" and s["selected"] == s["best"] and s["n_val"] == 0


# ------------------------------------------------------------------------------------------
# Issue 22: gradient-norm ratios of the loss terms
# ------------------------------------------------------------------------------------------
def test_grad_ratio_of_a_term_twice_another_is_two():
    from common.diagnostics import loss_term_grad_norm, loss_term_grad_ratios, mean_grad_ratios

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(8, 5)
    base = net(x).pow(2).mean()
    other = net(x).sum()
    params = list(net.parameters())
    r = loss_term_grad_ratios({"ce": base, "double": 2 * base, "half": 0.5 * base, "other": other,
                               "const": torch.tensor(3.0)}, "ce", params)
    assert r["double"] == pytest.approx(2.0, rel=1e-6) and r["half"] == pytest.approx(0.5, rel=1e-6)
    assert r["const"] == 0.0
    # the norm is over all parameters together, against .backward() into .grad
    other.backward(retain_graph=True)
    direct = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    net.zero_grad()
    base.backward(retain_graph=True)
    ref = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert r["other"] == pytest.approx((direct / ref).item(), rel=1e-5)
    assert loss_term_grad_norm(base, params) == pytest.approx(ref.item(), rel=1e-6)
    assert loss_term_grad_ratios({"ce": 0 * base, "x": base}, "ce", params) == {"x": None}
    assert mean_grad_ratios([{"step": 1, "a": 1.0, "b": None}, {"step": 5, "a": 3.0, "b": 2.0}]) == \
        {"gradratio_a": 2.0, "gradratio_b": 2.0}


def test_scal_grad_ratios_are_the_weighted_terms_of_eq8(tiny_setup):
    """The recorded ratio of L_ct is ||grad alpha * L_ct|| / ||grad 0.5 * CE|| on every parameter, and
    taking it changes no .grad (the step's own backward pass comes after)."""
    model, batch, args = tiny_setup
    args = parse_args(scal.Args, ["--task", "trec", "--model", "tiny", "--alpha", "0.3", "--grad-ratio-every", "2"])
    ratios: list = []
    model.zero_grad(set_to_none=True)  # (an earlier test may have left gradients)
    torch.manual_seed(1)
    _, terms = scal.scal_step(model, batch, args)
    assert scal.record_grad_ratios(ratios, 1, terms, model, args) == 0.0 and ratios == []  # not due at step 1
    scal.record_grad_ratios(ratios, 2, terms, model, args)
    assert all(p.grad is None for p in model.parameters())
    params = list(model.parameters())

    def norm(t):
        model.zero_grad(set_to_none=True)
        t.backward(retain_graph=True)
        return torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)).item()

    ce = norm(0.5 * terms["ce"])
    assert ratios[0]["step"] == 3 and set(ratios[0]) == {"step", "ce_adv", "l_ct"}
    assert ratios[0]["l_ct"] == pytest.approx(norm(0.3 * terms["l_ct"]) / ce, rel=1e-4)
    assert ratios[0]["ce_adv"] == pytest.approx(norm(0.5 * terms["ce_adv"]) / ce, rel=1e-4)
    model.zero_grad(set_to_none=True)
    ft = parse_args(scal.Args, ["--method", "ft", "--grad-ratio-every", "1"])
    assert scal.record_grad_ratios(ratios, 0, {"ce": terms["ce"]}, model, ft) == 0.0 and len(ratios) == 1


def test_grad_ratios_are_logged_and_change_nothing_else(tmp_path, shared_data):
    a = scal.main(_args(tmp_path, *RUN, "--max-steps", "4", "--eval-every", "2", "--grad-ratio-every", "1",
                        "--exp-name", "r1"))
    b = scal.main(_args(tmp_path, *RUN, "--max-steps", "4", "--eval-every", "2", "--grad-ratio-every", "0",
                        "--exp-name", "r0"))
    ra, rb = _records(tmp_path / "r1"), _records(tmp_path / "r0")
    assert [{k: v for k, v in r.items() if not k.startswith("gradratio_")} for r in ra] == rb
    assert {"gradratio_l_ct", "gradratio_ce_adv"} <= set(ra[0]) and not any("gradratio_l_ct" in r for r in rb)
    assert a["grad_ratios"]["samples"] == 4 and b["grad_ratios"] == {"every": 0, "samples": 0}
    assert a["grad_ratios"]["gradratio_l_ct"] == pytest.approx((ra[0]["gradratio_l_ct"] + ra[1]["gradratio_l_ct"]) / 2)
    assert a["final"] == b["final"]
