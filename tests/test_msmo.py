"""MSMO: tags, spans and metric (common.text_data, seqeval); the losses on hand-made tensors; the
aligned pairs and the loader on the real XABSA files; short runs of every method with a tiny random
BERT on the real files; resume across teacher training and distillation; bad arguments."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import msmo
from common import text_data, utils
from common.text_data import (decode_aspect_spans, decode_bio, load_xabsa, span_f1, spans_to_tags, tag_list,
                              tags_to_spans)
from common.utils import MissingError, parse_args

ROOT = Path(__file__).resolve().parent.parent
BIEOS = tag_list("bieos")
IDX = {t: i for i, t in enumerate(BIEOS)}

_real_build = msmo.xabsa_encoder
_cache: dict = {}


def _cached_build(name, data_dir, domain):
    """The tiny encoder (tokenizer training ~1 s) built once per test session, copied per use."""
    if name != "tiny":
        return _real_build(name, data_dir, domain)
    if name not in _cache:
        _cache[name] = _real_build(name, data_dir, domain)
    model, tok = _cache[name]
    return copy.deepcopy(model), tok


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine are ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(msmo, "xabsa_encoder", _cached_build)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# Tags, spans, metric
# ---------------------------------------------------------------------------------------
def test_t_tags_convert_to_bieos_and_bio_by_hand():
    raw = ["O", "T-POS", "T-POS", "O", "T-NEG", "T-NEU", "T-NEU", "T-NEU", "T-POS"]
    spans = decode_aspect_spans(raw)  # a change of polarity starts a new aspect
    assert spans == [(1, 2, "POS"), (4, 4, "NEG"), (5, 7, "NEU"), (8, 8, "POS")]
    assert spans_to_tags(spans, 9, "bieos") == ["O", "B-POS", "E-POS", "O", "S-NEG", "B-NEU", "I-NEU",
                                                     "E-NEU", "S-POS"]
    assert spans_to_tags(spans, 9, "bio") == ["O", "B-POS", "I-POS", "O", "B-NEG", "B-NEU", "I-NEU",
                                                   "I-NEU", "B-POS"]
    assert len(BIEOS) == 13 and BIEOS[0] == "O" and len(tag_list("bio")) == 7


def test_decoders_are_strict():
    tags = ["I-POS", "B-POS", "I-NEG", "O", "B-NEU", "B-NEU", "I-NEU"]
    assert decode_bio(tags) == [(4, 4, "NEU"), (5, 6, "NEU")]
    assert tags_to_spans(["B-POS", "O", "E-POS", "S-NEG", "B-NEU", "I-POS", "E-NEU"], "bieos") == [(3, 3, "NEG")]
    # adjacent aspects stay apart in both schemes
    for scheme in ("bieos", "bio"):
        spans = [(0, 0, "POS"), (1, 1, "POS"), (2, 3, "NEG"), (4, 5, "NEG")]
        assert tags_to_spans(spans_to_tags(spans, 6, scheme), scheme) == spans


def _f1(gold_spans, pred_tags, scheme):
    """span_f1 on gold spans (as the script: gold word tags from the file's spans)."""
    return span_f1([spans_to_tags(g, len(p), scheme) for g, p in zip(gold_spans, pred_tags)], pred_tags, scheme)


def test_span_f1_by_hand():
    gold = [[(0, 0, "POS"), (3, 4, "NEG")], [(1, 1, "NEU")], []]
    pred = [[(0, 0, "POS"), (3, 4, "POS")], [(1, 1, "NEU"), (2, 2, "POS")], [(0, 1, "NEG")]]
    pred_tags = [spans_to_tags(p, 5, "bieos") for p in pred]
    # tp 2 (the exact span with the wrong polarity does not count), pred 5, gold 3
    p, r = 2 / 5, 2 / 3
    assert _f1(gold, pred_tags, "bieos") == pytest.approx(100 * 2 * p * r / (p + r))
    assert span_f1([["O"]], [["O"]], "bieos") == 0.0
    assert _f1(gold, [spans_to_tags(g, 5, "bieos") for g in gold], "bieos") == pytest.approx(100.0)


def _span_f1_by_decoding(gold_spans, pred_tags, scheme):
    """The span F1 msmo.py computed before seqeval: our strict decoder, then micro P/R/F1 over
    (begin, end, polarity) sets, in %."""
    tp = n_gold = n_pred = 0
    for g, t in zip(gold_spans, pred_tags):
        g, p = set(g), set(tags_to_spans(t, scheme))
        tp, n_gold, n_pred = tp + len(g & p), n_gold + len(g), n_pred + len(p)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    return 100 * (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


ILL_FORMED = [  # predicted BIEOS tags a strict reading must drop or cut, each against gold (1, 2, POS)
    ["O", "B-POS", "I-POS", "O"],  # B without its E
    ["O", "I-POS", "E-POS", "O"],  # I ... E without a B
    ["O", "B-POS", "O", "E-POS"],  # an O inside (XABSA's tag2absa would keep it)
    ["O", "B-POS", "E-NEG", "O"],  # mixed polarity
    ["B-POS", "I-NEG", "E-POS", "O"],  # mixed polarity inside
    ["O", "B-POS", "B-POS", "E-POS"],  # a second B restarts the aspect
    ["O", "B-POS", "S-POS", "E-POS"],  # S inside an open aspect: S kept, the rest dropped
    ["E-POS", "S-NEU", "B-NEG", "E-NEG"],  # a lone E, then two good aspects
    ["O", "B-POS", "E-POS", "O"],  # the right answer
    ["S-POS", "S-POS", "S-POS", "S-POS"],
]


def test_span_f1_is_seqeval_strict_iobes_on_ill_formed_tags():
    """Our span F1 and seqeval's strict IOBES mode agree, number for number, on hand-made and
    random tag sequences, ill-formed ones included; for BIO, seqeval's strict IOB2 differs where
    the polarity changes inside an aspect, so span_f1 reads BIO with decode_bio first."""
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2, IOBES

    gold = [[(1, 2, "POS")]] * len(ILL_FORMED)
    assert _f1(gold, ILL_FORMED, "bieos") == _span_f1_by_decoding(gold, ILL_FORMED, "bieos")
    for t in ILL_FORMED:  # sentence by sentence too
        assert _f1([[(1, 2, "POS")]], [t], "bieos") == _span_f1_by_decoding([[(1, 2, "POS")]], [t], "bieos")
    gen = torch.Generator().manual_seed(0)
    for scheme in ("bieos", "bio"):
        tags = tag_list(scheme)
        for _ in range(20):
            pred = [[tags[int(i)] for i in torch.randint(len(tags), (int(n),), generator=gen)]
                    for n in torch.randint(1, 9, (40,), generator=gen)]
            gold = [tags_to_spans(p, scheme) if k % 3 else [(0, 0, "NEG")] for k, p in enumerate(pred)]
            assert _f1(gold, pred, scheme) == _span_f1_by_decoding(gold, pred, scheme)
    bio_gold, bio_pred = [["B-POS", "I-POS", "O"]], [["B-POS", "I-NEG", "O"]]
    assert f1_score(bio_gold, bio_pred, mode="strict", scheme=IOB2) == 0.0  # seqeval: B-POS alone, a miss
    assert f1_score([["B-POS", "O", "O"]], bio_pred, mode="strict", scheme=IOB2) == 1.0  # ... and a hit here
    assert span_f1([["B-POS", "O", "O"]], bio_pred, "bio") == 0.0  # ours: the mixed aspect is dropped
    assert f1_score([["O", "B-POS", "E-POS"]], [["B-POS", "I-NEG", "E-POS"]], mode="strict", scheme=IOBES) == 0.0


@pytest.mark.parametrize("scheme", ["bieos", "bio"])
def test_encode_decode_round_trip_on_real_sentences(shared_data, scheme):
    """Labels at first sub-tokens, read back as word tags and decoded, give the file's spans; a
    tokenizer that splits words into several pieces, and sentences with multi-word aspects."""
    _, tok = _cached_build("tiny", str(shared_data), "rest")
    sents = load_xabsa("gold-en-test", shared_data)[:200] + load_xabsa("gold-ru-test", shared_data)[:200]
    tr = load_xabsa("gold-tr-train", shared_data)
    sents += [tr[331], tr[514]]  # the only XABSA sentences with adjacent aspects (of different polarity)
    assert tr[331].spans[:2] == [(2, 2, "POS"), (3, 3, "NEG")] and tr[514].spans[1:3] == [(4, 4, "NEG"), (5, 8, "POS")]
    enc = text_data.encode_tagged(tok, sents, scheme, max_len=512)
    tags = tag_list(scheme)
    n_split = n_multi = 0
    for s, e in zip(sents, enc):
        assert all(p >= 0 for p in e.first) and e.first == sorted(e.first)
        word_tags = [tags[e.labels[p]] for p in e.first]
        assert tags_to_spans(word_tags, scheme) == s.spans
        assert sum(y != -100 for y in e.labels) == len(s.tokens)  # one label per word, at its first piece
        n_split += len(e.input_ids) - 2 > len(s.tokens)
        n_multi += any(b < e_ for b, e_, _ in s.spans)
    assert n_split > 100 and n_multi > 30
    # a word cut off by max_len has no position and no label
    longest = max(sents, key=lambda x: len(x.tokens))
    short = text_data.encode_tagged(tok, [longest], scheme, max_len=6)[0]
    assert short.first.count(-1) > 0 and len(short.input_ids) == 6


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------
def test_padding_does_not_enter_the_critic_mean():
    q = torch.tensor([[1.0, 2.0, 1e6], [3.0, 1e6, 1e6]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert msmo.masked_token_mean(q, mask).item() == pytest.approx(2.0)
    q_t = torch.tensor([[0.5, -1e6]])
    m_t = torch.tensor([[1, 0]])
    assert msmo.wasserstein_gap(q, mask, q_t, m_t).item() == pytest.approx(1.5)


def test_language_bce_by_hand():
    ls, lt = torch.tensor([[0.0, 2.0, 9.0]]), torch.tensor([[1.0, 9.0]])
    ms, mt = torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0]])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus
    expected = 0.5 * ((sp(-0.0) + sp(-2.0)) / 2 + sp(1.0))
    assert msmo.language_bce(ls, ms, lt, mt).item() == pytest.approx(expected)


def test_gradient_reversal():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    (msmo.GradReverse.apply(x, 0.25) * torch.tensor([3.0, 5.0])).sum().backward()
    assert x.grad.tolist() == [-0.75, -1.25]


def test_span_distribution_one_and_three_tokens_by_hand():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 13), -1)
    one = msmo.span_distribution(probs[:1], IDX, "bieos")
    pos, neg, neu, o = (probs[0, IDX["S-POS"]], probs[0, IDX["S-NEG"]], probs[0, IDX["S-NEU"]], probs[0, IDX["O"]])
    assert torch.allclose(one, torch.stack([pos, neg, neu, o, 1 - pos - neg - neu - o]))
    three = msmo.span_distribution(probs, IDX, "bieos")
    exp = [probs[0, IDX[f"B-{x}"]] * probs[1, IDX[f"I-{x}"]] * probs[2, IDX[f"E-{x}"]] for x in ("POS", "NEG", "NEU")]
    exp.append(probs[0, 0] * probs[1, 0] * probs[2, 0])
    exp.append(1 - sum(exp))
    assert torch.allclose(three, torch.stack(exp))
    # bio: B then I
    bio_idx = {t: i for i, t in enumerate(tag_list("bio"))}
    pb = torch.softmax(torch.randn(2, 7), -1)
    got = msmo.span_distribution(pb, bio_idx, "bio")
    assert torch.allclose(got[0], pb[0, bio_idx["B-POS"]] * pb[1, bio_idx["I-POS"]])
    # floors: a certain S-POS leaves every other entry at 1e-20
    certain = torch.zeros(1, 13)
    certain[0, IDX["S-POS"]] = 1.0
    d = msmo.span_distribution(certain, IDX, "bieos")
    assert d[0] == 1.0 and torch.all(d[1:] == 1e-20)


