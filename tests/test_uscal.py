"""USCAL: InfoNCE, the perturbation and the "all" aggregation on hand-made tensors; --alpha 0
against a direct SimCSE computation; the offline sentences and STS sets; short runs of a tiny
random BERT on real offline sentences (run files, loss going down, export, resume)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import uscal
from benchmarks.suites import USCAL_SMOKE
from common import text_data
from common.text_models import tokenize_batch
from common.text_tasks import sts_all_aggregation
from common.utils import UsageError, parse_args, shared_data_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine two threads wait
    on each other (3x slower here); restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def test_infonce_matches_a_direct_loop():
    torch.manual_seed(0)
    a, o, tau = torch.randn(6, 5), torch.randn(6, 5), 0.05
    total = 0.0
    for i in range(6):
        den = sum(math.exp(_cos(a[i], o[k]) / tau) for k in range(6))
        total += -math.log(math.exp(_cos(a[i], o[i]) / tau) / den)
    assert uscal.infonce_eq4(a, o, tau).item() == pytest.approx(total / 6, rel=1e-5)


def test_fgm_norm_per_sentence_and_fgsm_max_norm():
    g = torch.randn(3, 7, 4)
    g[1] *= 1e-6
    g[2] = 0.0
    d = uscal.fgm_perturbation_eq9(g, 0.4)
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.tensor([0.4, 0.4, 0.0]), atol=1e-5)
    assert F.cosine_similarity(d[0].flatten(), g[0].flatten(), dim=0) > 0.9999
    s = uscal.fgsm_perturbation_eq2(g, 0.2)
    assert s.abs().max() == pytest.approx(0.2) and torch.equal(s[0].sign(), g[0].sign())


def test_total_eq10_by_hand():
    assert uscal.uscal_total_eq10(torch.tensor(2.0), torch.tensor(3.0), 0.5).item() == pytest.approx(3.5)


def test_sts_all_aggregation_is_one_spearman_over_the_concatenation():
    pred = {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([0.9, 0.8, 0.7])}
    gold = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([4.0, 5.0, 6.0])}
    # per subset: +1 and -1 (mean 0); concatenated ranks: pred 1 2 3 6 5 4 vs gold 1..6, sum d^2 = 8
    assert sts_all_aggregation(pred, gold) == pytest.approx(100 * (1 - 6 * 8 / (6 * 35)))


@pytest.fixture(scope="module")
def tiny():
    if not shared_data_dir().is_dir():
        pytest.skip(f"the offline data folder {shared_data_dir()} is absent (set LIS_SHARED_DATA)")
    sents = text_data.load_senteval_sentences(("MR",), shared_data_dir())[:300]
    args = parse_args(uscal.Args, ["--model", "tiny", "--max-length", "24"])
    encoder, tok = uscal.load_model(args, sents)
    torch.manual_seed(0)
    model = uscal.SimCSEModel(encoder)
    batch = tokenize_batch(tok, sents[:16], 24, torch.device("cpu"))
    return model, batch, args


def test_alpha_zero_is_simcse_exactly(tiny):
    model, batch, args = tiny
    model.train()
    args.alpha = 0.0
    torch.manual_seed(3)
    loss, terms = uscal.uscal_step(model, batch, args)
    assert set(terms) == {"l_ct"}
    # SimCSE written out: two dropout passes of the [CLS] MLP vectors, cross-entropy over
    # cosine similarities / tau with the diagonal as targets
    torch.manual_seed(3)
    extra = {"token_type_ids": batch["token_type_ids"]}
    h1 = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).last_hidden_state
    h2 = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).last_hidden_state
    z1, z2 = model.mlp(h1[:, 0]), model.mlp(h2[:, 0])
    sim = F.cosine_similarity(z1[:, None], z2[None], dim=-1) / args.tau
    direct = -torch.diagonal(F.log_softmax(sim, dim=1)).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    # USCAL's first term is that same SimCSE loss (same dropout draws), plus alpha * L_adv
    args.alpha = 0.7
    torch.manual_seed(3)
    loss_u, terms_u = uscal.uscal_step(model, batch, args)
    assert terms_u["l_ct"].item() == pytest.approx(direct.item(), rel=1e-5)
    assert loss_u.item() == pytest.approx((terms_u["l_ct"] + 0.7 * terms_u["l_adv"]).item(), rel=1e-6)
    loss_u.backward()
    model.zero_grad()


def test_the_perturbation_raises_the_contrastive_loss(tiny):
    """Eq. 9 in eval mode: moving pass 1's input embeddings by delta raises L_ct(emb1, emb2)
    (emb2 fixed), and more than a random move of the same size does."""
    model, batch, args = tiny
    model.eval()
    with torch.no_grad():
        x2 = model.embed(batch["input_ids"])
        z2 = model(x2 + 0.05 * torch.randn_like(x2), batch)  # a second, different view
    x1 = model.embed(batch["input_ids"]).detach().requires_grad_(True)
    loss = uscal.infonce_eq4(model(x1, batch), z2, args.tau)
    (g,) = torch.autograd.grad(loss, x1)
    delta = uscal.fgm_perturbation_eq9(g, 0.05)
    with torch.no_grad():
        adv = uscal.infonce_eq4(model(x1 + delta, batch), z2, args.tau)
        rand = uscal.infonce_eq4(model(x1 + uscal.fgm_perturbation_eq9(torch.randn_like(g), 0.05), batch), z2, args.tau)
    assert adv > loss.detach() and adv > rand
    model.train()


# ------------------------------------------------------------------------------------------
# Offline data
# ------------------------------------------------------------------------------------------
def _training_sentences(args, data_dir):
    return text_data.load_unlabelled_sentences(args.train_data, data_dir, args.source, args.limit_train,
                                               args.subset_seed)[0]


def test_offline_training_sentences(shared_data):
    args = parse_args(uscal.Args, ["--train-data", "senteval", "--source", "local"])
    sents = _training_sentences(args, shared_data)
    # MR 10,662 + CR 3,771 + SUBJ 10,000 + MPQA 10,603 + STS-B train 2 x 5,749 = 46,534; MPQA's short
    # phrases and STS-B's repeated sentences make 7,517 of them exact duplicates
    assert len(sents) == 39_017
    assert len(set(sents)) == len(sents) and all(s and s == s.strip() for s in sents)
    cpu = parse_args(uscal.Args, ["--preset", "cpu"], presets=uscal.PRESETS)
    sub = _training_sentences(cpu, shared_data)
    assert len(sub) == 6400 and set(sub) <= set(sents)
    cpu.seed = 7  # the subset depends on --subset-seed only
    assert _training_sentences(cpu, shared_data) == sub


def test_sts_sets_have_the_readme_sizes(shared_data):
    tests = text_data.load_sts_sets(uscal.TEST_SETS, "test", shared_data, "local")
    sizes = {k: sum(len(v) for v in subs.values()) for k, subs in tests.items()}
    assert sizes == {"sts12": 3108, "sts13": 1500, "sts14": 3750, "sts15": 3000, "sts16": 1186, "stsb": 1379,
                     "sickr": 4927}
    assert len(tests["sts12"]) == 5 and len(tests["sts13"]) == 3  # subsets kept apart for the "all" aggregation
    dev = text_data.load_sts_sets(("stsb",), "dev", shared_data, "local")
    assert sum(len(v) for v in dev["stsb"].values()) == 1500
    assert all(0 <= e.label <= 5 for subs in tests.values() for v in subs.values() for e in v)


# ------------------------------------------------------------------------------------------
# Runs of a tiny random BERT on real offline sentences
# ------------------------------------------------------------------------------------------
def _args(out, *extra):
    return parse_args(uscal.Args, [*USCAL_SMOKE, "--out-dir", str(out), "--max-steps", "1000",
                                   "--limit-train", "192", "--batch-size", "32", "--epochs", "2",
                                   "--eval-every", "3", "--lr", "1e-3", "--limit-eval", "40", *extra],
                      presets=uscal.PRESETS)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One complete run (12 steps, STS-B dev every 3), shared by the smoke and resume tests."""
    if not shared_data_dir().is_dir():
        pytest.skip(f"the offline data folder {shared_data_dir()} is absent (set LIS_SHARED_DATA)")
    out = tmp_path_factory.mktemp("uscal_runs")
    return out / "full", uscal.main(_args(out, "--exp-name", "full"))


