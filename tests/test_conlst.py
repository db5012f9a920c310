"""CoNLST: the losses, samplers and thresholds on hand-made tensors; the loaders on the shared
XNLI/SNLI files; back-translation (the tool that writes the file, conlst.py reading it, a precomputed
file); end-to-end runs of every stage (tiny random model, real XNLI/SNLI text), resume across stages,
the confidence figure drawn from a run's summary, bad arguments."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import conlst
from benchmarks import confidence
from common import back_translate, stages, text_data
from common.text_data import Example, load_text_task, subset_indices
from common.text_models import tiny_encoder
from common.utils import MissingError, UsageError, parse_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster with one thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------
# Eq. 4: complementary labels
# -------------------------------------------------------------------------------------------
def test_complementary_label_low_confidence_is_argmin():
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.45, 0.45], [0.34, 0.33, 0.33]])
    for mode in ("sample", "all"):
        comp = conlst.complementary_labels_eq4(probs, gamma=0.9, mode=mode)
        assert comp.tolist() == [[False, True, False], [True, False, False], [False, True, False]]


def test_complementary_label_high_confidence_is_another_class():
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.01, 0.04, 0.95], [0.05, 0.9, 0.05]])
    comp = conlst.complementary_labels_eq4(probs, gamma=0.9, mode="all")
    assert comp.tolist() == [[False, True, True], [True, True, False], [True, False, True]]
    torch.manual_seed(0)
    counts = torch.zeros(3, 3)
    for _ in range(300):
        c = conlst.complementary_labels_eq4(probs, gamma=0.9, mode="sample")
        assert c.sum(1).tolist() == [1, 1, 1]  # exactly one class
        counts += c.float()
    assert counts[0, 0] == 0 and counts[1, 2] == 0 and counts[2, 1] == 0  # never the predicted class
    assert counts[0, 1:].min() > 120 and counts[1, :2].min() > 120  # both others, ~150 each
    # gamma is inclusive: max q == gamma takes the high-confidence branch
    edge = torch.tensor([[0.9, 0.06, 0.04]])
    assert conlst.complementary_labels_eq4(edge, 0.9, "all").tolist() == [[False, True, True]]


# -------------------------------------------------------------------------------------------
# Eq. 5: the negative sampler
# -------------------------------------------------------------------------------------------
def test_high_confidence_pool_and_negatives_have_the_right_pseudo_label():
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.2, 0.7, 0.1], [0.02, 0.96, 0.02], [0.01, 0.01, 0.98],
                          [0.92, 0.04, 0.04], [0.03, 0.93, 0.04], [0.3, 0.3, 0.4]])
    idx, label = conlst.high_confidence_pool_eq5(probs, 0.9)
    assert idx.tolist() == [0, 2, 3, 4, 5] and label.tolist() == [0, 1, 2, 0, 1]
    comp = torch.tensor([[True, False, False], [False, True, False], [False, False, True], [True, True, False]])
    torch.manual_seed(0)
    for sharing in ("anchor", "batch"):
        neg, valid = conlst.sample_negatives_eq5(comp, idx, label, k=3, sharing=sharing)
        assert neg.shape == valid.shape == (4, 3)
        conf, pred = probs.max(1)
        for i in range(4):
            chosen = neg[i][valid[i]].tolist()
            assert all(conf[j] >= 0.9 and comp[i, pred[j]] for j in chosen)  # high-confidence, right class
            assert len(chosen) == len(set(chosen))  # no duplicates
        # fewer candidates than K: all of them, the rest marked invalid
        assert sorted(neg[0][valid[0]].tolist()) == [0, 4] and valid[0].sum() == 2
        assert neg[2][valid[2]].tolist() == [3] and valid[2].sum() == 1
        assert valid[3].sum() == 3  # 4 candidates (classes 0 and 1), K=3


def test_negative_sampler_with_no_candidates_and_batch_sharing():
    idx, label = torch.tensor([5, 6]), torch.tensor([0, 0])
    comp = torch.tensor([[False, True, False], [True, False, False]])
    neg, valid = conlst.sample_negatives_eq5(comp, idx, label, k=4)
    assert valid[0].sum() == 0 and valid[1].sum() == 2 and neg.shape == (2, 4)
    empty = torch.zeros(0, dtype=torch.long)
    neg, valid = conlst.sample_negatives_eq5(comp, empty, empty, 4)
    assert neg.shape == (2, 4) and not valid.any()  # empty pool
    # batch sharing: anchors with the same complementary label share one draw
    idx, label = torch.arange(50), torch.arange(50) % 3
    comp = F.one_hot(torch.tensor([1, 1, 2, 1, 2]), 3).bool()
    neg, valid = conlst.sample_negatives_eq5(comp, idx, label, k=5, sharing="batch")
    assert torch.equal(neg[0], neg[1]) and torch.equal(neg[0], neg[3]) and torch.equal(neg[2], neg[4])
    assert not torch.equal(neg[0], neg[2])
    assert (label[neg[0]] == 1).all() and (label[neg[2]] == 2).all()


def test_negative_sampler_is_uniform_over_candidates():
    idx, label = torch.arange(21), torch.tensor([0] + [1] * 20)
    comp = torch.tensor([[False, True, False]])
    torch.manual_seed(0)
    counts = torch.zeros(21)
    for _ in range(400):
        neg, valid = conlst.sample_negatives_eq5(comp, idx, label, k=5)
        counts.index_add_(0, neg[0][valid[0]], torch.ones(int(valid[0].sum())))
    assert counts[0] == 0 and counts[1:].min() > 60 and counts[1:].max() < 140  # expected 100 each


# -------------------------------------------------------------------------------------------
# Eq. 6: L_CL
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", ["sqeuclidean", "euclidean"])
def test_l_cl_matches_a_direct_loop(distance):
    torch.manual_seed(0)
    b, k, d, tau = 4, 3, 5, 0.7
    ha, hp, hn = torch.randn(b, d), torch.randn(b, d), torch.randn(b, k, d)
    valid = torch.tensor([[True, True, True], [True, False, True], [False, False, False], [True, True, False]])
    got = conlst.contrastive_negative_loss_eq6(ha, hp, hn, valid, tau, distance)

    def s(x, y):
        d2 = sum((float(u) - float(v)) ** 2 for u, v in zip(x, y))
        return -d2 if distance == "sqeuclidean" else -math.sqrt(d2)

    total = 0.0
    for i in range(b):
        pos = math.exp(s(ha[i], hp[i]) / tau)
        neg = sum(math.exp(s(ha[i], hn[i, j]) / tau) for j in range(k) if valid[i, j])
        total += -math.log(pos / (pos + neg))
    assert abs(got.item() - total / b) < 1e-5
    # an anchor without negatives contributes exactly 0
    assert conlst.contrastive_negative_loss_eq6(ha[2:3], hp[2:3], hn[2:3], valid[2:3], tau, distance).item() == 0.0


def test_l_cl_by_hand_and_its_gradient_direction():
    ha = torch.tensor([[0.0, 0.0]], requires_grad=True)
    hp, hn = torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 2.0]]])
    loss = conlst.contrastive_negative_loss_eq6(ha, hp, hn, torch.tensor([[True]]), tau=1.0)
    # s_pos = -1, s_neg = -4: -log(e^-1 / (e^-1 + e^-4))
    assert abs(loss.item() - math.log(1 + math.exp(-3))) < 1e-6
    loss.backward()
    # descent (-grad) moves the anchor toward the positive (+x) and away from the negative (-y)
    assert ha.grad[0, 0] < 0 and ha.grad[0, 1] > 0


# -------------------------------------------------------------------------------------------
# Eq. 1 and 7: negative learning, L_CLCS
# -------------------------------------------------------------------------------------------
def test_l_nl_by_hand():
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.7, 0.2, 0.1]]))
    one = torch.tensor([[False, False, True], [True, False, False]])
    expected = (-math.log(1 - 0.5) - math.log(1 - 0.7)) / 2
    assert abs(conlst.negative_learning_loss_eq1(logits, one).item() - expected) < 1e-6
    both = torch.tensor([[True, True, False], [False, True, True]])
    expected = (-math.log(0.75) - math.log(0.75) - math.log(0.8) - math.log(0.9)) / 2
    assert abs(conlst.negative_learning_loss_eq1(logits, both).item() - expected) < 1e-6
    # stable where p_k -> 1 (log(1 - p) computed without cancellation)
    big = torch.tensor([[60.0, 0.0, 0.0]])
    val = conlst.negative_learning_loss_eq1(big, torch.tensor([[True, False, False]])).item()
    assert math.isfinite(val) and abs(val - (60 - math.log(2))) < 1e-3


def test_clcs_uses_a_random_wrong_class():
    labels = torch.tensor([0, 1, 2] * 100)
    torch.manual_seed(0)
    comp = conlst.random_complementary_labels(labels, 3)
    assert comp.sum(1).eq(1).all() and not comp[torch.arange(300), labels].any()
    counts = comp[labels == 0].sum(0)
    assert counts[0] == 0 and 30 < counts[1] < 70 and 30 < counts[2] < 70
    logits = torch.randn(300, 3)
    torch.manual_seed(1)
    got = conlst.clcs_loss_eq7(logits, labels)
    torch.manual_seed(1)
    again = conlst.negative_learning_loss_eq1(logits, conlst.random_complementary_labels(labels, 3))
    assert torch.allclose(got, again) and got.item() > 0  # Eq. 7 is minimized: positive


# -------------------------------------------------------------------------------------------
# FlexMatch thresholds and selection
# -------------------------------------------------------------------------------------------
def test_flexmatch_thresholds_by_hand():
    memory = torch.tensor([0, 0, 0, 1, -1, -1, -1, -1, -1, -1])  # sigma = [3, 1, 0], 6 unused
    warm = conlst.flexmatch_thresholds(memory, 3, 0.95, warmup=True, mapping="convex")
    beta = torch.tensor([3 / 6, 1 / 6, 0.0])  # normalised by max(3, 6 unused)
    assert torch.allclose(warm, 0.95 * beta / (2 - beta))
    assert torch.allclose(warm, torch.tensor([0.95 / 3, 0.95 / 11, 0.0]))
    cold = conlst.flexmatch_thresholds(memory, 3, 0.95, warmup=False, mapping="convex")
    assert torch.allclose(cold, torch.tensor([0.95, 0.95 * 0.2, 0.0]))  # beta = [1, 1/3, 0]
    lin = conlst.flexmatch_thresholds(memory, 3, 0.95, warmup=False, mapping="linear")
    assert torch.allclose(lin, torch.tensor([0.95, 0.95 / 3, 0.0]))
    # past warm-up (fewer unused than the top class): the same as without warm-up
    memory2 = torch.tensor([0] * 5 + [1] * 2 + [-1] * 3)
    assert torch.allclose(conlst.flexmatch_thresholds(memory2, 3, 0.9, True),
                          conlst.flexmatch_thresholds(memory2, 3, 0.9, False))
    # nothing learnt yet: every threshold 0 (FlexMatch's start)
    assert conlst.flexmatch_thresholds(torch.full((4,), -1), 3, 0.95).tolist() == [0.0, 0.0, 0.0]


def test_flexmatch_memory_and_selection():
    memory = torch.tensor([-1, 2, 1, -1])
    conf = torch.tensor([0.97, 0.5, 0.96, 0.2])
    pred = torch.tensor([0, 0, 0, 1])
    new = conlst.flexmatch_update_memory(memory, conf, pred, 0.95)
    assert new.tolist() == [0, 2, 0, -1]  # updated where conf >= 0.95, kept elsewhere
    thr = torch.tensor([0.6, 0.1, 0.9])
    sel = conlst.select_confident_eq14(torch.tensor([0.6, 0.59, 0.2, 0.95]), torch.tensor([0, 0, 1, 2]), thr)
    assert sel.tolist() == [True, False, True, True]


def _flexmatch_reference(memory, num_classes, base, warmup, previous):
    """FlexMatch's own update (TorchSSL flexmatch.py: Counter over selected_label, skipped while one value
    fills it), then T_c = base * M(classwise_acc_c) with the convex M."""
    from collections import Counter

    counter = Counter(memory.tolist())
    acc = list(previous)
    if max(counter.values()) < len(memory):
        wo = {k: v for k, v in counter.items() if k != -1}
        denom = max(counter.values()) if warmup else max(wo.values())
        acc = [counter[c] / denom for c in range(num_classes)]
    return torch.tensor([base * a / (2 - a) for a in acc])


@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_thresholds_equal_flexmatch_on_hand_made_memories(warmup):
    states = [[-1] * 10, [0, -1, -1, -1, -1, -1], [0, 0, 0, 1, -1, -1, -1, -1, -1, -1], [0, 0, 1, 1, 2, -1],
              [0] * 5 + [1] * 2 + [-1] * 3, [2, 2, 2, 1], [1, 1, 1, 1], [0, 0, 2, 2, 2, 2, 2, 2, 2, -1]]
    acc = [0.0, 0.0, 0.0]  # FlexMatch's classwise_acc starts at 0
    prev = None
    for state in states:
        memory = torch.tensor(state)
        got = conlst.flexmatch_thresholds(memory, 3, 0.95, warmup, "convex", previous=prev)
        ref = _flexmatch_reference(memory, 3, 0.95, warmup, acc)
        assert torch.allclose(got, ref), (state, got, ref)
        acc = [2 * t / (0.95 + t) for t in ref.tolist()]  # invert T = 0.95 a / (2 - a)
        prev = got
    # all one class ([1, 1, 1, 1]): FlexMatch keeps the thresholds of the state before ([2, 2, 2, 1])
    keep = conlst.flexmatch_thresholds(torch.tensor([2, 2, 2, 1]), 3, 0.95, warmup)
    assert torch.equal(conlst.flexmatch_thresholds(torch.tensor([1, 1, 1, 1]), 3, 0.95, warmup, previous=keep), keep)
    # the floor (ours) lifts every threshold to at least its value and leaves higher ones alone
    floored = conlst.flexmatch_thresholds(torch.tensor([0, 0, 0, 1, -1]), 3, 0.95, warmup, floor=0.9)
    assert floored.min() >= 0.9 and floored[0] == pytest.approx(0.95)


def _flex_args(**kw):
    return conlst.Args(**{"flex_threshold": 0.95, "flex_warmup": True, "flex_mapping": "convex", **kw})


def test_flexmatch_step_updates_the_memory_every_step_after_thresholding():
    memory = torch.full((6,), -1)
    probs = torch.tensor([[0.97, 0.02, 0.01], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    sel, pred, thr = conlst.flexmatch_step(memory, None, torch.tensor([0, 3, 5]), probs, _flex_args())
    assert thr.tolist() == [0.0, 0.0, 0.0] and sel.all()  # thresholds from the memory before this batch
    assert memory.tolist() == [0, -1, -1, -1, -1, -1] and pred.tolist() == [0, 1, 2]  # then the update
    sel, _, thr = conlst.flexmatch_step(memory, thr, torch.tensor([1, 2]), probs[:2], _flex_args())
    beta = 1 / 5  # sigma_0 = 1, 5 unused
    assert torch.allclose(thr, torch.tensor([0.95 * beta / (2 - beta), 0.0, 0.0]))
    assert memory.tolist() == [0, 0, -1, -1, -1, -1]


def test_a_pool_where_one_class_is_confident_no_longer_selects_everything():
    """240 pool samples seen in batches of 16 for two passes: a third predicted class 0 at 0.99, the
    others class 1 or 2 at 0.5. FlexMatch alone (warm-up or not) keeps the unlearnt classes' thresholds
    at 0 and selects every sample; with the floor at gamma = 0.9 only the confident class is selected."""
    n = 240
    pred = torch.tensor([0, 1, 2] * (n // 3))
    conf = torch.where(pred == 0, 0.99, 0.5)
    probs = torch.stack([torch.where(pred == c, conf, (1 - conf) / 2) for c in range(3)], 1)
    for floor, warmup, expect_all in ((0.0, True, True), (0.0, False, True), (0.9, True, False)):
        memory, thr, selected = torch.full((n,), -1), None, []
        for _ in range(2):
            for start in range(0, n, 16):
                idx = torch.arange(start, start + 16)
                sel, _, thr = conlst.flexmatch_step(memory, thr, idx, probs[idx], _flex_args(flex_floor=floor,
                                                                                             flex_warmup=warmup))
                selected.append(idx[sel])
        chosen = torch.cat(selected[n // 16:])  # the second pass
        assert memory.tolist() == torch.where(pred == 0, 0, -1).tolist()  # only the confident ones are remembered
        if expect_all:
            assert len(chosen) == n and thr[1:].tolist() == [0.0, 0.0]
        else:
            # warm-up: beta_0 = 80 / 160 unused, T_0 = 0.95 * 0.5 / 1.5 = 0.32, lifted to the floor
            assert len(chosen) == n // 3 and (pred[chosen] == 0).all() and thr.tolist() == pytest.approx([0.9] * 3)


# -------------------------------------------------------------------------------------------
# Stage 1 diagnostics and the contrastive loss's scale
# -------------------------------------------------------------------------------------------
def test_confident_pool_warns_when_it_holds_fewer_than_two_classes(capsys):
    one = stages.confident_pool_record("stage 1 fr", 800, torch.tensor([1] * 200), 3, 0.9)
    assert one == {"pool": 800, "high_conf": 200, "high_conf_per_class": [0, 200, 0], "high_conf_classes": 1}
    err = capsys.readouterr().err
    assert err.count("warning: stage 1 fr") == 1 and "[0, 200, 0]" in err
    stages.confident_pool_record("stage 1 fr", 800, torch.tensor([], dtype=torch.long), 3, 0.9)
    assert "0 class(es)" in capsys.readouterr().err
    two = stages.confident_pool_record("stage 1 fr", 800, torch.tensor([0, 2, 2]), 3, 0.9)
    assert two["high_conf_classes"] == 2 and capsys.readouterr().err == ""
    stages.confident_pool_record("stage 1 fr", 800, torch.tensor([1]), 3, 0.9, warn=False)
    assert capsys.readouterr().err == ""


def test_clcs_only_step_is_lambda_times_l_clcs(tiny):
    model, tok = _tiny_model(tiny)
    src = [Example("a man is playing", "a guitar", 2), Example("the cat", "sleeps", 0)]
    batch = conlst.make_ft_batch(_net(model, tok), src)
    torch.manual_seed(0)
    loss, terms = conlst.conl_step(model, batch, conlst.Args(clcs_only=True, lambda_clcs=0.5))
    torch.manual_seed(0)
    clcs = conlst.clcs_loss_eq7(model(batch["src"]), batch["src_labels"])
    assert set(terms) == {"l_clcs"} and torch.allclose(terms["l_clcs"], clcs) and torch.allclose(loss, 0.5 * clcs)


def test_distance_scale_terms(tiny):
    model, tok = _tiny_model(tiny)
    pool = [("the cat sleeps", "a man"), ("une femme lit", "un livre"), ("les enfants", "jouent"), ("a man", "reads")]
    comp = torch.tensor([[False, True, False], [False, False, True]])
    neg_idx, neg_valid = torch.tensor([[2, 3], [3, 0]]), torch.tensor([[True, True], [True, False]])
    batch = conlst.make_conl_batch(_net(model, tok), pool, pool[:2], comp, neg_idx, neg_valid, [])
    for normalize in (False, True):
        _, terms = conlst.conl_step(model, batch, conlst.Args(con_normalize=normalize))
        h = model.con_head(model.pool(conlst.tokenize_pairs(tok, pool, "", 32))).detach()
        h = F.normalize(h, dim=-1) if normalize else h
        d2 = lambda i, j: float((h[i] - h[j]).pow(2).sum())  # noqa: E731
        assert terms["d2_pos"].item() == pytest.approx(0.0, abs=1e-6)  # eval mode: the two passes are equal
        assert terms["n_neg"].item() == 3 and terms["d2_neg_sum"].item() == pytest.approx(d2(0, 2) + d2(0, 3)
                                                                                           + d2(1, 3), rel=1e-5)
        if normalize:
            assert 0 <= terms["d2_neg_sum"].item() / 3 <= 4


def test_normalised_contrastive_loss_does_not_saturate_with_the_embedding_scale():
    """Unnormalised at tau 1, the loss of a dropout-like positive (anchor + small noise) against random
    negatives falls to ~0 as the embeddings grow (the saturated 0.02-0.08 of the cpu runs); normalised,
    it does not depend on the scale. An untrained pair (positive no closer than the negatives, iid random
    384-d embeddings) gives, normalised with tau 0.05, a loss of the order of chance log(K + 1)
    (above it: the cosine spread of random 384-d vectors, 1/sqrt(384), is 2 logit units at tau 0.05)."""
    torch.manual_seed(0)
    b, k, d = 256, 8, 384
    valid = torch.ones(b, k, dtype=torch.bool)
    a, n = torch.randn(b, d), torch.randn(b, k, d)
    pos = a + 0.05 * torch.randn(b, d)
    loss = conlst.contrastive_negative_loss_eq6
    unnorm = [loss(s * a, s * pos, s * n, valid, 1.0).item() for s in (0.02, 1.0)]
    assert unnorm[0] > 1.5 and unnorm[1] < 0.05  # same geometry, larger scale: saturated
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    normed = [loss(unit(s * a), unit(s * pos), unit(s * n), valid, 0.5).item() for s in (0.02, 1.0)]
    assert normed[0] == pytest.approx(normed[1], rel=1e-4)
    chance = math.log(k + 1)
    iid = loss(unit(a), unit(torch.randn(b, d)), unit(n), valid, 0.05).item()
    assert chance - 0.5 < iid < chance + 2.5
    assert loss(a, torch.randn(b, d), n, valid, 1.0).item() > 20  # unnormalised: no such scale


# -------------------------------------------------------------------------------------------
# Strong views: random masking, mixup
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    texts = ["a man is playing a guitar", "une femme lit un livre", "query: the cat sleeps", "les enfants jouent"]
    model, tok = tiny_encoder(texts, hidden=16, layers=1, heads=2, vocab_size=200, max_length=32)
    return model, tok


def test_random_masking_keeps_special_tokens_and_prefix(tiny):
    _, tok = tiny
    enc = conlst.tokenize_pairs(tok, [("the cat sleeps", "a man"), ("une femme", "les enfants jouent")],
                                "query: ", 32, maskable=True)
    ids, can = enc["input_ids"], enc["maskable"]
    special = torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]))
    assert not (can & special).any()
    assert tok.convert_ids_to_tokens(ids[0, 1:4].tolist()) == ["query", ":", "the"]
    assert not can[:, 1:3].any() and can[0, 3]  # "query" ":" after [CLS] kept; the first word maskable
    assert torch.equal(conlst.random_token_masking(ids, can, 0.0, tok.mask_token_id), ids)
    all_masked = conlst.random_token_masking(ids, can, 1.0, tok.mask_token_id)
    assert (all_masked[can] == tok.mask_token_id).all() and torch.equal(all_masked[~can], ids[~can])
    torch.manual_seed(0)
    big = torch.arange(100000).reshape(100, 1000)
    frac = (conlst.random_token_masking(big, torch.ones_like(big, dtype=torch.bool), 0.15, -1) == -1).float().mean()
    assert abs(frac.item() - 0.15) < 0.01


def test_mixup_mixes_inputs_and_one_hot_targets():
    x = torch.randn(4, 6)
    y = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    partner = torch.tensor([1, 2, 3, 0])
    lam = torch.tensor([0.3, 0.5, 1.0, 0.0])
    mx, my = conlst.mixup_eq9_10(x, x[partner], y, y[partner], lam)
    assert mx.shape == (4, 6) and my.shape == (4, 3)
    assert torch.allclose(my[0], torch.tensor([0.3, 0.7, 0.0]))
    assert torch.allclose(my[1], torch.tensor([0.0, 0.5, 0.5]))
    assert torch.allclose(mx[0], 0.3 * x[0] + 0.7 * x[1]) and torch.equal(mx[2], x[2]) and torch.equal(mx[3], x[0])
    assert torch.allclose(my.sum(1), torch.ones(4))
    torch.manual_seed(0)
    lam = conlst.sample_mixup_lambda_eq11(20000, 4.0)
    assert lam.shape == (20000,) and (lam > 0).all() and (lam < 1).all()
    assert abs(lam.mean().item() - 0.5) < 0.01 and abs(lam.var().item() - 1 / 36) < 0.002  # Beta(4,4): var 1/36
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    soft = torch.tensor([[0.3, 0.7, 0.0]])
    expected = -(soft * F.log_softmax(logits, 1)).sum()
    assert torch.allclose(conlst.soft_cross_entropy(logits, soft), expected)


def _tiny_model(tiny):
    encoder, tok = tiny
    torch.manual_seed(0)
    return conlst.CoNLSTModel(encoder, "mean", 0, 0.0).eval(), tok  # eval: no dropout, deterministic


def _net(model, tok):
    """What the batch builders read: the tokenizer, no prefix, 32 tokens, the CPU."""
    return conlst.Net(model, tok, "", 32, torch.device("cpu"))


def test_st_step_equals_the_direct_formula(tiny):
    model, tok = _tiny_model(tiny)
    pairs = [("the cat sleeps", "a man"), ("une femme lit", "un livre"), ("les enfants", "jouent"), ("a man", "reads")]
    src = [Example("a man is playing", "a guitar", 2), Example("the cat", "sleeps", 0)]
    bt = {"a man": "a guy", "reads": "is reading"}
    torch.manual_seed(3)
    batch = conlst.make_st_batch(_net(model, tok), conlst.Args(max_length=32, mask_ratio=0.0), bt, pairs,
                                 ["mixup", "mask", "mixup", "bt"], [0, 1, 2, 1], src)
    lam, partner = batch["lam"], batch["partner"]
    assert (partner != torch.arange(4)).all() and ((lam > 0) & (lam < 1)).all()
    args = conlst.Args(lambda_u=0.5)
    loss, terms = conlst.st_step(model, batch, args)
    views = pairs[:3] + [("a guy", "is reading")]  # the back-translated pair for the 'bt' row
    h = model.pool(conlst.tokenize_pairs(tok, views, "", 32))
    y = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    l_u = 0.0
    for i in range(4):
        if i in (0, 2):  # mixup rows: Eq. 9-10 with a random other row of the batch
            x_i = lam[i] * h[i] + (1 - lam[i]) * h[partner[i]]
            y_i = lam[i] * y[i] + (1 - lam[i]) * y[partner[i]]
        else:
            x_i, y_i = h[i], y[i]
        l_u += -(y_i * F.log_softmax(model.classifier(x_i), -1)).sum() / 4
    l_sup = F.cross_entropy(model(conlst.tokenize_pairs(tok, [(e.text_a, e.text_b) for e in src], "", 32)),
                            torch.tensor([2, 0]))
    assert torch.allclose(terms["l_u"], l_u, atol=1e-5) and torch.allclose(terms["l_sup"], l_sup, atol=1e-5)
    assert torch.allclose(loss, l_sup + 0.5 * l_u, atol=1e-5)


def test_conl_step_equals_the_direct_formula(tiny):
    model, tok = _tiny_model(tiny)
    pool = [("the cat sleeps", "a man"), ("une femme lit", "un livre"), ("les enfants", "jouent"),
            ("a man", "reads"), ("query", "the cat")]
    net = _net(model, tok)
    comp = torch.tensor([[False, True, False], [False, False, True]])
    neg_idx = torch.tensor([[3, 4], [4, 0]])
    neg_valid = torch.tensor([[True, True], [True, False]])
    src = [Example("a man is playing", "a guitar", 2)]
    batch = conlst.make_conl_batch(net, pool, pool[:2], comp, neg_idx, neg_valid, src)
    args = conlst.Args(tau=0.5, lambda_clcs=0.1)
    torch.manual_seed(0)
    loss, terms = conlst.conl_step(model, batch, args)
    h = model.con_head(model.pool(conlst.tokenize_pairs(tok, pool, "", 32))).detach()
    total = 0.0
    for i, negs in ((0, [3, 4]), (1, [4])):
        pos = 1.0  # eval mode: the second pass equals the first, distance 0
        neg = sum(math.exp(-float((h[i] - h[j]).pow(2).sum()) / 0.5) for j in negs)
        total += -math.log(pos / (pos + neg)) / 2
    assert abs(terms["l_cl"].item() - total) < 1e-5 and terms["no_neg_frac"].item() == 0.0
    torch.manual_seed(0)
    src_logits = model(conlst.tokenize_pairs(tok, [("a man is playing", "a guitar")], "", 32))
    clcs = conlst.clcs_loss_eq7(src_logits, torch.tensor([2]))
    assert torch.allclose(terms["l_clcs"], clcs, atol=1e-5) and abs(loss.item() - (total + 0.1 * clcs.item())) < 1e-5
    # w/o CL: Eq. 1 on the anchors with their complementary labels
    batch = conlst.make_conl_batch(net, pool, pool[:2], comp, torch.zeros(2, 0, dtype=torch.long),
                                   torch.zeros(2, 0, dtype=torch.bool), [])
    _, terms = conlst.conl_step(model, batch, conlst.Args(wo_cl=True))
    nl = conlst.negative_learning_loss_eq1(model(conlst.tokenize_pairs(tok, pool[:2], "", 32)), comp)
    assert set(terms) == {"l_nl"} and torch.allclose(terms["l_nl"], nl, atol=1e-5)


# -------------------------------------------------------------------------------------------
# Loaders on the shared files
# -------------------------------------------------------------------------------------------
def _args(tmp_path, *extra):
    return parse_args(conlst.Args, ["--preset", "smoke", "--out-dir", str(tmp_path), *extra], presets=conlst.PRESETS)


def test_loaders_on_shared_xnli_and_snli(shared_data, tmp_path):
    a = _args(tmp_path, "--limit-train", "30000", "--limit-pool", "9000", "--limit-eval", "2000")
    snli_dev = load_text_task("snli", "dev", shared_data)
    assert len(snli_dev) == 9842 and {e.label for e in snli_dev} == {0, 1, 2}
    a.source_splits = ["dev", "test"]
    record = {}
    data = text_data.load_xnli_transfer(a, ["sw", "ur"], record)  # the smoke preset: pool = XNLI test, eval = dev
    assert len(data.source) == 9842 + 9824 and all(e.label in (0, 1, 2) for e in data.source)
    dev = data.targets["sw"].eval
    assert len(dev) == 2000 and len(data.select) == 490  # English selection rows: the 490 the evaluation left
    assert [sum(e.label == c for e in dev + data.select) for c in range(3)] == [830, 830, 830]
    rows_eval, rows_select = record["eval_sw"]["indices"], record["select"]["indices"]
    assert rows_eval == record["eval_ur"]["indices"] and sorted(rows_eval + rows_select) == list(range(2490))
    pool = data.targets["ur"].pool
    assert len(pool) == 5010 and all(isinstance(p, tuple) and len(p) == 2 for p in pool)  # no labels at all
    assert list(record) == ["source", "pool_sw", "eval_sw", "pool_ur", "eval_ur", "select"]
    assert record["source"] == {"data": "snli dev+test (labelled pairs)", "n_all": 9842 + 9824, "indices": None}
    assert record["pool_ur"]["data"] == "xnli-ur test (labels dropped)" and record["eval_sw"]["data"] == "xnli-sw dev"
    assert text_data.load_pool_gold_labels_for_analysis_only(a, "ur") is None  # local test has no labels
    a.pool_split, a.eval_split = "dev", "test"
    gold = text_data.load_pool_gold_labels_for_analysis_only(a, "fr")
    assert gold.shape == (2490,) and set(gold.tolist()) == {0, 1, 2}
    with pytest.raises(MissingError):  # local XNLI test has no labels and --data-source local forbids the hub
        a.data_source = "local"
        text_data.load_xnli_transfer(a, ["fr"])
    # subsets: the pool takes the same rows in every language (XNLI is parallel), eval is seed-independent
    b = _args(tmp_path)
    b2 = _args(tmp_path, "--seed", "1")
    assert len(text_data.load_xnli_transfer(b, ["fr"]).targets["fr"].pool) == 96
    assert subset_indices(5010, 96, b.seed).tolist() != subset_indices(5010, 96, b2.seed).tolist()
    texts = [[e.text_a for e in text_data.load_xnli_transfer(x, ["de"]).targets["de"].eval] for x in (b, b2)]
    assert texts[0] == texts[1]


def test_sick_reader_and_a_stage0_source_without_xnli_english(shared_data, tmp_path):
    """--source-add sick: SNLI dev+test + all of SICK (3-way label); XNLI English dev and test (parallel to
    the target rows) are in no training pair, and XNLI cannot be a source task at all."""
    sick = text_data.read_sick_nli(shared_data)
    assert len(sick) == 9840 and [sum(e.label == c for e in sick) for c in range(3)] == [2821, 5595, 1424]
    assert sick[0] == Example("A group of kids is playing in a yard and an old man is standing in the background",
                              "A group of boys in a yard is playing and a man is standing in the background", 1)
    a = _args(tmp_path, "--source-splits", "dev", "test", "--source-add", "sick", "--limit-train", "30000")
    record = {}
    data = text_data.load_xnli_transfer(a, ["fr"], record)
    assert len(data.source) == 9842 + 9824 + 9840 and data.source[-9840:] == sick
    assert record["source_add"]["n_all"] == 9840 and "SICK" in record["source_add"]["data"]
    key = lambda e: (e.text_a.strip().lower(), e.text_b.strip().lower())  # noqa: E731
    trained = {key(e) for e in data.source}
    for split in ("dev", "test"):
        xnli_en = text_data.read_xnli("en", split, shared_data)
        assert len(xnli_en) in (2490, 5010) and not trained & {key(e) for e in xnli_en}
    with pytest.raises(UsageError, match="--source-task"):
        _args(tmp_path, "--source-task", "xnli-en")


def test_prior_correction_balances_the_pool_predictions():
    torch.manual_seed(0)
    logits = torch.randn(600, 3) + torch.tensor([0.0, 1.5, -0.5])  # "neutral" predicted for most rows
    probs = logits.softmax(1)
    assert max(stages.class_fractions(probs)) > 0.6
    w = stages.balanced_prior_weights(probs)
    fixed = stages.prior_corrected(probs, w)
    assert torch.allclose(fixed.mean(0), torch.full((3,), 1 / 3), atol=1e-4) and torch.allclose(fixed.sum(1),
                                                                                                 torch.ones(600))
    assert w.sum() == pytest.approx(1.0) and w[1] < w[0] and w[1] < w[2]
    assert max(stages.class_fractions(fixed)) < 0.45
    assert torch.equal(fixed.argmax(1), (probs * w).argmax(1))  # a per-class rescaling, nothing else
    even = torch.full((10, 3), 1 / 3)
    assert torch.allclose(stages.balanced_prior_weights(even), torch.full((3,), 1 / 3))


# -------------------------------------------------------------------------------------------
# Back-translation: the tool writes the file (a fake translator: never a download), conlst.py reads it
# -------------------------------------------------------------------------------------------
def fake_translate(texts, src, tgt, calls=None):
    if calls is not None:
        calls.append((len(texts), src, tgt))
    return [f"[{tgt}] " + t for t in texts]


def test_back_translation_cache(tmp_path):
    calls = []

    def translate(texts, src, tgt):
        return fake_translate(texts, src, tgt, calls)

    cache = tmp_path / "bt.tsv"
    out = back_translate.back_translate(["Bonjour  le monde", "Salut\tà tous"], "fr", "en", translate, cache)
    assert calls == [(2, "fr", "en"), (2, "en", "fr")]
    assert out["Bonjour le monde"] == "[fr] [en] Bonjour le monde" and out["Salut à tous"] == "[fr] [en] Salut à tous"
    assert back_translate.read_translations(cache) == out
    out2 = back_translate.back_translate(["Bonjour le monde", "Encore"], "fr", "en", translate, cache)
    assert calls[2:] == [(1, "fr", "en"), (1, "en", "fr")] and len(out2) == 3  # only the new sentence
    assert back_translate.bt_pair(out2, ("Bonjour le monde", "Encore")) == ("[fr] [en] Bonjour le monde",
                                                                          "[fr] [en] Encore")
    assert back_translate.bt_pair(out2, ("Bonjour le monde", "absent")) is None


def test_conlst_reads_the_file_the_tool_writes(shared_data, tmp_path):
    a = _args(tmp_path, "--bt", "mbart", "--bt-cache-dir", str(tmp_path / "cache"), "--data-dir", str(shared_data))
    with pytest.raises(MissingError, match="mBART-50 does not cover"):
        back_translate.load_backtranslations(a, "el", [("a", "b")])
    pool = text_data.load_xnli_transfer(a, ["en"]).targets["en"].pool
    # not written yet: the error names the command that writes it
    with pytest.raises(MissingError, match="of the pool's sentences; write it with: python -m common.back_translate "
                                           "--langs en --split test") as e:
        back_translate.load_backtranslations(a, "en", pool)
    argv = str(e.value).split("write it with: python -m common.back_translate ", 1)[1].split(" (or ")[0].split()
    assert back_translate.main(argv, translator=fake_translate) == 0  # that very command (a fake translator)
    got = back_translate.load_backtranslations(a, "en", pool)
    first = back_translate.clean(pool[0][0])
    assert got[first] == "[en] [fr] " + first  # English target: French pivot
    assert [f.name for f in (tmp_path / "cache").iterdir()] == [
        "facebook__mbart-large-50-many-to-many-mmt.en.via-fr.tsv"]
    assert all(back_translate.bt_pair(got, p) for p in pool)


def _fake_parallel_xnli(root: Path, n_dev: int = 40, n_test: int = 30) -> Path:
    """A parallel XNLI (dev labelled, test not) in en/fr/de whose row number is in every text, and a small SNLI dev."""
    names = ("entailment", "neutral", "contradiction")
    x = root / "xnli" / "xtreme_format"
    x.mkdir(parents=True)
    for lang in ("en", "fr", "de"):
        dev = [f"{lang} p {i}\t{lang} h {i}\t{names[i % 3]}\n" for i in range(n_dev)]
        (x / f"dev-{lang}.tsv").write_text("".join(dev))
        (x / f"test-{lang}.tsv").write_text("".join(f"{lang} p {i}\t{lang} h {i}\n" for i in range(n_test)))
    s = root / "senteval_transfer" / "SNLI"
    s.mkdir(parents=True)
    for name, lines in (("s1", [f"a {i} " for i in range(20)]), ("s2", [f"b {i} " for i in range(20)]),
                        ("labels", [names[i % 3] for i in range(20)])):
        (s / f"{name}.dev").write_text("".join(line + "\n" for line in lines))
    return root


def test_selection_rows_are_disjoint_from_evaluation_rows(tmp_path):
    """XNLI is parallel line by line: English selection rows of the evaluation split must not be the
    evaluated rows in translation (issue 26); every row index used is in data_subsets.json."""
    root = _fake_parallel_xnli(tmp_path / "data")

    def load(limit_eval):
        a = _args(tmp_path, "--data-dir", str(root), "--data-source", "local", "--langs", "fr", "de", "--limit-train",
                  "10", "--limit-pool", "10", "--limit-eval", str(limit_eval))  # smoke: eval and selection on dev
        record = {}
        return text_data.load_xnli_transfer(a, ["fr", "de"], record), record

    def row(e):
        return int(e.text_a.split()[-1])

    data, record = load(15)
    ev, sel = record["eval_fr"]["indices"], record["select"]["indices"]
    assert ev == record["eval_de"]["indices"] == subset_indices(40, 15, 12345).tolist()  # the evaluation draw as before
    assert len(sel) == 15 and not set(ev) & set(sel)
    for lang in ("fr", "de"):  # the items themselves: row numbers read from the texts
        assert [row(e) for e in data.targets[lang].eval] == ev and data.targets[lang].eval[0].text_a.startswith(lang)
    assert [row(e) for e in data.select] == sel and all(e.text_a.startswith("en ") for e in data.select)
    assert "disjoint from the evaluation rows" in record["select"]["data"]
    data, record = load(30)  # the selection set gets the 10 rows the evaluation leaves
    assert sorted(record["eval_fr"]["indices"] + record["select"]["indices"]) == list(range(40))
    assert len(data.select) == 10
    with pytest.raises(UsageError, match="--limit-eval 40: the evaluation set takes every row"):
        load(40)


# -------------------------------------------------------------------------------------------
# End-to-end: every stage on a tiny model and real XNLI/SNLI text
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from common.utils import shared_data_dir

    if not shared_data_dir().is_dir():
        pytest.skip("the offline data folder is absent")
    out = tmp_path_factory.mktemp("runs")
    summary = conlst.main(_args(out, "--exp-name", "full", "--gamma", "0.34"))
    return out / "full", summary


def test_full_pipeline_writes_the_run_files(full_run):
    run, summary = full_run
    for f in ("args.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "stage0.pt", "data_subsets.json"):
        assert (run / f).exists(), f
    assert not (run / "best_in_stage.pt").exists() and not (run / "stage1_fr.pt").exists()
    s = json.loads((run / "summary.json").read_text())
    for key in ("script", "method", "dataset", "setting", "seed", "primary_metric", "final", "best", "wall_s",
                "samples_per_s"):
        assert key in s, key
    assert s["script"] == "conlst.py" and s["method"] == "conlst" and s["primary_metric"] == "acc"
    assert s["setting"] == "snli->fr" and s["final"]["step"] == s["steps"] and s["samples_per_s"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in lines if r["split"] == "eval"]
    assert [(r["stage"], r["lang"]) for r in recs] == [(0, None)] * 4 + [(0, "fr"), (1, "fr"), (2, "fr"), (2, "fr")]
    assert all("en_dev_acc" in r for r in recs)
    # FlexMatch: one line per stage-2 step (2 iterations x 96 / 16 batches), each with its thresholds and counts
    flex = [r for r in lines if r["split"] == "flexmatch"]
    assert len(flex) == 12 and {r["iteration"] for r in flex} == {1, 2} and len(lines) == len(recs) + 12
    assert [r["step"] for r in flex] == list(range(recs[5]["step"] + 1, recs[5]["step"] + 13))
    for r in flex:
        assert len(r["thresholds"]) == 3 and sum(r["selected_per_class"]) <= r["batch"] == 16
        assert sum(r["memory_per_class"]) + r["memory_unused"] == 96
    fr = s["per_lang"]["fr"]
    assert fr["stage0"]["acc"] == recs[4]["acc"] and fr["final"]["acc"] == recs[-1]["acc"] == s["final"]["acc"]
    best = max(recs[-2:], key=lambda r: (r["en_dev_acc"], r["step"]))  # best English dev within stage 2
    assert s["best"]["acc"] == best["acc"] and s["best"]["step"] == best["step"]
    # losses go down: stage 0 CE over epochs, stage 2 target loss over iterations
    assert recs[3]["l_ce"] < recs[0]["l_ce"]
    assert recs[7]["l_u"] < recs[6]["l_u"]
    # stage 1 ran the contrastive term with real negatives and L_CLCS
    assert recs[5]["l_cl"] > 0 and recs[5]["no_neg_frac"] < 1 and recs[5]["l_clcs"] > 0
    # confidence bins before/after stage 1 and after stage 2, on the evaluation set (the pool has no labels)
    assert fr["bins_on"] == "eval" and set(fr["bins"]) == {"after_stage0", "after_stage1", "after_stage2"}
    for b in fr["bins"].values():
        assert sum(b[k]["n"] for k in ("high", "mid", "low")) == b["all"]["n"] == 96
        assert sum(b["hist"]["clean"]) + sum(b["hist"]["noisy"]) == 96
        assert abs(b["all"]["acc"] - 100 * sum(b["hist"]["clean"]) / 96) < 1e-6
    assert abs(fr["bins"]["after_stage0"]["all"]["acc"] - fr["stage0"]["acc"]) < 1e-6
    it = fr["stage2_iterations"]
    assert [x["iteration"] for x in it] == [1, 2] and it[0]["views"]["bt"] == 0 and it[0]["n_selected"] > 0
    for x, steps in zip(it, (flex[:6], flex[6:])):  # the iteration's counts are the sums of its steps' lines
        assert x["n_seen"] == 96 and x["n_selected"] == sum(sum(r["selected_per_class"]) for r in steps)
        assert x["selected_per_class"] == [sum(r["selected_per_class"][c] for r in steps) for c in range(3)]
        assert x["thresholds"] == steps[-1]["thresholds"] and sum(x["views"].values()) == x["n_selected"]
    # stage 1: the confident pool, the fraction of anchors without a negative and the distance scale
    pool = fr["stage1_pool"]
    assert pool["high_conf"] == sum(pool["high_conf_per_class"]) and 0 <= pool["no_neg_frac"] <= 1
    assert pool["high_conf_classes"] == sum(n > 0 for n in pool["high_conf_per_class"])
    assert pool["no_neg_frac"] == pytest.approx(recs[5]["no_neg_frac"])  # 6 equal batches: the mean of the steps
    assert recs[5]["d2_pos"] > 0 and recs[5]["d2_neg"] == pytest.approx(recs[5]["d2_neg_sum"] / recs[5]["n_neg"])
    assert recs[5]["high_conf_classes"] == pool["high_conf_classes"]
    assert len(fr["stage0_pred_frac"]) == 3 and abs(sum(fr["stage0_pred_frac"]) - 1) < 1e-6


def test_resume_across_stages_repeats_the_uninterrupted_run(full_run, tmp_path, monkeypatch):
    run, summary = full_run
    real_stop = conlst.check_stop

    def stop_in_stage2(run, prog, *a):  # two steps into stage 2's second iteration (after the first one's checkpoint)
        if prog.history and prog.history[-1]["stage"] == 2 and prog.step >= prog.history[-1]["step"] + 2:
            sys.exit(130)
        real_stop(run, prog, *a)

    monkeypatch.setattr(conlst, "check_stop", stop_in_stage2)
    with pytest.raises(SystemExit):
        conlst.main(_args(tmp_path, "--exp-name", "cut", "--gamma", "0.34"))
    monkeypatch.setattr(conlst, "check_stop", real_stop)
    cut = tmp_path / "cut"
    partial = json.loads((cut / "summary.json").read_text())  # written after each finished stage
    assert "stage1" in partial["per_lang"]["fr"] and "stage2" not in partial["per_lang"]["fr"]
    resumed = conlst.main(parse_args(conlst.Args, ["--resume", str(cut)]))
    a = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "elapsed_s"}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert resumed["per_lang"]["fr"]["bins"] == summary["per_lang"]["fr"]["bins"]


def test_ablations_stage0_reuse_and_backtranslation_file(full_run, tmp_path):
    """--stage0-from reuses the stage-0 model; --wo-cl runs stage 1 with negative learning; stage 2
    takes back-translated views from a precomputed file (covering a few pool pairs)."""
    run, _ = full_run
    a = _args(tmp_path)
    pool = text_data.load_xnli_transfer(a, ["fr"]).targets["fr"].pool
    bt = tmp_path / "bt.tsv"
    back_translate.write_translations(bt, {s: s[::-1] for pair in pool[:30] for s in pair})
    s = conlst.main(_args(tmp_path, "--exp-name", "abl", "--stage0-from", str(run), "--wo-cl", "--bt", "file",
                          "--bt-file", str(bt), "--wo-mixup", "--s2-iterations", "1", "--freeze-embeddings",
                          "--keep-models"))
    # frozen word embeddings are left out of the saved models (they equal the pretrained ones)
    saved = torch.load(tmp_path / "abl" / "stage1_fr.pt", weights_only=False)["model"]
    assert "encoder.embeddings.word_embeddings.weight" not in saved and "classifier.weight" in saved
    assert (tmp_path / "abl" / "stage2_fr.pt").exists()
    assert s["method"] == "conlst_wo_cl_wo_mixup" and not (tmp_path / "abl" / "stage0.pt").exists()
    recs = [r for r in map(json.loads, (tmp_path / "abl" / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "eval"]
    assert [r["stage"] for r in recs] == [0, 1, 2] and "l_nl" in recs[1] and "l_cl" not in recs[1]
    full = json.loads((run / "metrics.jsonl").read_text().splitlines()[4])
    assert recs[0]["acc"] == full["acc"]  # the same stage-0 model, the same zero-shot accuracy
    views = s["per_lang"]["fr"]["stage2_iterations"][0]["views"]
    assert views["mixup"] == 0 and views["bt"] > 0 and views["mask"] > 0
    # stage 2 only, and the zero-shot baseline
    z = conlst.main(_args(tmp_path, "--stage0-from", str(run / "stage0.pt"), "--wo-conl", "--wo-st"))
    assert z["method"] == "zeroshot" and z["best"]["acc"] == full["acc"] and set(z["avg"]) >= {"stage0"}
    with pytest.raises(UsageError, match="--stage0-from"):
        conlst.main(_args(tmp_path, "--stage0-from", str(run), "--con-dim", "8"))


def test_clcs_only_pl_dropout_and_prior_correction_runs(full_run, tmp_path, monkeypatch):
    """--clcs-only: stage 1 trains lambda * L_CLCS alone (no L_CL term, no negatives); --pl-dropout: stage
    2's pseudo-labels come from dropout passes; --prior-correction: the zero-shot record gets acc_prior and
    stage 1 pseudo-labels under the balancing weights."""
    run, _ = full_run
    calls = []
    real_predict = conlst.predict
    monkeypatch.setattr(conlst, "predict",
                        lambda *a, **k: calls.append(k.get("dropout", False)) or real_predict(*a, **k))
    s = conlst.main(_args(tmp_path, "--exp-name", "ctl", "--stage0-from", str(run), "--clcs-only", "--pl-dropout",
                          "--prior-correction", "--max-steps", "2", "--s2-iterations", "1"))
    assert s["method"] == "conlst_clcs_only"
    recs = [json.loads(x) for x in (tmp_path / "ctl" / "metrics.jsonl").read_text().splitlines()]
    s1 = [r for r in recs if r["split"] == "eval" and r["stage"] == 1][0]
    assert "l_clcs" in s1 and "l_cl" not in s1 and "no_neg_frac" not in s1
    fr = s["per_lang"]["fr"]
    assert fr["stage1_pool"]["no_neg_frac"] is None and len(fr["stage1_pool"]["prior_weights"]) == 3
    pc = fr["prior_correction"]
    assert abs(sum(pc["weights"]) - 1) < 1e-6 and 0 <= pc["acc_prior"] <= 100 and len(pc["pred_frac"]) == 3
    assert calls.count(True) == 2  # one dropout pass per stage-2 step (--max-steps 2), every other call eval mode
    with pytest.raises(UsageError, match="--clcs-only"):
        conlst.validate(_args(tmp_path, "--clcs-only", "--wo-cl"))


def test_confidence_figure_from_the_summary(full_run, tmp_path):
    """The report draws Figure 3 from the bins in summary.json: per run (python -m benchmarks.confidence
    RUN), and per run id with its seeds pooled (benchmarks/report.py)."""
    run, summary = full_run
    assert confidence.main([str(run)]) == 0 and (run / "confidence_fr.png").stat().st_size > 0
    bins = summary["per_lang"]["fr"]["bins"]
    pooled = confidence.pool_bins([bins, bins])
    assert pooled["after_stage1"]["all"] == {"n": 192, "acc": pytest.approx(bins["after_stage1"]["all"]["acc"])}
    assert pooled["after_stage2"]["hist"]["clean"] == [2 * x for x in bins["after_stage2"]["hist"]["clean"]]
    lines = confidence.report_figures({"conlst_x": [{"summary": summary}, {"summary": summary}]}, tmp_path)
    assert "![conlst_x fr](confidence_conlst_x_fr.png)" in lines and (tmp_path / "confidence_conlst_x_fr.png").exists()
    assert confidence.report_figures({"lacol_x": [{"summary": {"final": {"acc": 1.0}}}]}, tmp_path) == []


# -------------------------------------------------------------------------------------------
# Arguments
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,flag", [(["--gamma", "1.5"], "--gamma"), (["--langs", "xx"], "--langs"),
                                       (["--pool-split", "dev", "--eval-split", "dev"], "--pool-split"),
                                       (["--wo-conl", "--wo-cl"], "--wo-conl"), (["--wo-st", "--wo-bt"], "--wo-st"),
                                       (["--bt", "file"], "--bt"), (["--k-neg", "0"], "--k-neg"),
                                       (["--tau", "0"], "--tau"), (["--limit-pool", "0"], "--limit-pool"),
                                       (["--flex-floor", "1.5"], "--flex-floor"), (["--clcs-only", "--wo-conl"],
                                                                                   "--clcs-only"),
                                       (["--select-lang", "fr"], "--select-lang fr: is a target language"),
                                       (["--langs", "en", "de", "--select-lang", "de"], "--select-lang de")])
def test_validate_names_the_flag(tmp_path, argv, flag):
    with pytest.raises(UsageError, match=flag):
        conlst.validate(_args(tmp_path, *argv))


@pytest.mark.parametrize("argv,flag", [(["--mask-ratio", "1.5"], "--mask-ratio"),
                                       (["--langs", "fr", "de", "--select-lang", "de"], "--select-lang de")])
def test_bad_argument_exits_2_with_one_line_and_writes_nothing(tmp_path, argv, flag):
    r = subprocess.run([sys.executable, "conlst.py", "--preset", "smoke", *argv, "--out-dir",
                        str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_presets_hold_the_paper_values():
    a = parse_args(conlst.Args, [], presets=conlst.PRESETS)
    assert (a.s1_lr, a.lambda_clcs, a.mixup_alpha, a.lambda_u, a.s1_epochs) == (2e-6, 1e-3, 4.0, 1.0, 1)
    assert (a.model, a.source_task, a.pool_split, a.eval_split, a.select_lang) == (
        "bert-base-multilingual-cased", "mnli", "dev", "test", "en")
    assert conlst.resolve_langs(a) == list(conlst.XNLI_LANGS)  # 'all': the paper's 15, English (test) included
    conlst.validate(a)
    x = parse_args(conlst.Args, ["--preset", "xlmr"], presets=conlst.PRESETS)
    assert x.model == "xlm-roberta-large" and x.s1_lr == 5e-6
    c = parse_args(conlst.Args, ["--preset", "cpu", "--lang", "sw"], presets=conlst.PRESETS)
    assert c.model == "e5-small" and c.bt == "off" and conlst.resolve_langs(c) == ["sw"]
    assert (c.source_task, c.source_splits, c.pool_split, c.eval_split) == ("snli", ["dev", "test"], "test", "dev")
    ex = Example("a", "b", 0)
    assert conlst.accuracy(torch.tensor([[0.9, 0.05, 0.05]]), [ex]) == 100.0