def test_symmetric_kl():
    p = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert msmo.symmetric_kl(p, p.clone()).item() == pytest.approx(0.0, abs=1e-7)
    q = torch.tensor([[0.1, 0.7, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    row0 = (kl(p[0].tolist(), q[0].tolist()) + kl(q[0].tolist(), p[0].tolist())) / 2
    got = msmo.symmetric_kl(p, q)
    assert got.item() > 0 and got.item() == pytest.approx(row0 / 2, rel=1e-5)


def test_aspect_consistency_reads_the_aspects_own_tokens():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 13)
    aspects = [(0, [2, 3, 4], 1, [1]), (0, [5], 1, [3, 4])]
    probs = logits.softmax(-1)
    p = torch.stack([msmo.span_distribution(probs[0, [2, 3, 4]], IDX, "bieos"),
                     msmo.span_distribution(probs[0, [5]], IDX, "bieos")])
    q = torch.stack([msmo.span_distribution(probs[1, [1]], IDX, "bieos"),
                     msmo.span_distribution(probs[1, [3, 4]], IDX, "bieos")])
    assert torch.allclose(msmo.aspect_consistency(logits, aspects, IDX, "bieos"), msmo.symmetric_kl(p, q))


def test_distillation_targets_are_the_mean_of_the_teachers_softmax():
    torch.manual_seed(2)
    logits = [[torch.randn(4, 13), torch.randn(2, 13)] for _ in range(3)]
    per_teacher = [[x.softmax(-1) for x in t] for t in logits]
    targets = msmo.average_teacher_probs(per_teacher)
    for i in range(2):
        expected = (logits[0][i].softmax(-1) + logits[1][i].softmax(-1) + logits[2][i].softmax(-1)) / 3
        assert torch.allclose(targets[i], expected)
    student = torch.randn(1, 3, 13)
    teacher = torch.softmax(torch.randn(1, 3, 13), -1)
    mask = torch.tensor([[1, 1, 0]])
    expected = ((student[0, :2].softmax(-1) - teacher[0, :2]) ** 2).mean()
    assert torch.allclose(msmo.distill_mse(student, teacher, mask), expected)


def test_tagging_ce_ignores_unlabelled_positions():
    logits = torch.randn(1, 4, 13)
    labels = torch.tensor([[-100, 3, -100, 0]])
    expected = (F.cross_entropy(logits[0, 1:2], labels[0, 1:2]) + F.cross_entropy(logits[0, 3:], labels[0, 3:])) / 2
    assert torch.allclose(msmo.tagging_ce(logits, labels), expected)
    assert msmo.tagging_ce(logits, torch.full((1, 4), -100)).item() == 0.0


def test_schedules():
    a = parse_args(msmo.Args, ["--steps", "2000"])
    assert [msmo.critic_steps_at(s, a) for s in (0, 24, 25, 26, 499, 500, 501, 1000)] == [10, 10, 5, 5, 5, 10, 5, 10]
    assert [msmo.phase_at(s, a) for s in (0, 999, 1000, 1999)] == ["adv", "adv", "cons", "cons"]
    assert msmo.phase_at(5, parse_args(msmo.Args, ["--schedule", "joint"])) == "joint"
    assert msmo.phase_at(5, parse_args(msmo.Args, ["--method", "acs"])) == "ce"
    assert msmo.resolve_beta(a) == 4.5e-4  # mBERT, fr
    assert msmo.resolve_beta(parse_args(msmo.Args, ["--preset", "xlmr-base", "--lang", "ru"],
                                        presets=msmo.PRESETS)) == 3.5e-3
    assert msmo.resolve_beta(parse_args(msmo.Args, ["--beta", "0.1"])) == 0.1


# ---------------------------------------------------------------------------------------
# The critic inside an MSMO step
# ---------------------------------------------------------------------------------------
def _step_setup(shared_data, **flags):
    args = parse_args(msmo.Args, ["--preset", "smoke", "--data-dir", str(shared_data),
                                  *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]], presets=msmo.PRESETS)
    sentences = msmo.load_acs_data(args)
    encoder, tok = msmo.xabsa_encoder("tiny", args.data_dir, "rest")
    model = msmo.Tagger(encoder, 13)
    data = msmo.encode_acs_data(args, sentences, tok)
    src_side = [i for i, s in enumerate(data.ce_sides) if s == 0][:4]
    tgt_side = [i for i, s in enumerate(data.ce_sides) if s == 1][:4]
    items = [data.ce_pool[i] for i in src_side + tgt_side]
    sides = [data.ce_sides[i] for i in src_side + tgt_side]
    batch = text_data.tagging_batch(items, tok.pad_token_id, torch.device("cpu"), sides, data.pairs[:3])
    return args, model, batch, data, tok


def test_critic_weights_stay_clipped_and_the_encoder_runs_once(shared_data):
    args, model, batch, enc, tok = _step_setup(shared_data, critic_lr=1.0)
    critic = msmo.Critic(64, 0.1, args.critic_clip)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1.0)  # huge steps: only the clip holds them
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    loss, terms = msmo.msmo_step(model, critic, critic_opt, batch, args, "joint", n_critic=5)
    assert len(calls) == 2  # the CE batch and the pair batch once each; critic steps reuse the features
    n_rows = batch["input_ids"].shape[0] + batch["pairs"]["input_ids"].shape[0]
    calls.clear()
    msmo.msmo_step(model, critic, critic_opt, batch, args, "adv", n_critic=5)
    assert len(calls) == 1 and n_rows == 8 + 2 * 3
    assert all(p.abs().max() <= args.critic_clip + 1e-9 for p in critic.parameters())
    assert any(p.abs().max() > args.critic_clip * 0.99 for p in critic.parameters())  # the clip was hit
    assert not any(p.requires_grad for p in critic.parameters())  # frozen for the encoder's term
    assert {"l_ce", "w_gap", "critic_w", "l_cons"} <= set(terms)
    expected = terms["l_ce"] + args.lambda_adv * terms["w_gap"] + msmo.resolve_beta(args) * terms["l_cons"]
    assert torch.allclose(loss.detach(), expected)
    # the repository's way: fresh batches per critic step, one encoder pass each side
    fresh = [(text_data.tagging_batch(enc.critic_pools[0][:4], tok.pad_token_id, torch.device("cpu")),
              text_data.tagging_batch(enc.critic_pools[1][:4], tok.pad_token_id, torch.device("cpu")))] * 3
    calls.clear()
    msmo.msmo_step(model, critic, critic_opt, batch, args, "adv", n_critic=3, fresh=fresh)
    assert len(calls) == 1 + 2 * 3