def test_smoke_run_writes_the_run_files_learns_and_exports(full_run):
    run, s = full_run
    for f in ("args.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "best_model.pt", "model/config.json"):
        assert (run / f).exists(), f
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [3, 6, 9, 12]
    assert {"stsb_dev", "loss", "l_ct", "l_adv"} <= set(recs[0])
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns
    summary = json.loads((run / "summary.json").read_text())
    for key in ("script", "method", "dataset", "setting", "seed", "primary_metric", "final", "best", "wall_s",
                "samples_per_s"):
        assert key in summary, key
    assert summary["method"] == "uscal" and summary["primary_metric"] == "spearman_avg"
    best = max(recs, key=lambda r: r["stsb_dev"])
    assert summary["best"]["step"] == best["step"] and summary["best"]["stsb_dev"] == best["stsb_dev"]
    tests = [summary["best"][k] for k in uscal.TEST_SETS]
    assert summary["best"]["spearman_avg"] == pytest.approx(np.mean(tests))
    assert summary["final"]["step"] == 12 and s["steps"] == 12
    # the export: a plain transformers encoder (no MLP) holding the best weights
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(run / "model")
    best_state = torch.load(run / "best_model.pt", weights_only=True)
    assert not any(k.startswith("mlp") for k in exported.state_dict())
    for k, v in exported.state_dict().items():
        assert torch.equal(v, best_state["encoder." + k]), k


def test_resume_continues_to_the_same_result(tmp_path, full_run):
    full_dir, full = full_run
    uscal.main(_args(tmp_path, "--exp-name", "cut", "--max-steps", "3"))  # stops in the middle of epoch 1
    # as if killed there; --max-steps given with --resume replaces the cut run's own limit
    resumed = uscal.main(parse_args(uscal.Args, ["--resume", str(tmp_path / "cut"), "--max-steps", "1000"]))
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    records = lambda run: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}  # noqa: E731
                           for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records(tmp_path / "cut") == records(full_dir)


