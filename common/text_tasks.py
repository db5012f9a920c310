"""Sentence(-pair) classification tasks for a training run (scal.py): which splits select and
report, the training subset, tokenization, padding (`tokenizer.pad`), and the official metrics
(scikit-learn's and scipy's, in percent).

    train, evals, tests = load_task(args, data_dir, record)       # text_data.Example lists
    eval_sets = make_eval_sets(evals, tokenizer, args.task, args.max_length, args.limit_eval)
    batch = collate([encoded[i] for i in idx], tokenizer, device, regression)
    task_metrics(task, pred, gold)                                 # {"acc": ..., "mcc": ...}
    sts_spearman(sts_sets, embed)                                  # {"sts12": ...}: STS as SimCSE scores it (uscal.py)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import sklearn.metrics as skm
import torch

from common import text_data
from common.utils import MissingError, UsageError


# ------------------------------------------------------------------------------------------
# Metrics: GLUE's official ones, in percent (scikit-learn's; scipy's correlations); 0 on an empty set
# ------------------------------------------------------------------------------------------
def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(100.0 * skm.accuracy_score(gold, pred)) if len(gold) else 0.0


def f1_binary(pred: np.ndarray, gold: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class (MRPC 'equivalent', QQP 'duplicate'); 0 when undefined."""
    return float(100.0 * skm.f1_score(gold, pred, pos_label=positive, zero_division=0.0)) if len(gold) else 0.0


def matthews_corrcoef(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (CoLA), the multi-class form (Gorodkin 2004), which is the usual
    (TP*TN - FP*FN) / sqrt(...) for two classes; 0 when a marginal is constant."""
    with warnings.catch_warnings():  # one class in pred and gold: sklearn warns (1x1 confusion matrix), gives 0
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return float(100.0 * skm.matthews_corrcoef(gold, pred)) if len(gold) else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(100.0 * pearsonr(x, y)[0]) if np.std(x) > 0 and np.std(y) > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(100.0 * spearmanr(x, y)[0]) if np.std(x) > 0 and np.std(y) > 0 else 0.0


def sts_all_aggregation(pred: dict[str, np.ndarray], gold: dict[str, np.ndarray]) -> float:
    """SimCSE's "all" setting for an STS set of several subsets (uscal.py): one Spearman correlation
    (percent) over the concatenation of all subsets, in sorted subset order (not the mean of per-subset
    correlations)."""
    keys = sorted(pred)
    return spearman(np.concatenate([pred[k] for k in keys]), np.concatenate([gold[k] for k in keys]))


def sts_spearman(sets: dict[str, dict[str, list]], embed: Callable[[list[str]], torch.Tensor]) -> dict[str, float]:
    """{set name: Spearman x 100} of STS sets {name: {subset: [Example(s1, s2, score)]}}, SimCSE's protocol
    (uscal.py): the cosine similarity of each pair's two vectors against the gold scores, with the "all"
    aggregation. `embed` maps sentences to vectors [N, H]; it is called once, on the distinct sentences
    of all the sets (sorted)."""
    sentences = sorted({s for subsets in sets.values() for exs in subsets.values() for e in exs
                        for s in (e.text_a, e.text_b)})
    index = {s: i for i, s in enumerate(sentences)}
    vecs = torch.nn.functional.normalize(embed(sentences), dim=-1)
    out = {}
    for name, subsets in sets.items():
        pred, gold = {}, {}
        for sub, exs in subsets.items():
            a = vecs[[index[e.text_a] for e in exs]]
            b = vecs[[index[e.text_b] for e in exs]]
            pred[sub] = (a * b).sum(-1).numpy()
            gold[sub] = np.array([e.label for e in exs], dtype=np.float64)
        out[name] = sts_all_aggregation(pred, gold)
    return out


#: Headline metric per task (the SCAL paper's Tables 1 and 5); everything else reports accuracy.
PRIMARY_METRIC = {"cola": "mcc", "mrpc": "f1", "stsb": "spearman", "trec": "err"}
#: The metric the best evaluation is chosen by (higher is better): TREC's error -> accuracy.
SELECT_METRIC = {"trec": "acc"}


def task_metrics(task: str, pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """The official metrics of `task` from predictions (class ids, or scores for STS-B): CoLA MCC,
    MRPC and QQP F1 and accuracy, STS-B Pearson/Spearman, TREC error rate, the others accuracy."""
    if task == "stsb":
        return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}
    out = {"acc": accuracy(pred, gold)}
    if task == "cola":
        out["mcc"] = matthews_corrcoef(pred, gold)
    if task in ("mrpc", "qqp"):
        out["f1"] = f1_binary(pred, gold)
    if task == "trec":
        out["err"] = 100.0 - out["acc"]
    return out


# ------------------------------------------------------------------------------------------
# Data: the splits of a task, the training subset, token ids, batches with dynamic padding
# ------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One evaluation split: tokenized examples, gold labels, the metric-name suffix
    ("" for the selection split, "_mm" for MNLI mismatched) and optional groups (ANLI rounds)."""

    name: str
    suffix: str
    encoded: list[dict]
    gold: np.ndarray
    groups: np.ndarray | None = None


def check_train_tasks(args: Any, choices: tuple[str, ...]) -> None:
    """UsageError (one line, naming the flag) when a --train-tasks entry is unknown or has other labels than
    --task, or when --train-split is not a split of every training task (scal.py's validate)."""
    for t in args.train_tasks:
        if t not in text_data.TASKS:
            raise UsageError(f"--train-tasks {t}: allowed are {', '.join(choices)}")
        if text_data.label_names(t) != text_data.label_names(args.task):
            raise UsageError(f"--train-tasks {t}: its labels {text_data.label_names(t)} differ from --task "
                             f"{args.task}'s {text_data.label_names(args.task)}")
    for t in args.train_tasks or [args.task]:
        if args.train_split not in text_data.task_splits(t):
            raise UsageError(f"--train-split {args.train_split}: {t} has the splits "
                             f"{', '.join(text_data.task_splits(t))}")


def local_copy_present(task: str, split: str, data_dir: Path) -> bool:
    files = text_data.LOCAL_FILES.get(task, {}).get(split, ())
    return bool(files) and all((data_dir / f).exists() for f in files)


def evaluation_splits(task: str, source: str, data_dir: Path) -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """[(name, metric suffix, [splits to concatenate])] for model selection, and the test splits
    evaluated once with the best checkpoint ([] when the paper reports none): GLUE dev; MNLI
    matched (selection) and mismatched; TREC and AG News test (no dev split); ANLI dev, then
    test; MRPC's local copy (the MSR release, without GLUE's dev split) its test set."""
    if task == "mnli":
        return [("dev_matched", "", ["dev_matched"]), ("dev_mismatched", "_mm", ["dev_mismatched"])], []
    if task == "anli":
        return [("dev", "", [f"dev_r{r}" for r in (1, 2, 3)])], [f"test_r{r}" for r in (1, 2, 3)]
    if task in ("trec", "ag_news"):
        return [("test", "", ["test"])], []  # Table 5 reports test; no dev split
    if task == "mrpc" and source != "hub" and local_copy_present("mrpc", "train", data_dir):
        return [("test", "", ["test"])], []  # the MSR release: no dev split
    return [("dev", "", ["dev"])], []


def encode_examples(tokenizer, examples: list, max_length: int) -> list[dict]:
    """Token ids (and token types, when the tokenizer has them) per example, no padding."""
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples]
    pairs = any(x is not None for x in b)
    if pairs and not all(x is not None for x in b):
        raise MissingError("a data split mixes single sentences and sentence pairs")
    enc = tokenizer(a, b if pairs else None, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} | {"label": examples[i].label} for i in range(len(examples))]