def test_grl_step_trains_the_classifier_against_the_encoder(shared_data):
    args, model, batch, _, _ = _step_setup(shared_data, adversary="grl", lambda_adv=0.5)
    critic = msmo.Critic(64, 0.0, None)
    critic.requires_grad_(True)
    loss, terms = msmo.msmo_step(model, critic, None, batch, args, "adv", n_critic=5)
    assert "l_lang" in terms and "w_gap" not in terms
    assert torch.allclose(loss.detach(), terms["l_ce"] + terms["l_lang"])
    loss.backward()
    assert critic.linear.weight.grad.abs().sum() > 0  # the classifier learns from the same backward


# ---------------------------------------------------------------------------------------
# Real data: loader counts, aligned pairs
# ---------------------------------------------------------------------------------------
def test_xabsa_counts(shared_data):
    assert [len(load_xabsa(f"gold-en-{s}", shared_data)) for s in ("train", "dev", "test")] == [1600, 400, 676]


def _outside(s):
    inside = {k for b, e, _ in s.spans for k in range(b, e + 1)}
    return [t for k, t in enumerate(s.tokens) if k not in inside]


@pytest.mark.parametrize("lang", ["fr", "ru"])
def test_aligned_pairs_match_by_content(shared_data, lang):
    en, cs_s = load_xabsa("gold-en-train", shared_data), load_xabsa(f"cs_{lang}-en-train", shared_data)
    smt, cs_t = load_xabsa(f"smt-{lang}-train", shared_data), load_xabsa(f"cs_en-{lang}-train", shared_data)
    for orig, sw in ((en, cs_s), (smt, cs_t)):
        pairs, stats = text_data.align_codeswitched(orig, sw)
        assert stats["pairs"] > 0.97 * len(sw) and stats["unmatched"] == 0
        assert len({i for i, _ in pairs}) == len(pairs)  # a source is used once
        for i, j in pairs:
            assert _outside(orig[i]) == _outside(sw[j])
            assert [p for *_, p in orig[i].spans] == [p for *_, p in sw[j].spans]
        # the files are not parallel line by line: many pairs are not (i, i)
        if len(orig) != len(sw) or orig is en:
            assert sum(i != j for i, j in pairs) > 100