def test_simcse_baseline_and_untrained_start(tmp_path, shared_data):
    s = uscal.main(_args(tmp_path, "--alpha", "0", "--max-steps", "3", "--exp-name", "simcse"))
    rec = json.loads((tmp_path / "simcse" / "metrics.jsonl").read_text().splitlines()[-1])
    assert s["method"] == "simcse" and "l_adv" not in rec and "l_ct" in rec
    u = uscal.main(_args(tmp_path, "--eval-only", "--exp-name", "start"))
    assert u["method"] == "untrained" and u["steps"] == 0 and u["best"]["step"] == 0
    assert u["final"]["spearman_avg"] == u["best"]["spearman_avg"]


def test_bad_values_are_usage_errors():
    for argv, flag in [(["--epsilon", "-1"], "--epsilon"), (["--tau", "0"], "--tau"), (["--alpha", "-1"], "--alpha"),
                       (["--batch-size", "1"], "--batch-size"), (["--eval-every", "0"], "--eval-every"),
                       (["--limit-train", "0"], "--limit-train")]:
        with pytest.raises(UsageError, match=flag):
            uscal.validate(parse_args(uscal.Args, argv))


def test_bad_argument_exits_2_with_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "uscal.py", "--alpha", "-1", "--out-dir", str(tmp_path / "runs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--alpha" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# Issue 22: no evaluation sentence in the training pool
# ------------------------------------------------------------------------------------------
def test_no_evaluation_sentence_remains_in_the_training_pool(shared_data):
    args = parse_args(uscal.Args, ["--train-data", "senteval", "--source", "local"])
    pool, _, _, record = uscal.load_data(args, shared_data)
    evals = [text_data.load_sts_sets(("stsb",), "dev", shared_data, "local"),
             text_data.load_sts_sets(uscal.TEST_SETS, "test", shared_data, "local")]
    eval_sents = {t for d in evals for subs in d.values() for exs in subs.values() for e in exs
                  for t in (e.text_a, e.text_b)}
    assert len(eval_sents) > 20_000
    assert not set(pool) & eval_sents  # exactly
    assert not {text_data.sentence_key(s) for s in pool} & {text_data.sentence_key(s) for s in eval_sents}  # nor so
    # ... and only those went: the old pool minus the evaluation sentences
    old, old_record = uscal.load_data(parse_args(uscal.Args, ["--train-data", "senteval", "--source", "local",
                                                              "--keep-eval-sentences"]), shared_data)[::3]
    assert len(old) == 39_017 and old_record["train"].get("n_excluded") is None
    assert record["train"]["n_excluded"] == len(old) - len(pool) > 5_000 and record["train"]["n_all"] == len(pool)
    eval_keys = {text_data.sentence_key(x) for x in eval_sents}
    assert pool == [s for s in old if text_data.sentence_key(s) not in eval_keys]
    # the reviewed overlap: STS-B train sentences that are STS12-16 test sentences were in the old pool
    sts12 = {t for exs in evals[1]["sts12"].values() for e in exs for t in (e.text_a, e.text_b)}
    assert set(old) & sts12 and not set(pool) & sts12
    # --limit-eval does not change the pool (the whole sets are excluded); the cpu subset comes from the new pool
    cpu = parse_args(uscal.Args, ["--preset", "cpu", "--limit-eval", "10"], presets=uscal.PRESETS)
    sub, _, _, rec = uscal.load_data(cpu, shared_data)
    assert len(sub) == 6400 and set(sub) <= set(pool) and rec["train"]["n_all"] == len(pool)


# ------------------------------------------------------------------------------------------
# Issue 22: the --epsilon 0 control, --train-pooling avg, --patience, the native-pooling reference
# ------------------------------------------------------------------------------------------
def test_epsilon_zero_is_a_third_dropout_view_with_the_same_passes(tiny):
    model, batch, args = tiny
    model.train()
    args = parse_args(uscal.Args, ["--model", "tiny", "--epsilon", "0", "--alpha", "0.7"])
    inputs = []
    hook = model.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone()))
    try:
        torch.manual_seed(5)
        loss, terms = uscal.uscal_step(model, batch, args)
    finally:
        hook.remove()
    assert len(inputs) == 3  # the same three passes as USCAL
    assert torch.equal(inputs[2], inputs[0])  # the third view's input: pass 1's embeddings, perturbation zero
    # written out: three dropout passes of the same sentences, L_ct(z1, z2) + alpha * L_ct(z1, z3)
    torch.manual_seed(5)
    z1, z2, z3 = (model(model.embed(batch["input_ids"]), batch) for _ in range(3))
    assert terms["l_ct"].item() == pytest.approx(uscal.infonce_eq4(z1, z2, args.tau).item(), rel=1e-6)
    assert terms["l_adv"].item() == pytest.approx(uscal.infonce_eq4(z1, z3, args.tau).item(), rel=1e-6)
    assert loss.item() == pytest.approx((terms["l_ct"] + 0.7 * terms["l_adv"]).item(), rel=1e-6)
    # and a positive epsilon does move the third view's input
    inputs.clear()
    hook = model.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone()))
    try:
        uscal.uscal_step(model, batch, parse_args(uscal.Args, ["--model", "tiny", "--epsilon", "0.3"]))
    finally:
        hook.remove()
    assert len(inputs) == 3 and not torch.equal(inputs[2], inputs[0])
    model.zero_grad()


