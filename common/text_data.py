"""Text data sets of the papers, as plain Python lists.

Every data set can come from one of two places:

* ``local``: files in the layout of ``../shared/data`` (docs/data.md; ``python -m common.get_data``
  fetches them), read from ``data_dir`` (default: :func:`common.utils.resolve_text_data_dir`:
  $LIS_SHARED_DATA, ./data, ../shared/data). This is what CPU runs and
  the tests use; it has no network dependency.
* ``hub``: the Hugging Face hub through ``datasets.load_dataset`` (paper scale: GLUE,
  MultiNLI, ANLI, XNLI, AG News, TREC, STS, wiki1m). The hub names are listed in
  :data:`HUB_SOURCES`. Without network (or with ``HF_HUB_OFFLINE=1`` and nothing cached)
  these fail at once with a one-line :class:`~common.utils.MissingError` that names the
  data set, the hub name that was tried and how to get it.

Scripts call :func:`load_text_task` for the classification, pair and regression tasks,
:func:`load_sts` / :func:`load_sts_sets` for the STS evaluation sets (per subset, for SimCSE's
"all" aggregation), :func:`load_xabsa` for the XABSA tagging files, :func:`load_senteval_sentences`,
:func:`load_wiki1m` and :func:`load_unlabelled_sentences` for unlabelled English sentences.

Examples are :class:`Example` tuples ``(text_a, text_b, label)``: ``text_b`` is ``None``
for single-sentence tasks; ``label`` is an ``int`` index into ``LABEL_NAMES[task]`` for
classification tasks (``-1`` where the split carries no labels, e.g. GLUE test sets and
the local XNLI test files), or a ``float`` similarity score for the regression tasks
(``stsb``, ``sickr``, ``sts12``-``sts16``: 0-5). Label orders equal those of the hub
copies, so a model trained on one source can be evaluated on the other.
"""

from __future__ import annotations

import csv
import functools
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from common.utils import MissingError, UsageError, resolve_text_data_dir

# ------------------------------------------------------------------------------------------
# Return types and label orders
# ------------------------------------------------------------------------------------------


class Example(NamedTuple):
    """One example: a sentence or a sentence pair and its label.

    ``label`` is an int class index (-1: no label in this split) or, for STS-style tasks,
    a float score in [0, 5].
    """

    text_a: str
    text_b: str | None
    label: int | float


class AbsaSentence(NamedTuple):
    """One XABSA sentence.

    ``tags`` are the raw tags of the file (``O``, ``T-POS``/``T-NEG``/``T-NEU``, or
    ``B-``/``I-``/``E-``/``S-`` + polarity on a few lines); ``spans`` are the aspect terms
    decoded from them by :func:`decode_aspect_spans`: ``(start, end_inclusive, polarity)``
    token indices, polarity one of ``POS``, ``NEG``, ``NEU``.
    """

    tokens: list[str]
    tags: list[str]
    categories: list[str]
    spans: list[tuple[int, int, str]]


NLI_LABELS = ("entailment", "neutral", "contradiction")

XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")

#: Label names per classification task; the label id is the position in the tuple.
#: These are the orders of the hub copies (GLUE, AG News, TREC coarse, ANLI, XNLI, SNLI).
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": NLI_LABELS,
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
    "ag_news": ("World", "Sports", "Business", "Sci/Tech"),
    "trec": ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"),
    "anli": NLI_LABELS,
    "snli": NLI_LABELS,
    "xnli": NLI_LABELS,  # every xnli-XX task
}

#: Tasks whose label is a float similarity score (0-5).
REGRESSION_TASKS = ("stsb", "sickr", "sts12", "sts13", "sts14", "sts15", "sts16")

#: The STS subsets per year, in the SentEval layout (``STS.input.<subset>.txt``).
#: STS13 ``SMT`` is left out: the release has its scores but not its sentences.
STS_SUBSETS: dict[str, tuple[str, ...]] = {
    "sts12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "sts13": ("FNWN", "headlines", "OnWN"),
    "sts14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "sts15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "sts16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}

SOURCES = ("auto", "local", "hub")

_HOW_LOCAL = ("get the offline copies with python -m common.get_data --to DIR and point --data-dir at DIR "
              "(./data is looked for by default; see docs/data.md)")

# ------------------------------------------------------------------------------------------
# Where each (task, split) lives
# ------------------------------------------------------------------------------------------


class HubSource(NamedTuple):
    """A data set on the HF hub: repository, config, and split name per our split name.
    ``columns`` are (text_a, text_b or None, label) column names."""

    repo: str
    config: str | None
    splits: dict[str, tuple[str, ...]]  # our split -> hub split(s), concatenated in order
    columns: tuple[str, str | None, str]


def _glue(config: str, a: str, b: str | None) -> HubSource:
    return HubSource("nyu-mll/glue", config,
                     {"train": ("train",), "dev": ("validation",), "test": ("test",)}, (a, b, "label"))


def _mteb_sts(repo: str, splits: dict[str, tuple[str, ...]]) -> HubSource:
    return HubSource(repo, None, splits, ("sentence1", "sentence2", "score"))


_NLI_COLUMNS = ("premise", "hypothesis", "label")

#: Hub copies: task -> HubSource. GLUE test splits carry label -1. ``stsb`` uses MTEB's copy
#: because GLUE's STS-B test has no scores. ``sickr`` on the hub is MTEB's, which holds all
#: ~9.9k SICK pairs, not the 4,927-pair SemEval test split that SimCSE's SICK-R uses (the
#: local SICK_test_annotated.txt is that split). ``mnli`` train is MultiNLI train (392,702).
#: MTEB's STS text is the original cased, untokenized text; the local SentEval copies are
#: tokenized and lowercased.
HUB_SOURCES: dict[str, HubSource] = {
    "cola": _glue("cola", "sentence", None),
    "sst2": _glue("sst2", "sentence", None),
    "mrpc": _glue("mrpc", "sentence1", "sentence2"),
    "qqp": _glue("qqp", "question1", "question2"),
    "qnli": _glue("qnli", "question", "sentence"),
    "rte": _glue("rte", "sentence1", "sentence2"),
    "wnli": _glue("wnli", "sentence1", "sentence2"),
    "mnli": HubSource("nyu-mll/glue", "mnli", {
        "train": ("train",), "dev_matched": ("validation_matched",),
        "dev_mismatched": ("validation_mismatched",), "test_matched": ("test_matched",),
        "test_mismatched": ("test_mismatched",)}, _NLI_COLUMNS),
    "stsb": _mteb_sts("mteb/stsbenchmark-sts", {"train": ("train",), "dev": ("validation",), "test": ("test",)}),
    "sickr": _mteb_sts("mteb/sickr-sts", {"test": ("test",)}),
    **{y: _mteb_sts(f"mteb/{y}-sts", {"test": ("test",)}) for y in STS_SUBSETS},
    "ag_news": HubSource("fancyzhx/ag_news", None, {"train": ("train",), "test": ("test",)},
                         ("text", None, "label")),
    "trec": HubSource("CogComp/trec", None, {"train": ("train",), "test": ("test",)},
                      ("text", None, "coarse_label")),
    "anli": HubSource("facebook/anli", None, {
        "train": ("train_r1", "train_r2", "train_r3"), "dev": ("dev_r1", "dev_r2", "dev_r3"),
        "test": ("test_r1", "test_r2", "test_r3"),
        **{f"{s}_r{r}": (f"{s}_r{r}",) for s in ("train", "dev", "test") for r in (1, 2, 3)}},
        _NLI_COLUMNS),
    "snli": HubSource("stanfordnlp/snli", None,
                      {"train": ("train",), "dev": ("validation",), "test": ("test",)}, _NLI_COLUMNS),
    **{f"xnli-{lang}": HubSource("facebook/xnli", lang,
                                 {"train": ("train",), "dev": ("validation",), "test": ("test",)},
                                 _NLI_COLUMNS) for lang in XNLI_LANGS},
}

#: Local copies: task -> split -> files under data_dir (all must exist).
LOCAL_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "cola": {"train": ("glue/CoLA/train.tsv", "glue/CoLA/val.tsv"), "dev": ("glue/CoLA/dev.tsv",),
             "test": ("glue/CoLA/test.tsv",)},
    "rte": {"train": ("glue/RTE/train.tsv", "glue/RTE/val.tsv"), "dev": ("glue/RTE/dev.tsv",),
            "test": ("glue/RTE/test.tsv",)},
    "mrpc": {"train": ("senteval_transfer/MRPC/msr_paraphrase_train.txt",),
             "test": ("senteval_transfer/MRPC/msr_paraphrase_test.txt",)},
    "sst2": {s: (f"senteval_transfer/SST/binary/sentiment-{s}",) for s in ("train", "dev", "test")},
    "trec": {"train": ("senteval_transfer/TREC/train_5500.label",),
             "test": ("senteval_transfer/TREC/TREC_10.label",)},
    "ag_news": {"test": ("agnews/test.csv",), "dev": ("agnews/dev.tsv",)},
    "snli": {s: tuple(f"senteval_transfer/SNLI/{f}.{s}" for f in ("s1", "s2", "labels"))
             for s in ("dev", "test")},
    "stsb": {s: (f"sts/STSBenchmark/sts-{s}.csv",) for s in ("train", "dev", "test")},
    "sickr": {"train": ("sick/SICK_train.txt",), "dev": ("sick/SICK_trial.txt",),
              "test": ("sick/SICK_test_annotated.txt",)},
    **{y: {"test": tuple(f"sts/{y.upper()}-en-test/STS.{kind}.{sub}.txt"
                         for sub in subs for kind in ("input", "gs"))}
       for y, subs in STS_SUBSETS.items()},
    **{f"xnli-{lang}": {"dev": (f"xnli/xtreme_format/dev-{lang}.tsv",),
                        "test": (f"xnli/xtreme_format/test-{lang}.tsv",)} for lang in XNLI_LANGS},
}