def test_ambiguous_sources_are_left_out():
    from common.text_data import AbsaSentence

    def s(tokens, spans):
        return AbsaSentence(tokens, [], [], spans)

    orig = [s(["food", "!"], [(0, 0, "POS")]), s(["service", "!"], [(0, 0, "POS")]), s(["ok", "x"], [(1, 1, "NEG")])]
    sw = [s(["nourriture", "!"], [(0, 0, "POS")]), s(["ok", "y", "z"], [(1, 2, "NEG")])]
    pairs, stats = text_data.align_codeswitched(orig, sw)
    assert pairs == [(2, 1)] and stats == {"pairs": 1, "ambiguous": 1, "unmatched": 0}


# ---------------------------------------------------------------------------------------
# Runs on the real files (tiny random BERT)
# ---------------------------------------------------------------------------------------
def _args(tmp_path, shared_data, *extra):
    return parse_args(msmo.Args, ["--preset", "smoke", "--data-dir", str(shared_data), "--out-dir", str(tmp_path),
                                  *extra], presets=msmo.PRESETS)


def _records(run, split="eval"):
    """metrics.jsonl's records of one split (eval; diag: the --diag-every gradient diagnostics)."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_smoke_msmo_run_writes_the_run_files(tmp_path, shared_data):
    s = msmo.main(_args(tmp_path, shared_data, "--exp-name", "m", "--steps", "12", "--eval-every", "4",
                        "--select-from", "8", "--eval-langs", "fr", "es"))
    run = tmp_path / "m"
    for f in ("args.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "model_best.pt"):
        assert (run / f).exists(), f
    recs = _records(run)
    assert [r["step"] for r in recs] == [4, 8, 12] and [r["phase"] for r in recs] == ["adv", "cons", "cons"]
    assert "w_gap" in recs[0] and "l_cons" in recs[2] and "w_gap" not in recs[2]  # two-step schedule
    assert recs[2]["l_ce"] < recs[0]["l_ce"]  # the tagger learns
    summary = json.loads((run / "summary.json").read_text())
    for k in ("script", "method", "dataset", "setting", "seed", "primary_metric", "final", "best", "wall_s",
              "samples_per_s"):
        assert k in summary, k
    assert summary["primary_metric"] == "f1_avg" and summary["final"]["step"] == 12
    assert set(summary["final"]) == {"dev_f1", "f1_fr", "f1_es", "f1_avg", "step"}
    assert summary["best"]["step"] in (8, 12) and summary["final"] == s["final"]
    assert summary["pairs"]["source"]["with_aspects"] > 20
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert all(v.abs().max() <= 0.01 + 1e-9 for v in ckpt["critic"].values())


@pytest.mark.parametrize("method", ["zero_shot", "acs", "supervised"])
def test_baselines_run(tmp_path, shared_data, method):
    s = msmo.main(_args(tmp_path, shared_data, "--method", method, "--steps", "4", "--exp-name", method))
    recs = _records(tmp_path / method)
    assert s["method"] == method and "w_gap" not in recs[-1] and "l_cons" not in recs[-1]
    assert s["selection"]["dev"] == ("fr" if method == "supervised" else "en")


def test_ablation_and_reading_flags_run(tmp_path, shared_data):
    for i, flags in enumerate([["--schedule", "joint", "--adversary", "grl", "--tagging", "bio"],
                               ["--no-cons", "--critic-data", "fresh", "--no-critic-codeswitch"],
                               ["--no-adv", "--cons-pairs", "target"]]):
        s = msmo.main(_args(tmp_path, shared_data, "--steps", "4", "--exp-name", f"f{i}", *flags))
        assert s["steps"] == 4
    assert s["method"] == "msmo_wo_adv"


def _kill_after(monkeypatch, n):
    """Make the n-th checkpoint the last one: the run dies right after writing it."""
    real, count = utils.save_checkpoint, {"n": 0}

    class Killed(Exception):
        pass

    def save(run_dir, state, name="checkpoint.pt"):
        real(run_dir, state, name)
        count["n"] += 1
        if count["n"] == n:
            raise Killed

    monkeypatch.setattr(msmo.utils, "save_checkpoint", save)
    return Killed


def test_resume_across_training_and_distillation(tmp_path, shared_data, monkeypatch):
    flags = ["--steps", "8", "--eval-every", "4", "--distill", "--distill-steps", "8", "--test-every-eval",
             "--diag-every", "3"]
    ref = msmo.main(_args(tmp_path, shared_data, "--exp-name", "ref", *flags))

    def diag(run):  # the gradient diagnostics, wall-clock aside
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _records(run, "diag")]

    assert [(r["stage"], r["stage_step"]) for r in diag(tmp_path / "ref")] == [
        ("train", 0), ("train", 3), ("train", 6), ("distill", 0), ("distill", 3), ("distill", 6)]
    ref_recs = _records(tmp_path / "ref")
    assert [r["stage"] for r in ref_recs] == ["train", "train", "distill", "distill"]
    assert [r["step"] for r in ref_recs] == [4, 8, 12, 16]
    assert (tmp_path / "ref" / "teacher_best.pt").exists() and (tmp_path / "ref" / "model_best.pt").exists()
    ref_model = torch.load(tmp_path / "ref" / "model_best.pt", weights_only=False)["model"]
    for kill_at, name in ((1, "mid_train"), (3, "mid_distill")):
        killed = _kill_after(monkeypatch, kill_at)
        with pytest.raises(killed):
            msmo.main(_args(tmp_path, shared_data, "--exp-name", name, *flags))
        monkeypatch.undo()
        monkeypatch.setattr(msmo, "xabsa_encoder", _cached_build)
        assert not (tmp_path / name / "summary.json").exists()
        s = msmo.main(parse_args(msmo.Args, ["--resume", str(tmp_path / name)]))
        recs = _records(tmp_path / name)
        assert [(r["step"], r["stage"]) for r in recs] == [(r["step"], r["stage"]) for r in ref_recs]
        for a, b in zip(recs, ref_recs):
            for k in ("l_ce", "l_kd", "w_gap", "l_cons", "dev_f1", "f1_fr"):
                assert (a.get(k) is None and b.get(k) is None) or a.get(k) == pytest.approx(b[k], rel=1e-5, abs=1e-7), \
                    (name, k)
        for a, b in zip(diag(tmp_path / name), diag(tmp_path / "ref"), strict=True):
            assert a.keys() == b.keys() and all(a[k] == (pytest.approx(b[k], rel=1e-5) if isinstance(b[k], float)
                                                         else b[k]) for k in b), (name, a, b)
        model = torch.load(tmp_path / name / "model_best.pt", weights_only=False)["model"]
        assert all(torch.allclose(model[k], ref_model[k], atol=1e-6) for k in ref_model), name
        assert s["final"] == ref["final"] and s["stages"]["train"]["best"] == ref["stages"]["train"]["best"]


def test_distill_from_several_teachers(tmp_path, shared_data):
    for seed in (0, 1):
        msmo.main(_args(tmp_path, shared_data, "--method", "acs", "--steps", "4", "--seed", str(seed),
                        "--exp-name", f"t{seed}"))
    s = msmo.main(_args(tmp_path, shared_data, "--method", "distill", "--teachers", str(tmp_path / "t0"),
                        str(tmp_path / "t1"), "--student-init", str(tmp_path / "t1"), "--exp-name", "d"))
    recs = _records(tmp_path / "d")
    assert s["method"] == "distill" and recs[0]["stage"] == "distill" and recs[0]["l_kd"] > 0
    assert s["stages"]["distill"]["teachers"] == [str(tmp_path / f"t{i}" / "model_best.pt") for i in (0, 1)]
    # a teacher with another tag set is refused before anything is written
    msmo.main(_args(tmp_path, shared_data, "--method", "acs", "--steps", "2", "--tagging", "bio", "--exp-name", "b"))
    with pytest.raises(utils.UsageError, match="--teachers"):
        msmo.main(_args(tmp_path, shared_data, "--method", "distill", "--teachers", str(tmp_path / "b"),
                        "--exp-name", "never"))
    with pytest.raises(MissingError, match="--teachers"):
        msmo.main(_args(tmp_path, shared_data, "--method", "distill", "--teachers", str(tmp_path / "none"),
                        "--exp-name", "never"))
    assert not (tmp_path / "never").exists()


def test_missing_data_writes_nothing(tmp_path):
    with pytest.raises(MissingError, match="gold-en-train"):
        msmo.main(parse_args(msmo.Args, ["--preset", "smoke", "--data-dir", str(tmp_path / "none"),
                                         "--out-dir", str(tmp_path / "runs")], presets=msmo.PRESETS))
    assert not (tmp_path / "runs").exists()


def test_presets():
    cpu = parse_args(msmo.Args, ["--preset", "cpu"], presets=msmo.PRESETS)
    assert cpu.model == "e5-small" and cpu.freeze_embeddings and cpu.steps < 2000
    paper = parse_args(msmo.Args, [])
    assert (paper.model, paper.lr, paper.batch_size, paper.steps, paper.select_from, paper.lambda_adv,
            paper.critic_clip, paper.critic_steps, paper.distill_steps) == (
        "bert-base-multilingual-cased", 5e-5, 16, 2000, 1500, 0.01, 0.01, 5, 1000)
    x = parse_args(msmo.Args, ["--preset", "xlmr-base"], presets=msmo.PRESETS)
    assert (x.lr, x.steps, x.select_from, x.cons_batch) == (2e-5, 2500, 2000, 32)


@pytest.mark.parametrize("argv,flag", [(["--lang", "de"], "--lang"), (["--steps", "0"], "--steps"),
                                       (["--method", "distill"], "--teachers"),
                                       (["--two-step-split", "1.5"], "--two-step-split"),
                                       (["--diag-every", "-1"], "--diag-every"), (["--metric", "f1"], "--metric"),
                                       (["--label-piece", "last"], "--label-piece")])
def test_bad_arguments_exit_2_in_process(tmp_path, argv, flag):
    with pytest.raises((SystemExit, utils.UsageError)) as e:
        msmo.main(parse_args(msmo.Args, [*argv, "--out-dir", str(tmp_path / "runs")]))
    assert flag in str(e.value) or getattr(e.value, "code", None) == 2
    assert not (tmp_path / "runs").exists()


def test_bad_argument_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "msmo.py", "--teachers", "x", "--out-dir", str(tmp_path / "runs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--teachers" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------
# Issue #23
# ---------------------------------------------------------------------------------------
def test_resume_with_larger_max_steps_selects_inside_the_window(tmp_path, shared_data):
    """A run stopped before --select-from (its last evaluation was the selected model then) and
    resumed with a larger --max-steps: the kept best must come from inside the selection window."""
    first = msmo.main(_args(tmp_path, shared_data, "--exp-name", "w", "--select-from", "6", "--max-steps", "4"))
    assert first["best"]["step"] == 4  # window min(6, 4): the last evaluation
    s = msmo.main(parse_args(msmo.Args, ["--resume", str(tmp_path / "w"), "--max-steps", "8"]))
    assert s["selection"]["from_step"] == 6 and s["best"]["step"] == 8
    assert torch.load(tmp_path / "w" / "model_best.pt", weights_only=False)["step"] == 8


def test_msmo_with_zero_weights_reproduces_acs_of_the_same_seed(tmp_path, shared_data):
    """Paired runs: the critic (initialisation, dropout, its updates) and the pair forward draw from their
    own generators, so MSMO with lambda = beta = 0 is the ACS run of its seed, number for number."""
    flags = ["--steps", "8", "--eval-every", "2", "--test-every-eval", "--diag-every", "3"]
    acs = msmo.main(_args(tmp_path, shared_data, "--method", "acs", "--exp-name", "acs", *flags))
    zero = msmo.main(_args(tmp_path, shared_data, "--lambda-adv", "0", "--beta", "0", "--exp-name", "zero", *flags))
    a, z = _records(tmp_path / "acs"), _records(tmp_path / "zero")
    assert [r["phase"] for r in z] == ["adv", "adv", "cons", "cons"] and "w_gap" in z[0] and "l_cons" in z[-1]
    for key in ("step", "dev_f1", "f1_fr", "l_ce", "lr"):
        assert [r[key] for r in a] == [r[key] for r in z], key
    assert acs["best"] == zero["best"] and acs["final"] == zero["final"]
    # with the weights on, the same seed differs (the terms act)
    on = msmo.main(_args(tmp_path, shared_data, "--lambda-adv", "1", "--beta", "1", "--exp-name", "on", *flags))
    assert [r["l_ce"] for r in _records(tmp_path / "on")] != [r["l_ce"] for r in a] and on["steps"] == 8


def test_private_rng_leaves_the_global_stream_alone():
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    with utils.private_rng(7, torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), ref)
    with utils.private_rng(7, torch.device("cpu")):
        assert torch.equal(torch.rand(3), inside)  # seeded: the same draws each time


def test_grad_norm_ratios_on_a_tiny_model():
    from common.diagnostics import grad_norm_ratios, means_by_group

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    ce = lin(x).pow(2).mean()
    other = torch.nn.Parameter(torch.ones(2))
    terms = {"ce": ce, "adv": 2 * ce, "cons": -0.5 * ce, "off": other.sum()}
    r = grad_norm_ratios(terms, list(lin.parameters()), "ce")
    assert r["gratio_adv"] == pytest.approx(2.0) and r["gratio_cons"] == pytest.approx(0.5) and r["gratio_off"] == 0
    g = torch.autograd.grad(ce, list(lin.parameters()), retain_graph=True)
    assert r["gnorm_ce"] == pytest.approx(math.sqrt(sum(float((t ** 2).sum()) for t in g)))
    assert lin.weight.grad is None  # the training step's .grad is untouched
    assert grad_norm_ratios({"kd": ce}, list(lin.parameters()), "ce") == {"gnorm_kd": pytest.approx(r["gnorm_ce"])}
    recs = [{"phase": "adv", "w": 1.0, "s": 0}, {"phase": "adv", "w": 3.0, "s": 5}, {"phase": "cons", "w": None}]
    assert means_by_group(recs, "phase", skip=("s",)) == {"adv": {"w": {"mean": 2.0, "first": 1.0, "last": 3.0,
                                                                         "n": 2}}, "cons": {}}


def test_diagnostics_are_logged_and_summarised(tmp_path, shared_data):
    s = msmo.main(_args(tmp_path, shared_data, "--exp-name", "d", "--steps", "8", "--diag-every", "2",
                        "--lambda-adv", "1", "--beta", "0.5"))
    diag = _records(tmp_path / "d", "diag")
    assert [r["stage_step"] for r in diag] == [0, 2, 4, 6] and [r["phase"] for r in diag] == ["adv"] * 2 + ["cons"] * 2
    assert all(r["gnorm_ce"] > 0 for r in diag)
    assert all(r["gratio_adv"] > 0 and "critic_w" in r and "w_gap" in r for r in diag[:2])
    assert all(r["gratio_cons"] > 0 and "l_cons" in r and "gratio_adv" not in r for r in diag[2:])
    d = s["stages"]["train"]["diagnostics"]
    assert d["cons"]["l_cons"]["n"] == 2 and d["cons"]["l_cons"]["last"] == diag[-1]["l_cons"]
    assert d["adv"]["gratio_adv"]["mean"] == pytest.approx((diag[0]["gratio_adv"] + diag[1]["gratio_adv"]) / 2)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["stages"]["train"]["diagnostics"] == d
    # the ratio is lambda * ||grad W|| / ||grad CE||: doubling lambda doubles it (the same first step)
    s2 = msmo.main(_args(tmp_path, shared_data, "--exp-name", "d2", "--steps", "8", "--diag-every", "2",
                         "--lambda-adv", "2", "--beta", "0.5", "--max-steps", "1"))
    assert _records(tmp_path / "d2", "diag")[0]["gratio_adv"] == pytest.approx(2 * diag[0]["gratio_adv"], rel=1e-5)
    assert s2["steps"] == 1


def _e5_tokenizer():
    """multilingual-e5-small's tokenizer (XLM-R's SentencePiece vocabulary; the cpu preset's), offline."""
    from common.text_models import _e5_tokenizer as build, e5_small_files

    try:
        return build(e5_small_files()[1])
    except MissingError as e:
        pytest.skip(str(e))