def test_train_pooling_avg_is_the_mean_over_tokens_without_mlp(tiny):
    model, batch, args = tiny
    avg = uscal.SimCSEModel(model.encoder, "avg").eval()
    z = avg(avg.embed(batch["input_ids"]), batch)
    h = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(z, (h * m).sum(1) / m.sum(1), atol=1e-5)
    avg.train()
    loss, _ = uscal.uscal_step(avg, batch, args)
    loss.backward()
    assert avg.mlp[0].weight.grad is None and avg.encoder.get_input_embeddings().weight.grad is not None
    avg.zero_grad()
    assert "trainavg" in uscal.setting_name(parse_args(uscal.Args, ["--train-pooling", "avg"]))


def test_patience_stops_on_stsb_dev_and_the_best_dev_model_is_tested(tmp_path, shared_data, monkeypatch):
    dev = iter([50.0, 60.0, 55.0, 58.0, 70.0, 80.0])
    real = uscal.evaluate_sts

    def scripted(encoder, mlp, tok, sets, args, *rest):
        if list(sets) == ["stsb"]:  # STS-B dev
            return {"stsb": next(dev)}
        return real(encoder, mlp, tok, sets, args, *rest)

    monkeypatch.setattr(uscal, "evaluate_sts", scripted)
    s = uscal.main(_args(tmp_path, "--eval-every", "2", "--patience", "2", "--exp-name", "p"))
    assert s["stopped_early"] and s["steps"] == 8 and s["evaluations"] == 4  # dev 50 60 55 58: two after the best
    assert s["best"]["step"] == 4 and s["best"]["stsb_dev"] == 60.0 and s["final"]["step"] == 8
    assert "not a test set" in s["selected_on"] and s["n_excluded_eval_sentences"] > 0
    best = torch.load(tmp_path / "p" / "best_model.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=False)
    assert ckpt["stopped_early"] and ckpt["step"] == 8
    assert any(not torch.equal(v, ckpt["model"][k]) for k, v in best.items())  # step 4's weights, not step 8's


def test_native_pooling_reference_row(tmp_path, shared_data, tiny):
    p = parse_args(uscal.Args, ["--preset", "cpu-native"], presets=uscal.PRESETS)
    assert p.eval_only and p.eval_pooling == "avg" and p.model == "minilm-l6"
    model, _, args = tiny
    args = parse_args(uscal.Args, ["--model", "tiny", "--eval-pooling", "avg", "--limit-eval", "30"])
    sets = text_data.load_sts_sets(("stsb", "sickr"), "test", shared_data, "local", 30)
    tok = uscal.load_model(args, text_data.load_senteval_sentences(("MR",), shared_data)[:300])[1]
    got = uscal.evaluate_sts(model.encoder, model.mlp, tok, sets, args, torch.device("cpu"), None)

    def mean_pooled(sentences):
        b = tokenize_batch(tok, sentences, 128, torch.device("cpu"))
        with torch.no_grad():
            h = model.encoder(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    from common.text_tasks import sts_spearman
    want = sts_spearman(sets, mean_pooled)
    assert got["stsb"] == pytest.approx(want["stsb"], abs=1e-6)
    assert got["sickr"] == pytest.approx(want["sickr"], abs=1e-6)
    u = uscal.main(_args(tmp_path, "--eval-only", "--eval-pooling", "avg", "--exp-name", "native"))
    assert u["method"] == "untrained" and u["setting"].endswith("_avg") and set(uscal.TEST_SETS) <= set(u["best"])


def test_new_flags_misuse_is_a_usage_error():
    for argv, flag in [(["--patience", "-1"], "--patience"), (["--train-pooling", "max"], "--train-pooling"),
                       (["--epsilon", "-0.1"], "--epsilon")]:
        with pytest.raises(UsageError, match=flag):
            uscal.validate(parse_args(uscal.Args, argv))
    uscal.validate(parse_args(uscal.Args, ["--epsilon", "0"]))  # the control is allowed