#: Human-readable names for messages.
_DISPLAY = {"cola": "GLUE CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "GLUE QQP", "mnli": "MultiNLI",
            "qnli": "GLUE QNLI", "rte": "GLUE RTE", "wnli": "GLUE WNLI", "stsb": "STS-B",
            "sickr": "SICK-R", "ag_news": "AG News", "trec": "TREC", "anli": "ANLI", "snli": "SNLI",
            **{y: y.upper() for y in STS_SUBSETS}, **{f"xnli-{lang}": f"XNLI ({lang})" for lang in XNLI_LANGS}}

TASKS: tuple[str, ...] = tuple(sorted(set(HUB_SOURCES) | set(LOCAL_FILES)))


def task_splits(task: str) -> tuple[str, ...]:
    """All split names of `task`, local or hub (train, dev, test first)."""
    _check_task(task)
    names = list(LOCAL_FILES.get(task, {}))
    if task in HUB_SOURCES:
        names += [s for s in HUB_SOURCES[task].splits if s not in names]
    order = {"train": 0, "dev": 1, "test": 2}
    return tuple(sorted(names, key=lambda s: (order.get(s, 3), s)))


def label_names(task: str) -> tuple[str, ...] | None:
    """Label names of a classification task (the id is the position), None for regression."""
    _check_task(task)
    if task in REGRESSION_TASKS:
        return None
    return LABEL_NAMES["xnli" if task.startswith("xnli-") else task]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise UsageError(f"--task {task}: allowed are {', '.join(t for t in TASKS if not t.startswith('xnli-'))}, "
                         f"xnli-LANG with LANG in {', '.join(XNLI_LANGS)}")


# ------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------
def load_text_task(task: str, split: str, data_dir: str | Path | None = None,
                   source: str = "auto") -> list[Example]:
    """Load one split of a classification, pair or regression task as a list of Example.

    task: one of :data:`TASKS` (GLUE: cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli, stsb;
      ag_news, trec, anli, snli, sickr, sts12..sts16, xnli-LANG).
    split: see :func:`task_splits` (train/dev/test; mnli: dev_matched, dev_mismatched,
      test_matched, test_mismatched; anli: train/dev/test = all three rounds, or
      train_r1 .. test_r3 for one round).
    data_dir: folder in the layout of shared/data (default: :func:`resolve_text_data_dir`).
    source: ``local`` (files under data_dir only), ``hub`` (HF hub only) or ``auto``
      (the local files when they are all there, else the hub).

    Label order: ``label_names(task)`` (= :data:`LABEL_NAMES`). Differences between the two
    sources, by design of the copies: local SST-2, MRPC and STS-B test sets are labelled
    while GLUE's hub test sets are not (-1); local MRPC has no dev split (the MSR release:
    train 4,076 / test 1,725); local XNLI test has no labels (-1) while the hub's has; AG
    News local test.csv is lowercased and tokenized (title + description), dev.tsv has the
    raw description only, and the hub's text is raw title + description. For sts12-16 the
    list is the concatenation of the year's subsets (use :func:`load_sts` for them apart).
    """
    _check_task(task)
    if source not in SOURCES:
        raise UsageError(f"--source {source}: allowed are {', '.join(SOURCES)}")
    splits = task_splits(task)
    if split not in splits:
        raise UsageError(f"--split {split}: task {task} has splits {', '.join(splits)}")
    data_dir = resolve_text_data_dir(data_dir)
    local_ok = split in LOCAL_FILES.get(task, {})
    hub_ok = task in HUB_SOURCES and split in HUB_SOURCES[task].splits
    name = f"{_DISPLAY[task]} {split}"

    if source == "local" or (source == "auto" and local_ok and _local_present(task, split, data_dir)):
        if not local_ok:
            raise MissingError(f"{name}: there is no local copy of this split (local splits of {task}: "
                               f"{', '.join(LOCAL_FILES.get(task, {})) or 'none'}); use --source hub on a "
                               "machine with network")
        return _read_local(task, split, data_dir)
    if not hub_ok:
        # auto or hub, and the hub has no such split: only the local files could serve it.
        missing = [str(data_dir / f) for f in LOCAL_FILES[task][split] if not (data_dir / f).exists()]
        raise MissingError(f"{name}: exists only as local files and {missing[0] if missing else data_dir} "
                           f"is missing; {_HOW_LOCAL}")
    return _load_hub_task(task, split)


def load_sts(name: str, split: str = "test", data_dir: str | Path | None = None,
             source: str = "auto") -> dict[str, list[Example]]:
    """An STS evaluation set, per subset: {subset name: [Example(s1, s2, score 0-5)]}.

    name: sts12 .. sts16 (test only), stsb (train/dev/test), sickr (local: train/dev/test,
    dev = SICK_trial; hub: test only). For STS12-16 the local subsets are those of
    :data:`STS_SUBSETS` (pairs with an empty gold score dropped, STS13 SMT skipped); the hub
    copies (MTEB) have no subset column and come back as one subset named "all". STS-B and
    SICK-R come back as one subset named after the split. SimCSE's "all" aggregation is the
    Spearman correlation over the concatenation of a year's subsets.
    Local sizes: STS12 3,108; STS13 1,500; STS14 3,750; STS15 3,000; STS16 1,186; STS-B
    5,749 / 1,500 / 1,379; SICK-R 4,500 / 500 / 4,927.
    """
    if name not in REGRESSION_TASKS:
        raise UsageError(f"--sts {name}: allowed are {', '.join(REGRESSION_TASKS)}")
    if name not in STS_SUBSETS:
        return {split: load_text_task(name, split, data_dir, source)}
    if split != "test":
        raise UsageError(f"--split {split}: {name} has only a test split")
    if source not in SOURCES:
        raise UsageError(f"--source {source}: allowed are {', '.join(SOURCES)}")
    data_dir = resolve_text_data_dir(data_dir)
    if source == "local" or (source == "auto" and _local_present(name, "test", data_dir)):
        return read_sts_year(name, data_dir)
    return {"all": load_text_task(name, "test", data_dir, "hub")}


def sts_sentences(specs: list[tuple[tuple[str, ...], str]], data_dir: str | Path | None = None,
                  source: str = "auto") -> set[str]:
    """Every sentence of the STS sets [(names, split)], all their pairs (uscal.py drops them from its pool)."""
    return {t for names, split in specs for subsets in load_sts_sets(names, split, data_dir, source).values()
            for exs in subsets.values() for e in exs for t in (e.text_a, e.text_b)}


def load_sts_sets(names: tuple[str, ...], split: str = "test", data_dir: str | Path | None = None,
                  source: str = "auto", limit: int | None = None) -> dict[str, dict[str, list[Example]]]:
    """{set name: {subset: [Example(s1, s2, score)]}}: :func:`load_sts` for each name (STS-B dev is
    ``(("stsb",), "dev")``), the first `limit` pairs of each subset when `limit` is given."""
    out = {}
    for name in names:
        subsets = load_sts(name, split, data_dir, source)
        out[name] = {k: (v[:limit] if limit else v) for k, v in subsets.items()}
    return out


# ------------------------------------------------------------------------------------------
# Local files
# ------------------------------------------------------------------------------------------
def _local_present(task: str, split: str, data_dir: Path) -> bool:
    files = LOCAL_FILES.get(task, {}).get(split)
    return bool(files) and all((data_dir / f).exists() for f in files)


def _read_local(task: str, split: str, data_dir: Path) -> list[Example]:
    if task.startswith("xnli-"):
        return read_xnli(task[len("xnli-"):], split, data_dir)
    if task in STS_SUBSETS:
        return [ex for exs in read_sts_year(task, data_dir).values() for ex in exs]
    readers: dict[str, Callable[[str, Path], list[Example]]] = {
        "cola": read_cola, "rte": read_rte, "mrpc": read_mrpc, "sst2": read_sst2, "trec": read_trec,
        "ag_news": read_agnews, "snli": read_snli, "stsb": read_stsb, "sickr": read_sick,
    }
    return readers[task](split, data_dir)