def _xabsa_label_positions(tok, words, max_len):
    """XABSA's labelled sub-tokens (data_utils.fix_space_issue + encode_tags, re-derived from its offsets
    rule): a bare '\u2581' piece (id 6) at offset (0, 1) becomes (0, 0); labels go where the offset starts
    at 0 and is not empty."""
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_len, return_offsets_mapping=True)
    offsets = [(0, 0) if i == 6 and o == (0, 1) else o for i, o in zip(enc["input_ids"], enc["offset_mapping"])]
    return [p for p, o in enumerate(offsets) if o[0] == 0 and o[1] != 0]


def test_xlmr_word_pieces_are_labelled_as_xabsa_does(shared_data):
    """With e5-small's (XLM-R's) tokenizer on real test sentences: a word split into a bare '\u2581' and its
    content is labelled at the content piece, exactly XABSA's positions; the old way (--label-piece first)
    labels the bare piece. Spans still round-trip through the labelled positions."""
    tok = _e5_tokenizer()
    space = tok.convert_tokens_to_ids("\u2581")
    hand = text_data.AbsaSentence(["Очень", ",", "уютный"], [], [], [(1, 1, "NEG"), (2, 2, "POS")])
    new, old = (text_data.encode_tagged(tok, [hand], "bieos", 64, bare)[0] for bare in (True, False))
    pieces = ["<s>", "\u2581Очень", "\u2581", ",", "\u2581", "уют", "ный", "</s>"]
    assert tok.convert_ids_to_tokens(new.input_ids) == pieces
    assert new.first == [1, 3, 5] and old.first == [1, 2, 4]
    assert [BIEOS[y] for y in new.labels if y != -100] == ["O", "S-NEG", "S-POS"] and new.labels[2] == -100
    for name in ("gold-ru-test", "gold-fr-test", "gold-es-test"):
        sents = load_xabsa(name, shared_data)
        new = text_data.encode_tagged(tok, sents, "bieos", 128, bare_space=True)
        old = text_data.encode_tagged(tok, sents, "bieos", 128, bare_space=False)
        moved = moved_aspect = words = 0
        for s, e, o in zip(sents, new, old):
            kept = [p for p in e.first if p >= 0]
            assert kept == _xabsa_label_positions(tok, s.tokens, 128)[: len(kept)], (name, s.tokens)
            assert all(e.input_ids[p] != space for p in kept)
            assert [BIEOS[e.labels[p]] for p in kept] == spans_to_tags(s.spans, len(s.tokens), "bieos")[: len(kept)]
            inside = {w for b, e_, _ in s.spans for w in range(b, e_ + 1)}
            for w, (p, q) in enumerate(zip(e.first, o.first)):
                words += 1
                moved += p != q
                moved_aspect += p != q and w in inside
                assert p == q or (q >= 0 and o.input_ids[q] == space and p == q + 1)
        assert 0.05 * words < moved < 0.25 * words and moved_aspect > 0, (name, moved, words, moved_aspect)