def collate(encoded: list[dict], tokenizer, device: torch.device, regression: bool) -> dict:
    """Pad a list of encoded examples on the right to the longest one -> a batch of tensors on `device`:
    input_ids, attention_mask, token_type_ids (when encoded has them), labels (float for regression)."""
    batch = tokenizer.pad([{k: v for k, v in e.items() if k != "label"} for e in encoded], padding_side="right",
                          return_attention_mask=True, return_tensors="pt")
    batch["labels"] = torch.tensor([e["label"] for e in encoded], dtype=torch.float if regression else torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch in length-grouped batches (text_data.length_grouped_order: little
    padding), a function of (seed, epoch) only: a resumed run sees the same batches as an uninterrupted one."""
    return text_data.length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch))


#: Seed offset of the --val-from-train draw (plus --subset-seed): fixed, and not the training subset's seed.
VAL_SEED = 7_919


def val_from_train_indices(n_all: int, n_val: int | None, subset_seed: int):
    """(held-out indices, the other indices), both sorted numpy arrays, for a validation split of `n_val` rows
    held out from a training split of `n_all` (scal.py --val-from-train); (None, all indices) when n_val is
    None or 0. Drawn with the fixed seed VAL_SEED + subset_seed, so every --seed holds out the same rows."""
    if not n_val:
        return None, np.arange(n_all)
    if n_val >= n_all:
        raise UsageError(f"--val-from-train {n_val}: the training split has only {n_all} examples")
    perm = np.random.default_rng(VAL_SEED + subset_seed).permutation(n_all)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def load_task(args: Any, data_dir: Path, record: dict | None = None):
    """Training examples, evaluation splits and test splits as lists of text_data.Example, from
    `args`' task, train_tasks, train_split, source, limit_train, subset_seed and limit_eval.
    A missing data set raises MissingError (one line) here, before anything is written.
    `record`, when given, receives what defines the data (the run saves it as data_subsets.json):
    the training subset's indices into the (concatenated, labelled) training split, and the
    number of examples used of each evaluation split."""
    train = []
    for t in args.train_tasks or [args.task]:
        train += text_data.load_text_task(t, args.train_split, data_dir, args.source)
    train = [e for e in train if not (isinstance(e.label, int) and e.label < 0)]
    n_all = len(train)
    held, rest = val_from_train_indices(n_all, getattr(args, "val_from_train", None), args.subset_seed)
    val = [train[i] for i in held] if held is not None else None
    keep = None
    if args.limit_train:
        if args.limit_train > len(rest):
            raise UsageError(f"--limit-train {args.limit_train}: {args.task} {args.train_split} has only "
                             f"{len(rest)} examples" + (" left after --val-from-train" if val else ""))
        # drawn among the rows not held out (all of them without --val-from-train: the same subset as before)
        keep = rest[np.sort(np.random.default_rng(args.subset_seed).permutation(len(rest))[: args.limit_train])]
    elif val is not None:
        keep = rest
    if keep is not None:
        train = [train[i] for i in keep]
    eval_spec, test_splits = evaluation_splits(args.task, args.source, data_dir)
    evals = []
    for name, suffix, splits in eval_spec:
        parts = [text_data.load_text_task(args.task, s, data_dir, args.source) for s in splits]
        evals.append((name, suffix, parts))
    if val is not None:  # the held-out split of train, for model selection and early stopping (scal.py)
        eval_spec = [*eval_spec, ("val", "_val", ["val_from_train"])]
        evals.append(("val", "_val", [val]))
    tests = [text_data.load_text_task(args.task, s, data_dir, args.source) for s in test_splits]
    if record is not None:
        def used(splits, parts):  # evaluation: the first --limit-eval examples of each split
            return {s: {"n_all": len(p), "first": len(p) if s == "val_from_train" else min(len(p), args.limit_eval
                                                                                        or len(p))}
                    for s, p in zip(splits, parts)}

        record["train"] = {"tasks": args.train_tasks or [args.task], "split": args.train_split, "source": args.source,
                           "n_all": n_all, "subset_seed": args.subset_seed if args.limit_train else None,
                           "indices": keep.tolist() if keep is not None else None}
        if val is not None:
            record["val_from_train"] = {"n": len(held), "seed": VAL_SEED + args.subset_seed,
                                        "indices": held.tolist()}
        record["eval"] = {name: used(splits, parts) for (name, _, splits), (_, _, parts) in zip(eval_spec, evals)}
        record["test"] = used(test_splits, tests)
    return train, evals, ([("test", "", tests)] if tests else [])


def load_encoded_task(args: Any, data_dir: Path, load_model: Callable):
    """(encoder, tokenizer, tokenized training examples, evaluation sets, test sets, what defines the data
    for data_subsets.json) of scal.py's `args`; `load_model(args, training texts)` gives (encoder, tokenizer).
    Writes nothing: a missing data set is a one-line MissingError here."""
    record: dict = {}
    train_ex, eval_specs, test_specs = load_task(args, data_dir, record)
    if args.batch_size > len(train_ex):
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(train_ex)} training examples")
    encoder, tokenizer = load_model(args, [t for e in train_ex for t in (e.text_a, e.text_b) if t])
    train_enc = encode_examples(tokenizer, train_ex, args.max_length)
    eval_sets = make_eval_sets(eval_specs, tokenizer, args.task, args.max_length, args.limit_eval)
    test_sets = make_eval_sets(test_specs, tokenizer, args.task, args.max_length, args.limit_eval)
    return encoder, tokenizer, train_enc, eval_sets, test_sets, record


def make_eval_sets(specs: list, tokenizer, task: str, max_length: int, limit_eval: int | None) -> list[EvalSet]:
    """Tokenize each evaluation split (its first `limit_eval` examples; the held-out "val" split of train
    whole, its size is --val-from-train's); a split made of several parts (ANLI rounds) keeps the part of
    each example as its group, for per-round metrics (acc_r1 ...)."""
    out = []
    for name, suffix, parts in specs:
        examples, groups = [], []
        for g, part in enumerate(parts):
            part = part[:limit_eval] if limit_eval and name != "val" else part
            examples += part
            groups += [g + 1] * len(part)
        if any(isinstance(e.label, int) and e.label < 0 for e in examples):
            raise MissingError(f"{task} {name}: this split has no labels; it cannot be evaluated")
        out.append(EvalSet(name, suffix, encode_examples(tokenizer, examples, max_length),
                           np.array([e.label for e in examples]), np.array(groups) if len(parts) > 1 else None))
    return out