def _need(data_dir: Path, rel: str, what: str) -> Path:
    """The path of a required local file, or a MissingError naming it."""
    path = Path(data_dir) / rel
    if not path.is_file():
        raise MissingError(f"{what}: {path} not found; {_HOW_LOCAL}")
    return path


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file, split on '\\n' only (a few data sets hold other Unicode
    line separators inside sentences), without '\\r' and without the empty string after a
    final newline."""
    with open(path, encoding=encoding, newline="") as fh:
        text = fh.read()
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _read_lines_any(path: Path) -> list[str]:
    """UTF-8 if the file decodes as UTF-8, else Latin-1 (SentEval's files)."""
    try:
        return _read_lines(path, "utf-8")
    except UnicodeDecodeError:
        return _read_lines(path, "latin-1")


def _corrupt(path: Path, lineno: int, what: str) -> MissingError:
    return MissingError(f"{path}:{lineno}: {what} (corrupt or not the expected format; see docs/data.md; "
                        "python -m common.get_data --to DIR fetches a verified copy)")


def _label_id(task: str, name: str, path: Path, lineno: int) -> int:
    names = LABEL_NAMES[task]
    if name not in names:
        raise _corrupt(path, lineno, f"unknown label {name!r} (expected one of {', '.join(names)})")
    return names.index(name)


def read_xnli(lang: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """XNLI 1.0 (XTREME export) for one language: (premise, hypothesis, label).

    dev: 2,490 labelled pairs (830 per class); test: 5,010 pairs without labels (label -1).
    Files ``xnli/xtreme_format/{dev,test}-LANG.tsv``; parallel across languages line by line.
    Label order: entailment, neutral, contradiction.
    """
    if lang not in XNLI_LANGS:
        raise UsageError(f"--lang {lang}: allowed are {', '.join(XNLI_LANGS)}")
    if split not in ("dev", "test"):
        raise UsageError(f"--split {split}: local XNLI has dev and test")
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, f"xnli/xtreme_format/{split}-{lang}.tsv", f"XNLI {split} ({lang})")
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        parts = line.split("\t")
        if split == "dev" and len(parts) == 3:
            out.append(Example(parts[0], parts[1], _label_id("xnli", parts[2], path, i)))
        elif split == "test" and len(parts) == 2:
            out.append(Example(parts[0], parts[1], -1))
        else:
            raise _corrupt(path, i, f"{len(parts)} tab-separated fields")
    return out


def read_snli(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """SNLI dev/test in the SentEval layout (s1.X, s2.X, labels.X): 9,842 / 9,824 pairs.
    Label order: entailment, neutral, contradiction."""
    data_dir = resolve_text_data_dir(data_dir)
    paths = [_need(data_dir, f, f"SNLI {split}") for f in LOCAL_FILES["snli"][split]]
    s1, s2, labels = (_read_lines(p) for p in paths)
    if not len(s1) == len(s2) == len(labels):
        raise _corrupt(paths[2], len(labels), f"s1/s2/labels have {len(s1)}/{len(s2)}/{len(labels)} lines")
    # SentEval's sentences end with a space; strip it.
    return [Example(a.strip(), b.strip(), _label_id("snli", y.strip(), paths[2], i + 1))
            for i, (a, b, y) in enumerate(zip(s1, s2, labels))]


def read_sts_year(name: str, data_dir: str | Path | None = None) -> dict[str, list[Example]]:
    """One STS year (sts12 .. sts16) in the SentEval layout, per subset.

    ``STS.input.<subset>.txt`` holds ``s1<TAB>s2`` (tokenized, lowercased) and
    ``STS.gs.<subset>.txt`` one score 0-5 per line; pairs with an empty score are dropped
    (STS15/16 ship many). STS13 SMT has no input file and is skipped.
    """
    data_dir = resolve_text_data_dir(data_dir)
    folder = f"sts/{name.upper()}-en-test"
    out: dict[str, list[Example]] = {}
    for sub in STS_SUBSETS[name]:
        inp = _need(data_dir, f"{folder}/STS.input.{sub}.txt", f"{name.upper()} {sub}")
        gs = _need(data_dir, f"{folder}/STS.gs.{sub}.txt", f"{name.upper()} {sub}")
        pairs, scores = _read_lines(inp), _read_lines(gs)
        if len(pairs) != len(scores):
            raise _corrupt(gs, len(scores), f"{len(scores)} scores for {len(pairs)} input lines")
        rows = []
        for i, (pair, score) in enumerate(zip(pairs, scores), 1):
            if score.strip() == "":
                continue
            parts = pair.split("\t")
            if len(parts) != 2:
                raise _corrupt(inp, i, f"{len(parts)} tab-separated fields")
            rows.append(Example(parts[0], parts[1], _float(score, gs, i)))
        out[sub] = rows
    return out


def _float(text: str, path: Path, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise _corrupt(path, lineno, f"not a number: {text!r}") from None


def read_stsb(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """STS-Benchmark (SentEval layout, tokenized): train 5,749 / dev 1,500 / test 1,379.
    Columns: genre, file, year, id, score (0-5), s1, s2."""
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, LOCAL_FILES["stsb"][split][0], f"STS-B {split}")
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        parts = line.split("\t")
        if len(parts) < 7:
            raise _corrupt(path, i, f"{len(parts)} tab-separated fields")
        out.append(Example(parts[5], parts[6], _float(parts[4], path, i)))
    return out


def read_sick(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """SICK relatedness (SICK-R): train 4,500 / dev (= trial) 500 / test 4,927 (SimCSE's SICK-R
    test). Header pair_ID, sentence_A, sentence_B, relatedness_score, entailment_judgment."""
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, LOCAL_FILES["sickr"][split][0], f"SICK {split}")
    lines = _read_lines(path)
    if not lines or not lines[0].startswith("pair_ID"):
        raise _corrupt(path, 1, "no pair_ID header")
    out = []
    for i, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != 5:
            raise _corrupt(path, i, f"{len(parts)} tab-separated fields")
        out.append(Example(parts[1], parts[2], _float(parts[3], path, i)))
    return out


def read_sick_nli(data_dir: str | Path | None = None) -> list[Example]:
    """SICK as 3-way NLI (conlst.py --source-add sick): every pair of SICK.txt (train, trial and test,
    9,840), label = entailment_label (ENTAILMENT, NEUTRAL, CONTRADICTION -> 0, 1, 2: XNLI's order)."""
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, "sick/SICK.txt", "SICK (SICK.txt)")
    lines = _read_lines(path)
    head = lines[0].split("\t") if lines else []
    if "entailment_label" not in head:
        raise _corrupt(path, 1, "no entailment_label column in the header")
    a, b, y = head.index("sentence_A"), head.index("sentence_B"), head.index("entailment_label")
    out = []
    for i, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != len(head):
            raise _corrupt(path, i, f"{len(parts)} tab-separated fields")
        out.append(Example(parts[a], parts[b], _label_id("snli", parts[y].lower(), path, i)))
    return out


def read_rte(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """GLUE RTE: train (train.tsv + val.tsv) 2,490 / dev 277 / test 3,000 (label -1).
    Label order: entailment, not_entailment."""
    data_dir = resolve_text_data_dir(data_dir)
    out = []
    for rel in LOCAL_FILES["rte"][split]:
        path = _need(data_dir, rel, f"GLUE RTE {split}")
        for i, line in enumerate(_read_lines(path), 1):
            parts = line.split("\t")
            if parts[0] == "index":  # header (train.tsv, dev.tsv, test.tsv; val.tsv has none)
                continue
            if split == "test" and len(parts) == 3:
                out.append(Example(parts[1], parts[2], -1))
            elif split != "test" and len(parts) == 4:
                out.append(Example(parts[1], parts[2], _label_id("rte", parts[3], path, i)))
            else:
                raise _corrupt(path, i, f"{len(parts)} tab-separated fields")
    return out


def read_cola(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """GLUE CoLA: train (train.tsv + val.tsv) 8,551 / dev 1,043 / test 1,063 (label -1).
    Rows: source, label (0/1), original mark, sentence. Label order: unacceptable, acceptable."""
    data_dir = resolve_text_data_dir(data_dir)
    out = []
    for rel in LOCAL_FILES["cola"][split]:
        path = _need(data_dir, rel, f"GLUE CoLA {split}")
        for i, line in enumerate(_read_lines(path), 1):
            parts = line.split("\t")
            if split == "test":
                if parts[0] == "index":  # header of test.tsv: index, sentence
                    continue
                if len(parts) != 2:
                    raise _corrupt(path, i, f"{len(parts)} tab-separated fields")
                out.append(Example(parts[1], None, -1))
                continue
            if len(parts) != 4 or parts[1] not in ("0", "1"):
                raise _corrupt(path, i, "expected source, 0/1 label, mark, sentence")
            out.append(Example(parts[3], None, int(parts[1])))
    return out


def read_mrpc(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """MRPC, the original MSR release: train 4,076 / test 1,725 (both labelled; no dev: GLUE's
    dev is carved out of this train set). UTF-8 with a BOM and a header. Label order:
    not_equivalent (0), equivalent (1) = the file's Quality column."""
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, LOCAL_FILES["mrpc"][split][0], f"MRPC {split}")
    lines = _read_lines(path, "utf-8-sig")
    if not lines or not lines[0].startswith("Quality"):
        raise _corrupt(path, 1, "no Quality header")
    out = []
    for i, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != 5 or parts[0] not in ("0", "1"):
            raise _corrupt(path, i, "expected Quality, #1 ID, #2 ID, #1 String, #2 String")
        out.append(Example(parts[3], parts[4], int(parts[0])))
    return out


def read_sst2(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """SST-2 (SentEval binary): train 67,349 / dev 872 / test 1,821, all labelled.
    ``sentence<TAB>label``; text is tokenized and lowercased. Label order: negative, positive."""
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, LOCAL_FILES["sst2"][split][0], f"SST-2 {split}")
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        text, sep, label = line.rpartition("\t")
        if not sep or label not in ("0", "1"):
            raise _corrupt(path, i, "expected sentence<TAB>0/1")
        out.append(Example(text.strip(), None, int(label)))
    return out


def read_trec(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """TREC question classification, coarse labels: train 5,452 / test 500.
    Lines ``COARSE:fine question`` (tokenized; Latin-1). Label order: ABBR, ENTY, DESC, HUM,
    LOC, NUM (the hub's coarse_label order)."""
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, LOCAL_FILES["trec"][split][0], f"TREC {split}")
    out = []
    for i, line in enumerate(_read_lines(path, "latin-1"), 1):
        label, _, text = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if ":" not in label or not text.strip():
            raise _corrupt(path, i, "expected COARSE:fine question")
        out.append(Example(text.strip(), None, _label_id("trec", coarse, path, i)))
    return out


def read_agnews(split: str, data_dir: str | Path | None = None) -> list[Example]:
    """AG News, local copies: test = ``agnews/test.csv`` (7,600, 1,900 per class; header
    text,label; lowercased and tokenized, title + " , " + description); dev =
    ``agnews/dev.tsv`` (ALPS export of 10,001 rows held out of train: raw description and
    class name). Label order: World, Sports, Business, Sci/Tech."""
    data_dir = resolve_text_data_dir(data_dir)
    path = _need(data_dir, LOCAL_FILES["ag_news"][split][0], f"AG News {split}")
    out = []
    if split == "test":
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or rows[0] != ["text", "label"]:
            raise _corrupt(path, 1, "no text,label header")
        for i, row in enumerate(rows[1:], 2):
            if len(row) != 2 or row[1] not in ("0", "1", "2", "3"):
                raise _corrupt(path, i, "expected text,label with label 0-3")
            out.append(Example(row[0], None, int(row[1])))
        return out
    for i, line in enumerate(_read_lines(path), 1):
        text, sep, name = line.rpartition("\t")
        if not sep:
            raise _corrupt(path, i, "expected description<TAB>class name")
        out.append(Example(text, None, _label_id("ag_news", name, path, i)))
    return out


#: SentEval transfer sets with unlabelled English sentences: name -> files.
SENTEVAL_SENTENCE_FILES: dict[str, tuple[str, ...]] = {
    "MR": ("senteval_transfer/MR/rt-polarity.pos", "senteval_transfer/MR/rt-polarity.neg"),
    "CR": ("senteval_transfer/CR/custrev.pos", "senteval_transfer/CR/custrev.neg"),
    "SUBJ": ("senteval_transfer/SUBJ/subj.objective", "senteval_transfer/SUBJ/subj.subjective"),
    "MPQA": ("senteval_transfer/MPQA/mpqa.pos", "senteval_transfer/MPQA/mpqa.neg"),
}


def load_senteval_sentences(names: tuple[str, ...] | list[str] = ("MR", "CR", "SUBJ", "MPQA"),
                            data_dir: str | Path | None = None) -> list[str]:
    """Unlabelled English sentences from SentEval's MR, CR, SUBJ and MPQA files (tokenized,
    lowercased), in file order, empty lines dropped: MR 10,662, CR 3,771, SUBJ 10,000,
    MPQA 10,603 sentences. For unsupervised (SimCSE-style) training at CPU scale."""
    data_dir = resolve_text_data_dir(data_dir)
    out: list[str] = []
    for name in names:
        if name not in SENTEVAL_SENTENCE_FILES:
            raise UsageError(f"--sentences {name}: allowed are {', '.join(SENTEVAL_SENTENCE_FILES)}")
        for rel in SENTEVAL_SENTENCE_FILES[name]:
            out.extend(line.strip() for line in _read_lines_any(_need(data_dir, rel, f"SentEval {name}"))
                       if line.strip())
    return out


# ------------------------------------------------------------------------------------------
# XABSA
# ------------------------------------------------------------------------------------------
XABSA_LANGS = ("en", "es", "fr", "nl", "ru", "tr")
XABSA_TARGETS = ("es", "fr", "nl", "ru")  # languages with translated and code-switched train
XABSA_FILES: tuple[str, ...] = (
    tuple(f"gold-{lang}-{s}" for lang in XABSA_LANGS for s in ("train", "dev", "test"))
    + tuple(f"smt-{lang}-train" for lang in XABSA_TARGETS)
    + tuple(f"cs_en-{lang}-train" for lang in XABSA_TARGETS)
    + tuple(f"cs_{lang}-en-train" for lang in XABSA_TARGETS))
POLARITIES = ("POS", "NEG", "NEU")
_XABSA_TAGS = {"O"} | {f"{p}-{pol}" for p in "TBIES" for pol in POLARITIES}


def decode_aspect_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """Aspect spans (start, end_inclusive, polarity) from one sentence's tags.

    Two tag styles, which may not be mixed inside one aspect:
    - ``T-POS`` / ``T-NEG`` / ``T-NEU`` (XABSA): a maximal run of the same T-tag is one
      aspect; a run of a different T-tag right after it starts a new aspect.
    - BIEOS: ``S-x`` is a one-token aspect; ``B-x`` (``I-x`` ...) ``E-x`` a longer one.
      Strict decoding: an aspect is kept only when it is closed by ``E``; an ``I``/``E``
      without an open ``B``, and a ``B`` left open (by ``O``, ``S``, ``B``, ``T`` or the end)
      are dropped; an aspect whose tokens disagree on polarity is dropped.
    ``O`` is outside. Any other tag raises ValueError.
    """
    spans: list[tuple[int, int, str]] = []
    t_start, t_pol = -1, ""  # the open T-run
    b_start, b_pols = -1, []  # the open B ... E aspect
    for i, tag in enumerate(tags):
        if tag not in _XABSA_TAGS:
            raise ValueError(f"unknown aspect tag {tag!r} at token {i}")
        kind, _, pol = tag.partition("-")
        # A T-run ends at any tag other than the same T-tag.
        if t_start >= 0 and tag != f"T-{t_pol}":
            spans.append((t_start, i - 1, t_pol))
            t_start = -1
        if kind == "T":
            b_start = -1  # an open B-aspect is broken
            if t_start < 0:
                t_start, t_pol = i, pol
        elif kind == "S":
            b_start = -1
            spans.append((i, i, pol))
        elif kind == "B":
            b_start, b_pols = i, [pol]
        elif kind in ("I", "E") and b_start >= 0:
            b_pols.append(pol)
            if kind == "E":
                if len(set(b_pols)) == 1:
                    spans.append((b_start, i, pol))
                b_start = -1
        elif kind == "O":
            b_start = -1
    if t_start >= 0:
        spans.append((t_start, len(tags) - 1, t_pol))
    return spans


def load_xabsa(name: str, data_dir: str | Path | None = None, domain: str = "rest") -> list[AbsaSentence]:
    """One XABSA file (SemEval-2016 restaurants) as a list of AbsaSentence.

    name: one of :data:`XABSA_FILES`: ``gold-LANG-{train,dev,test}`` (LANG in en, es, fr, nl,
    ru, tr; English 1,600 / 400 / 676 sentences), ``smt-LANG-train`` (machine-translated
    English train with projected labels), ``cs_en-LANG-train`` (target-language sentence with
    English aspect terms), ``cs_LANG-en-train`` (English sentence with target aspect terms).
    File ``xabsa/<domain>/<name>.txt``: ``token<TAB>tag<TAB>category`` per line, a blank line
    between sentences. Source: github.com/IsakZhang/XABSA, data/rest.
    """
    if name not in XABSA_FILES:
        raise UsageError(f"--xabsa-file {name}: allowed are gold-LANG-{{train,dev,test}} (LANG in "
                         f"{', '.join(XABSA_LANGS)}), smt-LANG-train, cs_en-LANG-train, cs_LANG-en-train "
                         f"(LANG in {', '.join(XABSA_TARGETS)})")
    data_dir = resolve_text_data_dir(data_dir)
    path = Path(data_dir) / "xabsa" / domain / f"{name}.txt"
    if not path.is_file():
        raise MissingError(f"XABSA {name}: {path} not found; get data/{domain}/{name}.txt from "
                           f"github.com/IsakZhang/XABSA, or {_HOW_LOCAL}")
    sentences: list[AbsaSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    cats: list[str] = []

    def flush() -> None:
        if tokens:
            sentences.append(AbsaSentence(list(tokens), list(tags), list(cats), decode_aspect_spans(tags)))
            tokens.clear()
            tags.clear()
            cats.clear()

    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            flush()
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[1] not in _XABSA_TAGS:
            raise _corrupt(path, i, "expected token<TAB>tag<TAB>category with tag O, T-x or B/I/E/S-x")
        tokens.append(parts[0])
        tags.append(parts[1])
        cats.append(parts[2])
    flush()
    return sentences


# ------------------------------------------------------------------------------------------
# XABSA tags, the span metric and code-switched alignment (msmo.py)
# ------------------------------------------------------------------------------------------
def tag_list(scheme: str) -> list[str]:
    """O, then per polarity B, I, E, S (bieos: 13 tags) or B, I (bio: 7 tags)."""
    prefixes = "BIES" if scheme == "bieos" else "BI"
    return ["O"] + [f"{p}-{pol}" for pol in POLARITIES for p in prefixes]


def spans_to_tags(spans: list[tuple[int, int, str]], n_words: int, scheme: str) -> list[str]:
    """Word tags of a sentence from its aspect spans (start, end_inclusive, polarity)."""
    tags = ["O"] * n_words
    for b, e, pol in spans:
        if scheme == "bieos" and b == e:
            tags[b] = f"S-{pol}"
            continue
        tags[b] = f"B-{pol}"
        for k in range(b + 1, e + 1):
            tags[k] = f"I-{pol}"
        if scheme == "bieos":
            tags[e] = f"E-{pol}"
    return tags


def decode_bio(tags: list[str]) -> list[tuple[int, int, str]]:
    """Spans from BIO tags: B-x starts an aspect, I-x continue it; it ends at O, B or the end. An I
    without an open aspect is dropped; an aspect whose tokens disagree on polarity is dropped."""
    spans, start, pols = [], -1, []
    for i, tag in enumerate(list(tags) + ["O"]):
        kind, _, pol = tag.partition("-")
        if kind == "I" and start >= 0:
            pols.append(pol)
            continue
        if start >= 0:
            if len(set(pols)) == 1:
                spans.append((start, i - 1, pols[0]))
            start = -1
        if kind == "B":
            start, pols = i, [pol]
    return spans


def tags_to_spans(tags: list[str], scheme: str) -> list[tuple[int, int, str]]:
    """Aspect spans from word tags, strictly (decode_aspect_spans for bieos, decode_bio for bio)."""
    return decode_aspect_spans(tags) if scheme == "bieos" else decode_bio(tags)


def span_f1(gold_tags: list[list[str]], pred_tags: list[list[str]], scheme: str) -> float:
    """Micro-F1 (in %) over exact (begin, end, polarity) aspects, by seqeval in strict mode: IOBES
    for bieos (the same aspects as decode_aspect_spans: B ... E or S, mixed polarity dropped). bio:
    the predicted tags are first read by decode_bio, which drops an aspect whose polarity changes
    inside it where seqeval's strict IOB2 keeps its first part (docs/msmo.md, "Metric")."""
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2, IOBES

    if len(gold_tags) != len(pred_tags):
        raise ValueError(f"{len(gold_tags)} gold sentences but {len(pred_tags)} predictions")
    if scheme == "bio":
        pred_tags = [spans_to_tags(decode_bio(t), len(t), "bio") for t in pred_tags]
    f1 = f1_score([list(t) for t in gold_tags], [list(t) for t in pred_tags], mode="strict",
                  scheme=IOBES if scheme == "bieos" else IOB2, zero_division=0)
    return 100 * float(f1)


def decode_xabsa(tags: list[str]) -> list[tuple[int, int, str]]:
    """Aspect spans as XABSA's official metric reads BIEOS tags (its seq_utils.tag2absa, re-derived):
    lenient and stateful where decode_aspect_spans is strict. B-x opens a span (its polarity list
    becomes [x]); O and I do not close it (I adds its polarity); E-x closes it when every polarity
    since that B is x, giving (B, E, x), and otherwise changes nothing; S-x gives (i, i, x) and empties
    the polarity list but leaves an open B open. So `B O E` is an aspect, `B S E` gives the S and
    the B...E aspect, and a stale B can be closed much later. T tags are not read (O)."""
    spans: list[tuple[int, int, str]] = []
    beg, pols = -1, []
    for i, tag in enumerate(tags):
        kind, _, pol = tag.partition("-")
        if kind not in "BIES" or not pol:
            continue
        pols.append(pol)
        if kind == "S":
            spans.append((i, i, pol))
            pols = []
        elif kind == "B":
            beg, pols = i, [pol]
        elif kind == "E" and beg >= 0 and len(set(pols)) == 1:
            spans.append((beg, i, pol))
            beg, pols = -1, []
    return spans


def bio_as_xabsa_bieos(tags: list[str]) -> list[str]:
    """XABSA's reading of BIO tags (bio2ot, then ot2bieos): every B-x / I-x is an aspect word, a maximal
    run of them (whatever their polarities) becomes S, or B I ... E, each word keeping its polarity;
    so `B-x B-x` is one aspect."""
    inside = [t != "O" for t in tags] + [False]
    out = []
    for i, tag in enumerate(tags):
        if not inside[i]:
            out.append("O")
            continue
        start, last = i == 0 or not inside[i - 1], not inside[i + 1]
        kind = ("S" if last else "B") if start else ("E" if last else "I")
        out.append(f"{kind}-{tag.partition('-')[2]}")
    return out


XABSA_SMOOTHING = 1e-4  #: XABSA's SMALL_POSITIVE_CONST, added to every denominator of P, R and F1


def xabsa_span_f1(gold_tags: list[list[str]], pred_tags: list[list[str]], scheme: str) -> float:
    """Micro-F1 (in %) as XABSA's official metric computes it (seq_utils.compute_metrics_absa): gold and
    predicted tags both read by decode_xabsa (BIO first by bio_as_xabsa_bieos), a hit is a predicted
    (begin, end, polarity) among the gold ones, P = hits / (predicted + 1e-4), R = hits / (gold + 1e-4),
    F1 = 2PR / (P + R + 1e-4). The caller drops the words cut off by truncation from both sides, as
    XABSA scores only labelled positions."""
    if len(gold_tags) != len(pred_tags):
        raise ValueError(f"{len(gold_tags)} gold sentences but {len(pred_tags)} predictions")
    hits = n_gold = n_pred = 0
    for gold, pred in zip(gold_tags, pred_tags):
        if scheme == "bio":
            gold, pred = bio_as_xabsa_bieos(gold), bio_as_xabsa_bieos(pred)
        g, p = decode_xabsa(gold), decode_xabsa(pred)
        hits, n_gold, n_pred = hits + sum(t in g for t in p), n_gold + len(g), n_pred + len(p)
    precision, recall = hits / (n_pred + XABSA_SMOOTHING), hits / (n_gold + XABSA_SMOOTHING)
    return 100 * 2 * precision * recall / (precision + recall + XABSA_SMOOTHING)


def word_tags_f1(gold_tags: list[list[str]], pred_tags: list[list[str]], scheme: str, metric: str) -> float:
    """msmo.py --metric: span F1 (in %) of predicted word tags that may stop short of the gold ones (the
    words cut off by truncation). xabsa: xabsa_span_f1 on the predicted words (a word cut off leaves the
    gold too, as in XABSA); seqeval: span_f1, a word cut off predicted O (a miss)."""
    if metric == "seqeval":
        return span_f1(gold_tags, [list(p) + ["O"] * (len(g) - len(p)) for g, p in zip(gold_tags, pred_tags)], scheme)
    return xabsa_span_f1([g[: len(p)] for g, p in zip(gold_tags, pred_tags)], pred_tags, scheme)


def aspect_skeleton(s: AbsaSentence) -> tuple[str, ...]:
    """The sentence with each aspect replaced by a marker carrying its polarity: equal for a
    sentence and its code-switched version (only the aspect terms differ)."""
    starts = {b: (e, pol) for b, e, pol in s.spans}
    out, i = [], 0
    while i < len(s.tokens):
        if i in starts:
            e, pol = starts[i]
            out.append(f"\x00ASPECT-{pol}")
            i = e + 1
        else:
            out.append(s.tokens[i])
            i += 1
    return tuple(out)


def align_codeswitched(originals: list[AbsaSentence],
                       switched: list[AbsaSentence]) -> tuple[list[tuple[int, int]], dict]:
    """Match each code-switched sentence to the sentence it was made from, by content.

    The XABSA files are not parallel line by line, so sentence i of one file is not sentence i of
    the other. A code-switched sentence equals its source outside the aspect terms; candidates are
    the unused sources with the same aspect_skeleton. One candidate: a pair. Several whose aspect
    texts agree: the first (pairing any of them gives the same aspects). Several that differ: left
    out (ambiguous). Returns ([(original index, switched index)], counts).
    """
    by_key: dict[tuple, list[int]] = {}
    for i, s in enumerate(originals):
        by_key.setdefault(aspect_skeleton(s), []).append(i)
    used: set[int] = set()
    pairs, n_ambiguous, n_unmatched = [], 0, 0
    for j, s in enumerate(switched):
        cands = [i for i in by_key.get(aspect_skeleton(s), []) if i not in used]
        if not cands:
            n_unmatched += 1
            continue
        texts = {tuple(" ".join(originals[i].tokens[b:e + 1]) for b, e, _ in originals[i].spans) for i in cands}
        if len(cands) > 1 and len(texts) > 1:
            n_ambiguous += 1
            continue
        used.add(cands[0])
        pairs.append((cands[0], j))
    return pairs, {"pairs": len(pairs), "ambiguous": n_ambiguous, "unmatched": n_unmatched}


class EncodedSentence(NamedTuple):
    """One sentence for a token tagger: sub-token ids, the position of each word's first sub-token
    (-1 when truncation cut it off), and tag ids at first sub-tokens (-100 elsewhere) [xabsa]."""

    input_ids: list[int]
    first: list[int]
    labels: list[int]


class AlignedPair(NamedTuple):
    """Two encoded sentences whose aspects align one to one: per aspect, the token positions of its
    words on side a and on side b."""

    a: EncodedSentence
    b: EncodedSentence
    aspects: list[tuple[list[int], list[int]]]


def encode_tagged(tokenizer, sentences: list[AbsaSentence], scheme: str, max_len: int,
                  bare_space: bool = False) -> list[EncodedSentence]:
    """Tokenize pre-split words (no prefix), label the first sub-token of each word. bare_space: a word
    whose first piece is the bare SentencePiece "\u2581" (XLM-R / e5-small split e.g. "," into "\u2581" ",")
    is labelled at its next piece, as XABSA's fix_space_issue does (not when "\u2581" is all that is left
    of it); a tokenizer without that piece (WordPiece) is unaffected."""
    index = {t: i for i, t in enumerate(tag_list(scheme))}
    space = tokenizer.convert_tokens_to_ids("\u2581") if bare_space else None
    space = None if space == tokenizer.unk_token_id else space
    out = []
    for lo in range(0, len(sentences), 512):
        chunk = sentences[lo:lo + 512]
        enc = tokenizer([s.tokens for s in chunk], is_split_into_words=True, truncation=True, max_length=max_len)
        for k, s in enumerate(chunk):
            ids = list(enc["input_ids"][k])
            first = [-1] * len(s.tokens)
            for pos, w in enumerate(enc.word_ids(k)):
                if w is not None and first[w] < 0:
                    first[w] = pos
                elif w is not None and first[w] == pos - 1 and ids[pos - 1] == space:  # past the bare piece
                    first[w] = pos
            labels = [-100] * len(ids)
            for w, tag in enumerate(spans_to_tags(s.spans, len(s.tokens), scheme)):
                if first[w] >= 0:
                    labels[first[w]] = index[tag]
            out.append(EncodedSentence(ids, first, labels))
    return out


def aligned_pairs(orig: list[AbsaSentence], orig_enc: list[EncodedSentence], sw: list[AbsaSentence],
                  sw_enc: list[EncodedSentence]) -> tuple[list[AlignedPair], dict]:
    """Aligned sentence pairs (align_codeswitched) with at least one aspect, the k-th aspect of each
    side aligned; a pair with an aspect cut off by truncation on either side is skipped."""
    matches, stats = align_codeswitched(orig, sw)
    out, truncated = [], 0
    for i, j in matches:
        if not orig[i].spans:
            continue
        aspects = []
        for (b1, e1, _), (b2, e2, _) in zip(orig[i].spans, sw[j].spans):
            pa = [orig_enc[i].first[w] for w in range(b1, e1 + 1)]
            pb = [sw_enc[j].first[w] for w in range(b2, e2 + 1)]
            aspects.append((pa, pb))
        if any(p < 0 for pa, pb in aspects for p in pa + pb):
            truncated += 1
            continue
        out.append(AlignedPair(orig_enc[i], sw_enc[j], aspects))
    return out, {**stats, "with_aspects": len(out), "truncated": truncated}


def tagging_batch(items: list[EncodedSentence], pad_id: int, device, sides: list[int] | None = None,
                  pairs: list[AlignedPair] = ()) -> dict:
    """A padded batch of sentences on `device`: input_ids, attention_mask, labels [B, T] and side [B]
    (an int per sentence, -1 by default; msmo.py: the critic side). With `pairs`, batch["pairs"] holds
    both sides of each pair (rows 2k and 2k+1, padded apart from the other rows so they do not
    lengthen them) and aspects: [(row_a, positions_a, row_b, positions_b)] per aligned aspect; else
    batch["pairs"] is None."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    def pad(rows: list[list[int]], value: int):
        return pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=value).to(device)

    ids = [it.input_ids for it in items]
    batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(r) for r in ids], 0),
             "labels": pad([it.labels for it in items], -100),
             "side": torch.tensor(list(sides) if sides is not None else [-1] * len(items), device=device),
             "pairs": None}
    if pairs:
        rows = [r for p in pairs for r in (p.a.input_ids, p.b.input_ids)]
        batch["pairs"] = {"input_ids": pad(rows, pad_id), "attention_mask": pad([[1] * len(r) for r in rows], 0),
                          "aspects": [(2 * k, pa, 2 * k + 1, pb) for k, p in enumerate(pairs) for pa, pb in p.aspects]}
    return batch


def load_xabsa_first(name: str, limit: int | None, data_dir: str | Path | None = None, domain: str = "rest",
                     record: dict | None = None) -> list[AbsaSentence]:
    """The first `limit` sentences of one XABSA file (all when None); `record[name]`, when given,
    says how many (a run saves it as data_subsets.json). A missing domain folder is a UsageError."""
    xabsa = resolve_text_data_dir(data_dir) / "xabsa"
    if xabsa.is_dir() and not (xabsa / domain).is_dir():
        raise UsageError(f"--domain {domain}: allowed are "
                         f"{', '.join(sorted(d.name for d in xabsa.iterdir() if d.is_dir()))} (folders of {xabsa})")
    sents = load_xabsa(name, data_dir, domain)
    if record is not None:
        record[name] = {"n_all": len(sents), "first": min(len(sents), limit or len(sents))}
    return sents[:limit] if limit else sents


class LengthGroupedBatches:
    """Endless length-grouped batches of indices into a pool (`lengths`: tokens per item): a new
    order per pass (:func:`length_grouped_order`), drawn from this object's own generator, whose
    state goes into checkpoints (`state_dict`), so a resumed run sees the same data."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        import torch

        self.lengths, self.batch_size = lengths, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm: list[int] = []
        self.pos = 0

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.perm):
                self.perm, self.pos = length_grouped_order(self.lengths, self.batch_size, self.gen), 0
            take = self.perm[self.pos: self.pos + self.batch_size - len(out)]
            out += take
            self.pos += len(take)
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"], state["pos"]


class BatchStreams(dict):
    """Named LengthGroupedBatches with one state dict for a checkpoint (common.run.Run.save)."""

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.items():
            s.load_state_dict(state[k])


# ------------------------------------------------------------------------------------------
# msmo.py's data: the ACS mixture (XABSA files per role), the critic sides, the aligned pairs
# ------------------------------------------------------------------------------------------
#: The XABSA files a method trains on: role -> file name pattern.
ACS_ROLE_FILES = {"en": "gold-en-train", "smt": "smt-{lang}-train", "cs_tgt_ctx": "cs_en-{lang}-train",
                  "cs_en_ctx": "cs_{lang}-en-train", "gold_tgt": "gold-{lang}-train"}
#: Critic side of each ACS file: 0 source (English context), 1 target (target-language context).
ACS_ROLE_SIDE = {"en": 0, "cs_en_ctx": 0, "smt": 1, "cs_tgt_ctx": 1}
#: The files each method's tagging CE trains on: the "four mixed datasets" of ACS [summary, xabsa].
ACS_METHOD_ROLES = {"zero_shot": ["en"], "acs": ["en", "smt", "cs_tgt_ctx", "cs_en_ctx"],
                    "msmo": ["en", "smt", "cs_tgt_ctx", "cs_en_ctx"], "supervised": ["gold_tgt"], "distill": []}


def acs_training_roles(args: Any) -> list[str]:
    """The method's files, and gold-XX-train for the student (its text, unlabeled) when distilling."""
    student = ["gold_tgt"] if args.method == "distill" or args.distill else []
    return list(dict.fromkeys(ACS_METHOD_ROLES[args.method] + student))


def load_acs_data(args: Any, record: dict | None = None) -> dict:
    """All sentences a msmo.py run needs, as AbsaSentence lists (limits applied). `record`, when
    given, receives the sentences used of each file (the first N; saved as data_subsets.json)."""
    files: dict[str, dict] = {}

    def load(name: str, limit: int | None) -> list[AbsaSentence]:
        return load_xabsa_first(name, limit, args.data_dir or None, args.domain, files)

    train = {role: load(ACS_ROLE_FILES[role].format(lang=args.lang), args.limit_train)
             for role in acs_training_roles(args)}
    target = args.select_dev == "target" or (args.select_dev == "auto" and args.method == "supervised")
    dev_lang = args.lang if target else "en"  # selection on English dev, supervised on target dev [repo]
    dev = load(f"gold-{dev_lang}-dev", args.limit_eval)
    tests = {lang: load(f"gold-{lang}-test", args.limit_eval) for lang in args.eval_langs or [args.lang]}
    if record is not None:
        record.update({"domain": args.domain, "files": files})
    return {"train": train, "dev": dev, "dev_lang": dev_lang, "tests": tests}


@dataclass
class AcsData:
    """What a msmo.py run trains and evaluates on, encoded (encode_acs_data)."""

    ce_pool: list[EncodedSentence]  # the tagging-CE training sentences (the ACS mixture, or one file)
    ce_sides: list[int]  # per CE sentence, its critic side: 0 source, 1 target, -1 not fed to the critic
    critic_pools: tuple[list[EncodedSentence], list[EncodedSentence]]  # the source-side and target-side CE sentences
    pairs: list[AlignedPair]  # aligned code-switched pairs with aspects (msmo)
    pair_stats: dict
    unlabeled: list[EncodedSentence]  # gold-XX-train, its labels unused (distillation)
    dev: list[EncodedSentence]
    dev_tags: list[list[str]]  # gold word tags
    tests: dict[str, list[EncodedSentence]]
    test_tags: dict[str, list[list[str]]]
    dev_lang: str
    pad_id: int


def encode_acs_data(args: Any, data: dict, tokenizer: Any) -> AcsData:
    """Encode every set; build the CE pool (with critic sides), the critic pools and the pairs."""
    bare = getattr(args, "label_piece", "first") == "xabsa"  # msmo.py --label-piece
    enc = {role: encode_tagged(tokenizer, s, args.tagging, args.max_len, bare) for role, s in data["train"].items()}
    dev = encode_tagged(tokenizer, data["dev"], args.tagging, args.max_len, bare)
    tests = {k: encode_tagged(tokenizer, v, args.tagging, args.max_len, bare) for k, v in data["tests"].items()}
    pool, sides = [], []
    for role in ACS_METHOD_ROLES[args.method]:
        side = ACS_ROLE_SIDE.get(role, -1)
        if role.startswith("cs_") and not args.critic_codeswitch:
            side = -1  # the repository's critic sees only gold-en vs smt-XX
        pool += enc[role]
        sides += [side] * len(enc[role])
    pairs, stats = [], {}
    if args.method == "msmo":
        tr = data["train"]
        if args.cons_pairs in ("both", "source"):
            p, stats["source"] = aligned_pairs(tr["en"], enc["en"], tr["cs_en_ctx"], enc["cs_en_ctx"])
            pairs += p
        if args.cons_pairs in ("both", "target"):
            p, stats["target"] = aligned_pairs(tr["smt"], enc["smt"], tr["cs_tgt_ctx"], enc["cs_tgt_ctx"])
            pairs += p

    def gold(sents: list[AbsaSentence]) -> list[list[str]]:  # the file's own spans: a word cut off is a miss
        return [spans_to_tags(s.spans, len(s.tokens), args.tagging) for s in sents]

    critic_pools = ([e for e, s in zip(pool, sides) if s == 0], [e for e, s in zip(pool, sides) if s == 1])
    return AcsData(pool, sides, critic_pools, pairs, stats, enc.get("gold_tgt", []), dev, gold(data["dev"]), tests,
                   {k: gold(v) for k, v in data["tests"].items()}, data["dev_lang"], tokenizer.pad_token_id)


def acs_step_batches(samplers: BatchStreams, data: AcsData, pool: list[EncodedSentence], sides: list[int], device,
                     with_pairs: bool, n_fresh: int) -> tuple[list[int], dict, list | None]:
    """One msmo.py step's batches: the next CE batch of `pool` (with its critic `sides`) and, when
    `with_pairs`, the next aligned pairs in it; with fresh critic streams (--critic-data fresh), `n_fresh`
    new (source, target) critic batches, else None. Returns (the CE indices, the batch, the critic batches)."""
    idx = samplers["ce"].next()
    pairs = [data.pairs[i] for i in samplers["pairs"].next()] if with_pairs and "pairs" in samplers else []
    batch = tagging_batch([pool[i] for i in idx], data.pad_id, device, [sides[i] for i in idx], pairs)
    if not n_fresh or "critic_src" not in samplers:
        return idx, batch, None
    src, tgt = data.critic_pools
    return idx, batch, [(tagging_batch([src[i] for i in samplers["critic_src"].next()], data.pad_id, device),
                         tagging_batch([tgt[i] for i in samplers["critic_tgt"].next()], data.pad_id, device))
                        for _ in range(n_fresh)]


def check_acs_sizes(args: Any, data: AcsData) -> None:
    """The batch sizes fit the data (else one line naming the flag)."""
    if args.method != "distill" and not data.ce_pool:
        raise UsageError(f"--method {args.method}: no training sentences")
    if args.method != "distill" and args.batch_size > len(data.ce_pool):
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(data.ce_pool)} training sentences")
    if (args.method == "distill" or args.distill) and args.batch_size > len(data.unlabeled):
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(data.unlabeled)} unlabeled "
                         f"gold-{args.lang}-train sentences of the distillation")
    if args.method == "msmo" and args.cons and data.pairs and args.cons_batch > len(data.pairs):
        raise UsageError(f"--cons-batch {args.cons_batch}: larger than the {len(data.pairs)} aligned sentence pairs")


# ------------------------------------------------------------------------------------------
# The Hugging Face hub
# ------------------------------------------------------------------------------------------
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline_requested() -> bool:
    """True when HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE) is set."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint ($HF_ENDPOINT, default huggingface.co)
    opens within `timeout` seconds. With a proxy configured the answer is True (the proxy
    decides; the HF libraries' own timeouts apply). Cached for the process."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_unavailable_reason() -> str | None:
    """Why the hub cannot be asked right now ("in offline mode (HF_HUB_OFFLINE=1)" or
    "unreachable"), or None. Offline mode still allows copies already in the HF cache."""
    if hub_offline_requested():
        return "in offline mode (HF_HUB_OFFLINE=1)"
    if not hub_reachable():
        return "unreachable"
    return None


def _hub_dataset(what: str, repo: str, config: str | None, split: str):
    """``datasets.load_dataset(repo, config, split=split)``, or a one-line MissingError. Never
    waits on a dead network: offline mode only reads the HF cache, and an unreachable hub
    fails at once."""
    tried = f"hub dataset '{repo}'" + (f" config '{config}'" if config else "") + f" split '{split}'"
    how = f"run once on a machine with network so the HF cache holds it, or {_HOW_LOCAL}"
    reason = hub_unavailable_reason()
    import datasets  # imported here: local files need no `datasets`

    if reason is not None and not (hub_offline_requested() and datasets.config.HF_HUB_OFFLINE):
        # Unreachable, or offline requested after `datasets` was imported (it would still go
        # online): do not try.
        raise MissingError(f"{what}: the Hugging Face hub is {reason} and {tried} was not loaded; {how}")
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means the data is not available
        where = "not in the local HF cache (offline mode, HF_HUB_OFFLINE=1)" if reason else f"failed ({_first_line(e)})"
        raise MissingError(f"{what}: {tried} {where}; {how}") from None


def _load_hub_task(task: str, split: str) -> list[Example]:
    src = HUB_SOURCES[task]
    a_col, b_col, y_col = src.columns
    out: list[Example] = []
    for hub_split in src.splits[split]:
        ds = _hub_dataset(f"{_DISPLAY[task]} {split}", src.repo, src.config, hub_split)
        if y_col not in ds.column_names and y_col == "coarse_label" and "label-coarse" in ds.column_names:
            y_col = "label-coarse"  # older copies of TREC
        a = list(ds[a_col])
        b = list(ds[b_col]) if b_col else [None] * len(a)
        y = list(ds[y_col])
        for ta, tb, label in zip(a, b, y):
            if task in REGRESSION_TASKS:
                out.append(Example(ta, tb, float(label)))
            elif task == "snli" and label == -1:
                continue  # no gold label (as in SentEval's copy)
            else:
                out.append(Example(ta, tb, int(label)))
    return out


WIKI1M_REPO = "princeton-nlp/datasets-for-simcse"
WIKI1M_FILE = "wiki1m_for_simcse.txt"


def load_wiki1m(data_dir: str | Path | None = None, source: str = "auto", limit: int | None = None) -> list[str]:
    """SimCSE's one million Wikipedia sentences, in file order (first `limit` if given).

    local: ``<data_dir>/simcse/wiki1m_for_simcse.txt`` (not in shared/data: too large);
    hub: the file ``wiki1m_for_simcse.txt`` of the dataset repository
    ``princeton-nlp/datasets-for-simcse`` (downloaded once with huggingface_hub).
    """
    if source not in SOURCES:
        raise UsageError(f"--source {source}: allowed are {', '.join(SOURCES)}")
    data_dir = resolve_text_data_dir(data_dir)
    local = data_dir / "simcse" / WIKI1M_FILE
    if source == "local" or (source == "auto" and local.is_file()):
        path = _need(data_dir, f"simcse/{WIKI1M_FILE}", "SimCSE wiki1m")
    else:
        path = _hub_file("SimCSE wiki1m", WIKI1M_REPO, WIKI1M_FILE, local)
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                out.append(line.rstrip("\n").rstrip("\r"))
    return out


UNLABELLED_SENTENCES = ("wiki1m", "senteval")


def sentence_key(s: str) -> str:
    """A sentence compared without case and whitespace differences (load_unlabelled_sentences' `exclude`)."""
    return " ".join(s.lower().split())


def load_unlabelled_sentences(name: str, data_dir: str | Path | None = None, source: str = "auto",
                              limit: int | None = None, subset_seed: int = 0,
                              exclude: set[str] | Callable[[], set[str]] | None = None) -> tuple[list[str], dict]:
    """Unlabelled English sentences for SimCSE-style training, and the record of what they are (a
    run saves it in data_subsets.json: the subset's indices into the full list, or None).

    name: ``wiki1m`` (SimCSE's, :func:`load_wiki1m`) or ``senteval``, offline: SentEval MR, CR,
    SUBJ, MPQA and both sides of the STS-B train pairs (scores dropped), exact duplicates removed
    (first occurrence kept), 39,017 sentences. exclude: sentences (e.g. of the evaluation sets), or
    a function that loads them once the list is read, dropped from the list, compared by
    :func:`sentence_key`; the record says how many ("n_excluded"). limit: a fixed random subset of
    this many, in the order of the (remaining) list, drawn with `subset_seed` only (so runs of
    different seeds share it).
    """
    import numpy as np

    if name == "wiki1m":
        sentences = load_wiki1m(data_dir, source)
    elif name == "senteval":
        sentences = load_senteval_sentences(("MR", "CR", "SUBJ", "MPQA"), data_dir)
        for ex in load_text_task("stsb", "train", data_dir, source):
            sentences += [ex.text_a, ex.text_b]
        sentences = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))
    else:
        raise UsageError(f"--train-data {name}: allowed are {', '.join(UNLABELLED_SENTENCES)}")
    dropped = {}
    if exclude is not None:
        keys = {sentence_key(x) for x in (exclude() if callable(exclude) else exclude)}
        n_before = len(sentences)
        sentences = [x for x in sentences if sentence_key(x) not in keys]
        dropped = {"n_before_exclusion": n_before, "n_excluded": n_before - len(sentences)}
    if not limit:
        return sentences, {"data": name, "n_all": len(sentences), **dropped, "subset_seed": None, "indices": None}
    if limit > len(sentences):
        raise UsageError(f"--limit-train {limit}: {name} has only {len(sentences)} sentences" + (
            f" ({dropped['n_before_exclusion']} before its {dropped['n_excluded']} evaluation sentences were dropped)"
            if dropped else ""))
    keep = np.sort(np.random.default_rng(subset_seed).permutation(len(sentences))[:limit])
    record = {"data": name, "n_all": len(sentences), **dropped, "subset_seed": subset_seed, "indices": keep.tolist()}
    return [sentences[i] for i in keep], record