# XABSA's official metric vs strict seqeval IOBES: (tags, XABSA's spans, strict spans)
XABSA_DIFFERS = [
    (["B-POS", "O", "E-POS"], [(0, 2, "POS")], []),  # an O inside does not close the B
    (["B-POS", "O", "O", "O", "I-POS", "E-POS"], [(0, 5, "POS")], []),  # a stale B closed much later
    (["B-POS", "S-POS", "E-POS"], [(1, 1, "POS"), (0, 2, "POS")], [(1, 1, "POS")]),  # S inside an open span
    (["B-POS", "I-POS", "S-NEG", "I-POS", "E-POS"], [(2, 2, "NEG"), (0, 4, "POS")], [(2, 2, "NEG")]),
    (["B-POS", "E-NEG", "S-NEU", "E-POS"], [(2, 2, "NEU"), (0, 3, "POS")], [(2, 2, "NEU")]),  # S resets polarities
]
XABSA_AGREES = [
    ["O", "I-POS", "E-POS"], ["E-POS", "O"], ["B-POS", "B-NEG", "E-NEG"], ["B-POS", "I-POS"],
    ["B-POS", "I-NEG", "E-POS"], ["B-POS", "E-NEG", "E-NEG"], ["B-POS", "E-POS", "E-POS"], ["S-POS", "S-NEG", "O"],
]


