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


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


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
    flags = ["--steps", "8", "--eval-every", "4", "--distill", "--distill-steps", "8", "--test-every-eval"]
    ref = msmo.main(_args(tmp_path, shared_data, "--exp-name", "ref", *flags))
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
                                       (["--two-step-split", "1.5"], "--two-step-split")])
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
