"""Tests of common/text_data.py: every offline loader on the shared files (counts and labels
as in shared/data/README.md), the XABSA span decoding, and the hub path failing fast
offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from common import text_data as td
from common.text_data import Example, decode_aspect_spans, load_text_task
from common.utils import MissingError, UsageError, shared_data_dir

DATA = shared_data_dir()
REPO = Path(__file__).resolve().parent.parent
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent "
                                "(the papers' offline data; see shared/data/README.md)")


def _labels(examples: list[Example]) -> dict:
    return dict(Counter(ex.label for ex in examples))


# ------------------------------------------------------------------------------------------
# Local loaders: counts and labels
# ------------------------------------------------------------------------------------------
# (task, split, size, label counts or None for regression)
LOCAL_CASES = [
    ("snli", "dev", 9842, {0: 3329, 1: 3235, 2: 3278}),
    ("snli", "test", 9824, {0: 3368, 1: 3219, 2: 3237}),
    ("stsb", "train", 5749, None),
    ("stsb", "dev", 1500, None),
    ("stsb", "test", 1379, None),
    ("sickr", "train", 4500, None),
    ("sickr", "dev", 500, None),
    ("sickr", "test", 4927, None),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),
    ("rte", "dev", 277, {0: 146, 1: 131}),
    ("rte", "test", 3000, {-1: 3000}),
    ("cola", "train", 8551, {0: 2528, 1: 6023}),
    ("cola", "dev", 1043, {0: 322, 1: 721}),
    ("cola", "test", 1063, {-1: 1063}),
    ("mrpc", "train", 4076, {0: 1323, 1: 2753}),
    ("mrpc", "test", 1725, {0: 578, 1: 1147}),
    ("sst2", "train", 67349, {0: 29780, 1: 37569}),
    ("sst2", "dev", 872, {0: 428, 1: 444}),
    ("sst2", "test", 1821, {0: 912, 1: 909}),
    ("trec", "train", 5452, {0: 86, 1: 1250, 2: 1162, 3: 1223, 4: 835, 5: 896}),
    ("trec", "test", 500, {0: 9, 1: 94, 2: 138, 3: 65, 4: 81, 5: 113}),
    ("ag_news", "test", 7600, {0: 1900, 1: 1900, 2: 1900, 3: 1900}),
    ("ag_news", "dev", 10001, {0: 2509, 1: 2458, 2: 2496, 3: 2538}),
    ("sts12", "test", 3108, None),
    ("sts13", "test", 1500, None),
    ("sts14", "test", 3750, None),
    ("sts15", "test", 3000, None),
    ("sts16", "test", 1186, None),
]


@needs_data
@pytest.mark.parametrize("task,split,size,labels", LOCAL_CASES, ids=[f"{c[0]}-{c[1]}" for c in LOCAL_CASES])
def test_local_counts_and_labels(task, split, size, labels):
    examples = load_text_task(task, split, source="local")
    assert len(examples) == size
    assert all(isinstance(ex, Example) and isinstance(ex.text_a, str) and ex.text_a for ex in examples)
    pair = task not in ("cola", "sst2", "trec", "ag_news")
    assert all((isinstance(ex.text_b, str) and ex.text_b) if pair else ex.text_b is None for ex in examples)
    if labels is None:
        assert all(isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0 for ex in examples)
    else:
        assert _labels(examples) == labels
        assert all(isinstance(ex.label, int) for ex in examples)
    # "auto" takes the same local files when they are there.
    assert load_text_task(task, split) == examples


@needs_data
@pytest.mark.parametrize("lang", td.XNLI_LANGS)
def test_xnli_every_language(lang):
    dev = load_text_task(f"xnli-{lang}", "dev")
    test = load_text_task(f"xnli-{lang}", "test")
    assert len(dev) == 2490 and _labels(dev) == {0: 830, 1: 830, 2: 830}
    assert len(test) == 5010 and _labels(test) == {-1: 5010}
    assert all(ex.text_a and ex.text_b for ex in dev + test)


@needs_data
def test_xnli_parallel_and_label_order():
    en = load_text_task("xnli-en", "dev")
    fr = load_text_task("xnli-fr", "dev")
    assert [ex.label for ex in en] == [ex.label for ex in fr]  # parallel line by line
    # First lines of dev-en.tsv: neutral, contradiction, entailment.
    assert [td.label_names("xnli-en")[ex.label] for ex in en[:3]] == ["neutral", "contradiction", "entailment"]
    assert en[0].text_a == "And he said, Mama, I'm home."


@needs_data
def test_label_meaning_spot_checks():
    # AG News test.csv: the first row is a football story (Sports = 1); dev.tsv names classes.
    ag = load_text_task("ag_news", "test")
    assert ag[0].text_a.startswith("brown in line after livingston sack preston") and ag[0].label == 1
    assert td.LABEL_NAMES["ag_news"][load_text_task("ag_news", "dev")[0].label] == "Sci/Tech"
    # RTE: first train pair is not_entailment; MRPC: first train pair is a paraphrase.
    assert td.LABEL_NAMES["rte"][load_text_task("rte", "train")[0].label] == "not_entailment"
    mrpc = load_text_task("mrpc", "train")
    assert mrpc[0].label == 1 and mrpc[0].text_a.startswith("Amrozi")  # BOM and header handled
    # TREC: "DESC:manner How did serfdom develop ..." -> DESC; Latin-1 file decodes.
    trec = load_text_task("trec", "train")
    assert trec[0] == Example("How did serfdom develop in and then leave Russia ?", None,
                              td.LABEL_NAMES["trec"].index("DESC"))
    # SST-2 text is stripped of the space before the tab.
    assert load_text_task("sst2", "train")[0] == Example("hide new secretions from the parental units", None, 0)
    # STS-B: score column 5, sentences columns 6-7.
    assert load_text_task("stsb", "train")[0] == Example("a plane is taking off .", "an air plane is taking off .", 5.0)
    # SICK test has CRLF line endings: no '\r' left.
    assert not any("\r" in ex.text_b for ex in load_text_task("sickr", "test"))


@needs_data
def test_sts_per_subset():
    sizes = {"sts12": 3108, "sts13": 1500, "sts14": 3750, "sts15": 3000, "sts16": 1186}
    for year, size in sizes.items():
        subsets = td.load_sts(year)
        assert tuple(subsets) == td.STS_SUBSETS[year]
        assert sum(len(v) for v in subsets.values()) == size
        assert load_text_task(year, "test") == [ex for v in subsets.values() for ex in v]
    assert "SMT" not in td.load_sts("sts13")  # no input file in the release
    # STS15 answers-forums: 2,000 input lines, 375 scored.
    assert len(td.load_sts("sts15")["answers-forums"]) == 375
    assert {k: len(v) for k, v in td.load_sts("stsb", "dev").items()} == {"dev": 1500}


@needs_data
def test_senteval_sentences():
    sizes = {"MR": 10662, "CR": 3771, "SUBJ": 10000, "MPQA": 10603}
    for name, size in sizes.items():
        sents = td.load_senteval_sentences([name])
        assert len(sents) == size and all(s and s == s.strip() for s in sents)
    assert len(td.load_senteval_sentences()) == sum(sizes.values())


# ------------------------------------------------------------------------------------------
# XABSA
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tags,spans", [
    ([], []),
    (["O", "O"], []),
    (["O", "T-POS", "T-POS", "O"], [(1, 2, "POS")]),
    (["T-POS"], [(0, 0, "POS")]),
    # adjacent aspects of different polarity are two aspects
    (["T-POS", "T-NEG", "T-NEG", "O", "T-NEU"], [(0, 0, "POS"), (1, 2, "NEG"), (4, 4, "NEU")]),
    # aspect at the sentence end
    (["O", "O", "T-NEU", "T-NEU"], [(2, 3, "NEU")]),
    # BIEOS
    (["B-POS", "E-POS", "S-NEG", "O"], [(0, 1, "POS"), (2, 2, "NEG")]),
    (["O", "B-NEG", "I-NEG", "I-NEG", "E-NEG"], [(1, 4, "NEG")]),
    (["S-POS", "S-NEG"], [(0, 0, "POS"), (1, 1, "NEG")]),
    (["B-POS", "E-POS", "B-NEG", "E-NEG"], [(0, 1, "POS"), (2, 3, "NEG")]),
    (["O", "S-NEU"], [(1, 1, "NEU")]),
    # ill-formed BIEOS: mixed polarity, unclosed B, stray I/E -> dropped
    (["B-POS", "I-NEG", "E-POS"], []),
    (["B-POS", "I-POS", "O", "S-POS"], [(3, 3, "POS")]),
    (["O", "B-POS", "I-POS"], []),
    (["I-POS", "E-POS", "O"], []),
    (["B-POS", "B-NEG", "E-NEG"], [(1, 2, "NEG")]),
    # the two styles side by side
    (["T-POS", "S-POS", "T-POS"], [(0, 0, "POS"), (1, 1, "POS"), (2, 2, "POS")]),
])
def test_decode_aspect_spans(tags, spans):
    assert decode_aspect_spans(tags) == spans


def test_decode_aspect_spans_rejects_unknown_tags():
    with pytest.raises(ValueError, match="X-POS"):
        decode_aspect_spans(["O", "X-POS"])


@needs_data
def test_xabsa_files():
    sizes = {"gold-en-train": 1600, "gold-en-dev": 400, "gold-en-test": 676}
    for name, size in sizes.items():
        sents = td.load_xabsa(name)
        assert len(sents) == size
        for s in sents:
            assert len(s.tokens) == len(s.tags) == len(s.categories) > 0
            assert all(0 <= a <= b < len(s.tokens) and pol in td.POLARITIES for a, b, pol in s.spans)
    first = td.load_xabsa("gold-en-train")[0]
    assert first.spans == decode_aspect_spans(first.tags)
    # Every file of the folder loads.
    for name in td.XABSA_FILES:
        assert td.load_xabsa(name)
    # cs_fr-en (English sentences) ends with BIEOS-tagged lines; decoded, it has exactly the
    # aspects of the English gold train set it was made from.
    cs = td.load_xabsa("cs_fr-en-train")
    assert any(t.startswith(("B-", "S-")) for s in cs for t in s.tags)
    en = td.load_xabsa("gold-en-train")
    assert sum(len(s.spans) for s in cs) == sum(len(s.spans) for s in en)


def test_xabsa_errors(tmp_path):
    with pytest.raises(UsageError):
        td.load_xabsa("gold-xx-train", data_dir=tmp_path)
    with pytest.raises(MissingError, match="IsakZhang/XABSA"):
        td.load_xabsa("gold-en-train", data_dir=tmp_path)
    (tmp_path / "xabsa" / "rest").mkdir(parents=True)
    (tmp_path / "xabsa" / "rest" / "gold-en-dev.txt").write_text("good\tO\tNIL\nfood\tT-GOOD\tNIL\n\n")
    with pytest.raises(MissingError, match="gold-en-dev.txt:2"):
        td.load_xabsa("gold-en-dev", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Arguments, missing and corrupt local files
# ------------------------------------------------------------------------------------------
def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="allowed are"):
        load_text_task("imdb", "train")
    with pytest.raises(UsageError, match="train, dev, test"):
        load_text_task("rte", "validation")
    with pytest.raises(UsageError, match="auto, local, hub"):
        load_text_task("rte", "dev", source="cloud")
    with pytest.raises(UsageError):
        load_text_task("xnli-xx", "dev")
    assert td.task_splits("mnli") == ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")
    assert td.label_names("xnli-de") == ("entailment", "neutral", "contradiction")
    assert td.label_names("stsb") is None


def test_missing_local_files(tmp_path):
    with pytest.raises(MissingError) as e:
        load_text_task("rte", "dev", data_dir=tmp_path, source="local")
    assert "GLUE RTE" in str(e.value) and str(tmp_path / "glue/RTE/dev.tsv") in str(e.value)
    assert "\n" not in str(e.value)
    # A split that has no local copy at all.
    with pytest.raises(MissingError, match="no local copy"):
        load_text_task("mrpc", "dev", data_dir=tmp_path, source="local")
    # A split that only exists locally (AG News dev) is not looked for on the hub.
    with pytest.raises(MissingError, match="agnews/dev.tsv"):
        load_text_task("ag_news", "dev", data_dir=tmp_path)


def test_corrupt_local_file(tmp_path):
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(MissingError, match=r"dev.tsv:3: unknown label 'maybe'"):
        load_text_task("rte", "dev", data_dir=tmp_path)
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    assert load_text_task("rte", "dev", data_dir=tmp_path) == [Example("a", "b", 0)]


# ------------------------------------------------------------------------------------------
# The hub path without network
# ------------------------------------------------------------------------------------------
HUB_CASES = [
    ("mnli", "train", "nyu-mll/glue", "MultiNLI"),
    ("qqp", "dev", "nyu-mll/glue", "QQP"),
    ("anli", "dev_r2", "facebook/anli", "ANLI"),
    ("xnli-sw", "train", "facebook/xnli", "XNLI"),
    ("ag_news", "train", "fancyzhx/ag_news", "AG News"),
    ("trec", "train", "CogComp/trec", "TREC"),
    ("stsb", "test", "mteb/stsbenchmark-sts", "STS-B"),
    ("sts12", "test", "mteb/sts12-sts", "STS12"),
    ("snli", "train", "stanfordnlp/snli", "SNLI"),
]


@pytest.mark.parametrize("task,split,repo,name", HUB_CASES, ids=[c[0] for c in HUB_CASES])
def test_hub_unreachable_fails_fast(monkeypatch, tmp_path, task, split, repo, name):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(td, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(MissingError) as e:
        load_text_task(task, split, data_dir=tmp_path)  # auto: no local files -> hub
    msg = str(e.value)
    assert time.monotonic() - start < 5
    assert name in msg and repo in msg and "unreachable" in msg and "--data-dir" in msg
    assert "\n" not in msg


def test_wiki1m_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(td, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(MissingError, match="princeton-nlp/datasets-for-simcse.*wiki1m_for_simcse.txt|"
                                           "wiki1m_for_simcse.txt.*princeton-nlp/datasets-for-simcse"):
        td.load_wiki1m(data_dir=tmp_path)
    (tmp_path / "simcse").mkdir()
    (tmp_path / "simcse" / "wiki1m_for_simcse.txt").write_text("first sentence\n\nsecond one\nthird\n")
    assert td.load_wiki1m(data_dir=tmp_path) == ["first sentence", "second one", "third"]
    assert td.load_wiki1m(data_dir=tmp_path, limit=2) == ["first sentence", "second one"]


def test_hub_offline_mode_in_a_script(tmp_path):
    """As a script sees it: HF_HUB_OFFLINE=1, an empty HF cache, cli_errors -> exit code 3,
    one line naming the data set and the hub name, no traceback, no waiting."""
    code = ("from common.utils import cli_errors\n"
            "from common.text_data import load_text_task\n"
            "with cli_errors():\n"
            f"    load_text_task('rte', 'dev', data_dir={str(tmp_path)!r})\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "GLUE RTE dev" in lines[0] and "nyu-mll/glue" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_length_grouped_order_covers_each_example_once_and_groups_by_length():
    import torch

    from common.text_data import length_grouped_order

    lengths = [int(x) for x in torch.randint(3, 200, (1037,), generator=torch.Generator().manual_seed(1))]
    bs = 16
    order = length_grouped_order(lengths, bs, torch.Generator().manual_seed(7), mega_batches=5)
    assert sorted(order) == list(range(len(lengths)))  # every example once per epoch
    # the same generator seed gives the same order (what a resumed run relies on); another seed another order
    assert order == length_grouped_order(lengths, bs, torch.Generator().manual_seed(7), mega_batches=5)
    assert order != length_grouped_order(lengths, bs, torch.Generator().manual_seed(8), mega_batches=5)
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    assert all(len(b) == bs for b in batches[:-1]) and len(batches[-1]) == len(lengths) % bs  # the short one last

    def padded(bs_list):  # tokens in the padded batches
        return sum(len(b) * max(lengths[i] for i in b) for b in bs_list)

    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(7)).tolist()
    random_batches = [perm[i:i + bs] for i in range(0, len(perm), bs)]
    assert padded(batches) < 0.75 * padded(random_batches)
    # the batches are shuffled: the batch lengths do not simply fall within each mega-batch
    firsts = [lengths[b[0]] for b in batches[:-1]]
    assert firsts != sorted(firsts, reverse=True)


def test_length_grouped_batches_resume_exactly_from_state():
    """msmo.py's data streams (common.text_data.LengthGroupedBatches, in BatchStreams for checkpoints)."""
    from common.text_data import BatchStreams, LengthGroupedBatches

    lengths = [(i * 37) % 50 + 1 for i in range(101)]
    a = LengthGroupedBatches(lengths, 8, seed=3)
    seen = [a.next() for _ in range(20)]  # crosses a pass boundary (101 items, 8 per batch)
    assert sorted(sum(seen[:13], [])[:101]) == list(range(101))  # the first pass: each item once
    b = LengthGroupedBatches(lengths, 8, seed=3)
    for _ in range(7):
        b.next()
    c = LengthGroupedBatches(lengths, 8, seed=99)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(13)] == seen[7:]
    d = BatchStreams(ce=LengthGroupedBatches(lengths, 8, seed=5))
    d.load_state_dict(BatchStreams(ce=b).state_dict())
    assert [d["ce"].next() for _ in range(13)] == seen[7:]