def _xabsa_smoothed(hits, n_pred, n_gold):
    p, r = hits / (n_pred + 1e-4), hits / (n_gold + 1e-4)
    return 100 * 2 * p * r / (p + r + 1e-4)


def test_xabsa_metric_decodes_ill_formed_tags_as_its_official_metric():
    for tags, xabsa, strict in XABSA_DIFFERS:
        assert text_data.decode_xabsa(tags) == xabsa and decode_aspect_spans(tags) == strict, tags
        # F1 of each way against the spans XABSA finds there (the lenient reading as gold)
        gold = [spans_to_tags(xabsa[-1:], len(tags), "bieos")]
        assert text_data.xabsa_span_f1(gold, [tags], "bieos") == pytest.approx(_xabsa_smoothed(1, len(xabsa), 1))
        assert span_f1(gold, [tags], "bieos") == 0.0  # seqeval strict: the aspect is not there
    for tags in XABSA_AGREES:
        assert text_data.decode_xabsa(tags) == decode_aspect_spans(tags), tags
    # smoothing: a perfect prediction scores just under 100; nothing predicted scores 0
    gold = [spans_to_tags([(0, 1, "NEG")], 3, "bieos"), spans_to_tags([(2, 2, "POS")], 3, "bieos")]
    assert span_f1(gold, gold, "bieos") == 100.0
    perfect = text_data.xabsa_span_f1(gold, gold, "bieos")
    assert perfect == pytest.approx(_xabsa_smoothed(2, 2, 2)) and 99.98 < perfect < 99.996
    assert text_data.xabsa_span_f1(gold, [["O"] * 3] * 2, "bieos") == 0.0
    # a corpus: sentence 1 `B O E` (XABSA: hit, strict: miss), sentence 2 an S inside an open span
    pred = [["B-NEG", "O", "E-NEG"], ["B-POS", "S-POS", "E-POS"]]
    gold = [spans_to_tags([(0, 2, "NEG")], 3, "bieos"), spans_to_tags([(1, 1, "POS")], 3, "bieos")]
    assert text_data.xabsa_span_f1(gold, pred, "bieos") == pytest.approx(_xabsa_smoothed(2, 3, 2))
    assert span_f1(gold, pred, "bieos") == pytest.approx(100 * 2 * (1 / 1) * (1 / 2) / (1 + 1 / 2))