def _hub_file(what: str, repo: str, filename: str, local: Path) -> Path:
    """Download (or find in the HF cache) one file of a hub dataset repository."""
    tried = f"file '{filename}' of hub dataset '{repo}'"
    how = f"run once on a machine with network so the HF cache holds it, or put it at {local}"
    reason = hub_unavailable_reason()
    from huggingface_hub import hf_hub_download

    try:
        # local_files_only reads the cache without any request when the hub cannot be asked.
        return Path(hf_hub_download(repo, filename, repo_type="dataset", local_files_only=reason is not None))
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not available
        if reason is not None:
            state = f"the Hugging Face hub is {reason} and {tried} is not in the HF cache"
        else:
            state = f"{tried} could not be downloaded ({_first_line(e)})"
        raise MissingError(f"{what}: {state}; {how}") from None


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (for one-line errors)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ------------------------------------------------------------------------------------------
# Length-grouped batches
# ------------------------------------------------------------------------------------------
def length_grouped_order(lengths: list[int], batch_size: int, generator, mega_batches: int = 50) -> list[int]:
    """One epoch's order of the indices 0..len(lengths)-1, in batches of similar length (the idea
    of transformers' `group_by_length`): a random permutation is cut into mega-batches of
    `mega_batches * batch_size`, each is sorted by length (longest first) and cut into batches,
    and the full batches are shuffled; the one short batch, if any, comes last (a script that
    drops the last partial batch drops it). Every index appears once. The order depends only
    on `generator` (a seeded torch.Generator), so a resumed run that rebuilds the generator
    sees the same batches. Padding to the longest of a batch then wastes little compute."""
    import torch

    perm = torch.randperm(len(lengths), generator=generator).tolist()
    size = mega_batches * batch_size
    batches = []
    for start in range(0, len(perm), size):
        mega = sorted(perm[start:start + size], key=lambda i: -lengths[i])  # stable: ties keep the random order
        batches += [mega[b:b + batch_size] for b in range(0, len(mega), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    return [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]] + sum(short, [])


# ------------------------------------------------------------------------------------------
# Subsets, labelled splits, sentence pairs and resumable length-grouped passes (conlst.py)
# ------------------------------------------------------------------------------------------
def subset_indices(n: int, limit: int | None, seed: int):
    """Sorted indices (numpy) of a random subset of `limit` of n items drawn with `seed` (all of
    them when limit is None or >= n)."""
    import numpy as np

    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def note_subset(record: dict | None, key: str, what: str, n_all: int, idx) -> None:
    """Put a subset into `record` (a run saves it as data_subsets.json): its indices into the
    split(s), None when every example is used."""
    if record is not None:
        record[key] = {"data": what, "n_all": n_all, "indices": None if len(idx) == n_all else idx.tolist()}


def load_labelled(task: str, split: str, data_dir: str | Path | None = None, source: str = "auto") -> list[Example]:
    """A labelled split; with source auto, a local copy without labels (the local XNLI test
    files) is replaced by the hub's labelled copy."""
    ex = load_text_task(task, split, data_dir, source)
    if any(e.label == -1 for e in ex):
        if source == "auto":
            ex = load_text_task(task, split, data_dir, "hub")
        else:
            raise MissingError(f"{task} {split}: this copy has no labels (the local XNLI test files have none); "
                               "use --data-source auto/hub on a machine with network, or --eval-split dev")
    return ex


def load_pairs(task: str, splits: str | list[str], data_dir: str | Path | None = None, source: str = "auto",
               limit: int | None = None, seed: int = 0, record: dict | None = None, key: str = "",
               labels: str = "any", what: str = "", exclude=None) -> list[Example]:
    """The examples of a task's split(s), concatenated, and a random subset of `limit` of them drawn
    with `seed` (noted as `record[key]`, see note_subset; `what` is added to its description).
    labels: any (as the files hold them), labelled (unlabelled pairs left out), required (a copy
    without labels is replaced by the hub's labelled one: load_labelled). `exclude`: row indices
    left out first; the subset is then drawn, with `seed`, from the remaining rows (in order)."""
    import numpy as np

    ex: list[Example] = []
    for split in [splits] if isinstance(splits, str) else splits:
        got = (load_labelled if labels == "required" else load_text_task)(task, split, data_dir, source)
        ex += [e for e in got if e.label >= 0] if labels == "labelled" else got
    if exclude is None:
        idx = subset_indices(len(ex), limit, seed)
    else:
        rest = np.setdiff1d(np.arange(len(ex)), np.asarray(exclude, dtype=np.int64))
        idx = rest[subset_indices(len(rest), limit, seed)]
    note_subset(record, key, f"{task} {splits if isinstance(splits, str) else '+'.join(splits)}{what}", len(ex), idx)
    return [ex[i] for i in idx]


def tokenize_pairs(tok, pairs: list[tuple[str, str]], prefix: str, max_length: int, maskable: bool = False) -> dict:
    """Tokenize (premise, hypothesis) pairs, padded to the longest (tensors); with `maskable`, also
    the [N, T] bool mask of the tokens random masking may replace (not special, not the prefix)."""
    enc = tok([prefix + a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=max_length,
              padding=True, return_tensors="pt", return_special_tokens_mask=maskable)
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    if maskable:
        can = (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
        # the prefix's own tokens ("query: " alone also yields a trailing "▁" that, in context, is part of
        # the first word: count it without the trailing space)
        n_prefix = len(tok(prefix.rstrip(), add_special_tokens=False)["input_ids"]) if prefix.strip() else 0
        if n_prefix:
            can[:, 1:1 + n_prefix] = False  # the e5 "query:" prefix right after <s>
        out["maskable"] = can
    return out


def pass_key(*parts) -> int:
    """A seed for the data order of one pass (stable across processes, so a resumed pass
    repeats the same order)."""
    import zlib

    return zlib.crc32("/".join(map(str, parts)).encode())


def grouped_order(pairs: list, batch_size: int, key: int) -> list[int]:
    """One pass's order of sentence pairs, in length-grouped batches (length: characters of premise
    plus hypothesis, a proxy for tokens); a function of `key` only, so a resumed pass repeats it."""
    import torch

    lengths = [len(p[0]) + len(p[1] or "") for p in pairs]  # Example or (premise, hypothesis)
    return length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(key))


class SourceStream:
    """Endless length-grouped batches of `examples`, a new order per pass, resumable from its
    `state` (pass, position)."""

    def __init__(self, examples: list, seed: int, tag: str, state: dict | None = None):
        self.examples, self.seed, self.tag = examples, seed, tag
        self.state = dict(state or {"epoch": 0, "pos": 0})

    def next(self, n: int) -> list:
        out: list = []
        while len(out) < n:
            order = grouped_order(self.examples, n, pass_key(self.seed, self.tag, self.state["epoch"]))
            take = order[self.state["pos"]:self.state["pos"] + n - len(out)]
            out += [self.examples[i] for i in take]
            self.state["pos"] += len(take)
            if self.state["pos"] >= len(order):
                self.state = {"epoch": self.state["epoch"] + 1, "pos": 0}
        return out


# ------------------------------------------------------------------------------------------
# Cross-lingual NLI (conlst.py): English source, unlabeled XNLI target pool, target evaluation set,
# English selection set. `args` needs data_dir, data_source, source_task, source_splits, limit_*,
# seed, pool_split, eval_split, select_lang, select_split.
# ------------------------------------------------------------------------------------------
@dataclass
class TargetData:
    lang: str
    pool: list[tuple[str, str]]  # unlabeled: what stages 1 and 2 train on
    eval: list[Example]  # labelled: evaluation only
    bt: dict[str, str] | None = None  # back-translation of each pool sentence (where available)


@dataclass
class XnliData:
    source: list[Example]
    select: list[Example]
    targets: dict[str, TargetData]


def _pool_rows(args: Any, lang: str, record: dict | None = None) -> list[Example]:
    """The pool's rows of the target's XNLI split: the same rows in every language (XNLI is parallel)."""
    return load_pairs(f"xnli-{lang}", args.pool_split, args.data_dir or None, args.data_source, args.limit_pool,
                      args.seed, record, f"pool_{lang}", what=" (labels dropped)")


def load_xnli_transfer(args: Any, langs: list[str], record: dict | None = None) -> XnliData:
    """Every data set of a cross-lingual run; `record` receives the subsets with their row indices (saved
    as data_subsets.json). The evaluation and selection subsets are the same for every seed (drawn with
    12345). XNLI is parallel line by line, so one row index is the same item in every language: the
    evaluation rows (the same in every language) are drawn first, and a selection set from the same split
    is drawn from the rows they leave; from the other split it holds other items (drawn as usual)."""
    import numpy as np

    where = (args.data_dir or None, args.data_source)
    record = {} if record is None else record
    source = load_pairs(args.source_task, args.source_splits, *where, args.limit_train, args.seed, record, "source",
                        labels="labelled", what=" (labelled pairs)")
    if getattr(args, "source_add", "none") == "sick":  # conlst.py --source-add sick: every SICK pair
        extra = read_sick_nli(args.data_dir or None)
        if record is not None:
            record["source_add"] = {"data": "SICK (SICK.txt, every split, 3-way entailment_label)",
                                    "n_all": len(extra), "indices": None}
        source = source + extra
    targets = {lang: TargetData(lang, [(e.text_a, e.text_b) for e in _pool_rows(args, lang, record)],
                                load_pairs(f"xnli-{lang}", args.eval_split, *where, args.limit_eval, 12345, record,
                                           f"eval_{lang}", labels="required"))
               for lang in langs}
    exclude, what = None, f" (another split than the evaluation set's, {args.eval_split}: other items)"
    if args.select_split == args.eval_split:
        evals = [record[f"eval_{lang}"] for lang in langs]
        exclude = np.unique(np.concatenate([np.arange(r["n_all"]) if r["indices"] is None else np.asarray(r["indices"])
                                            for r in evals]))
        if len(exclude) >= evals[0]["n_all"]:
            raise UsageError(f"--limit-eval {args.limit_eval}: the evaluation set takes every row of XNLI "
                             f"{args.eval_split}, and a selection set from it (--select-split {args.select_split}) "
                             "must use other rows; lower --limit-eval or change --select-split")
        what = f" (rows disjoint from the evaluation rows: drawn from the {evals[0]['n_all'] - len(exclude)} left)"
    select = load_pairs(f"xnli-{args.select_lang}", args.select_split, *where, args.limit_eval, 12345, record, "select",
                        labels="required", what=what, exclude=exclude)
    return XnliData(source, select, targets)


def check_transfer_args(args: Any, langs: list[str]) -> None:
    """conlst.py's data flags (one line naming the flag): XNLI languages, listed once; a selection
    language that is a target evaluated on the same split refused (zero-shot: no target labels in
    model selection); the pool is not the evaluation split; SNLI's splits."""
    for lang in langs + [args.select_lang]:
        if lang not in XNLI_LANGS:
            flag = "--select-lang" if lang == args.select_lang and lang not in langs else \
                "--lang" if args.lang else "--langs"
            raise UsageError(f"{flag} {lang}: allowed are {', '.join(XNLI_LANGS)} (or 'all' for --langs)")
    if args.select_lang in langs and args.select_split == args.eval_split:  # (the paper: en dev selects, en test)
        raise UsageError(f"--select-lang {args.select_lang}: is a target language evaluated on the same split "
                         f"({args.eval_split}); select on another language or --select-split")
    if len(set(langs)) != len(langs):
        raise UsageError(f"--langs {' '.join(langs)}: a language is listed twice")
    if args.pool_split == args.eval_split:
        raise UsageError(f"--pool-split {args.pool_split}: equals --eval-split; the unlabeled pool must not be "
                         "the evaluation set")
    if args.source_task == "snli" and not set(args.source_splits) <= {"dev", "test", "train"}:
        raise UsageError(f"--source-splits {' '.join(args.source_splits)}: snli has train, dev, test")


def load_pool_gold_labels_for_analysis_only(args: Any, lang: str):
    """READS TARGET GOLD LABELS. For the confidence diagnostics (Table 4, Figure 3) only: the
    labels of the pool rows, or None where the pool split has none (local XNLI test, CPU scale).
    Nothing that trains or selects a model calls this."""
    import torch

    gold = [e.label for e in _pool_rows(args, lang)]
    return None if any(y == -1 for y in gold) else torch.tensor(gold)


def check_transfer_sizes(args: Any, data: XnliData, stages: list[int]) -> None:
    """Batch sizes and K against the data the stages that run will see (one line naming the flag)."""
    n_src = len(data.source)
    n_pool = min(len(t.pool) for t in data.targets.values())
    checks = [] if args.stage0_from else [("s0_batch_size", n_src, "labeled source pairs")]
    if 1 in stages:
        checks += [("s1_batch_size", n_pool, "pairs of the unlabeled pool")]
        checks += [] if args.wo_clcs else [("s1_source_batch_size", n_src, "labeled source pairs")]
    if 2 in stages:
        checks += [("s2_batch_size", n_pool, "pairs of the unlabeled pool"),
                   ("s2_source_batch_size", n_src, "labeled source pairs")]
    for name, n, what in checks:
        if getattr(args, name) > n:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: larger than the {n} {what}")
    if 1 in stages and not args.wo_cl and args.k_neg > n_pool - 1:
        raise UsageError(f"--k-neg {args.k_neg}: an anchor's negatives are other pairs of the unlabeled pool, "
                         f"which has {n_pool}; at most {n_pool - 1} are possible")