def test_xabsa_metric_reads_bio_through_ot():
    assert text_data.bio_as_xabsa_bieos(["B-POS", "B-POS", "O", "B-NEG", "I-POS", "B-NEU"]) == [
        "B-POS", "E-POS", "O", "B-NEG", "I-POS", "E-NEU"]  # a run of aspect words, whatever the polarities
    assert decode_bio(["B-POS", "B-POS"]) == [(0, 0, "POS"), (1, 1, "POS")]  # ours: two aspects
    gold = [["B-POS", "I-POS", "O"]]
    assert text_data.xabsa_span_f1(gold, [["B-POS", "B-POS", "O"]], "bio") == pytest.approx(_xabsa_smoothed(1, 1, 1))
    assert span_f1(gold, [["B-POS", "B-POS", "O"]], "bio") == 0.0
    assert text_data.xabsa_span_f1(gold, [["B-POS", "I-NEG", "O"]], "bio") == 0.0  # mixed: dropped by both


def test_xabsa_gold_spans_are_the_files_spans(shared_data):
    """On every gold dev/test file the lenient reading of the gold tags gives the file's aspects."""
    for lang in ("en", "fr", "es", "nl", "ru"):
        for split in ("dev", "test"):
            for s in load_xabsa(f"gold-{lang}-{split}", shared_data):
                assert text_data.decode_xabsa(spans_to_tags(s.spans, len(s.tokens), "bieos")) == s.spans


def test_metric_flag_scores_truncated_words_as_each_metric_does(shared_data, monkeypatch):
    from common import text_models

    """xabsa: words cut off by --max-len leave gold and prediction; seqeval: they are predicted O (a miss).
    A stand-in tagger predicts every word's gold tag at its labelled sub-token."""
    _, tok = _cached_build("tiny", str(shared_data), "rest")
    long = [s for s in load_xabsa("gold-en-test", shared_data)[:64] if s.spans and s.spans[-1][1] > 6]
    enc = text_data.encode_tagged(tok, long, "bieos", max_len=8)
    gold = [spans_to_tags(s.spans, len(s.tokens), "bieos") for s in long]

    def gold_logits(model, encoded, *_):
        logits = torch.zeros(len(encoded), max(len(e.input_ids) for e in encoded), len(BIEOS))
        for i, e in enumerate(encoded):
            for w, p in enumerate(e.first):
                if p >= 0:
                    logits[i, p, IDX[gold[i][w]]] = 1.0
        yield list(range(len(encoded))), logits

    monkeypatch.setattr(text_models, "tagger_logits", gold_logits)
    kept = [sum(p >= 0 for p in e.first) for e in enc]
    n_kept = sum(len(text_data.decode_xabsa(g[:k])) for g, k in zip(gold, kept))
    n_all = sum(len(s.spans) for s in long)
    assert 0 < n_kept < n_all
    model, cpu = torch.nn.Linear(1, 1), torch.device("cpu")
    xabsa = msmo.evaluate_f1(model, enc, gold, "bieos", tok.pad_token_id, cpu, None, "xabsa")
    assert xabsa == pytest.approx(_xabsa_smoothed(n_kept, n_kept, n_kept)) and xabsa > 99.98
    r = n_kept / n_all  # seqeval: precision 1, recall r
    assert msmo.evaluate_f1(model, enc, gold, "bieos", tok.pad_token_id, cpu, None, "seqeval") == pytest.approx(
        100 * 2 * r / (1 + r))
