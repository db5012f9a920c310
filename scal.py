"""SCAL: Supervised Contrastive Adversarial Learning for fine-tuning a text encoder.

Docs: docs/scal.md
Paper: "Simple Contrastive Representation Adversarial Learning for NLP Tasks", Sec. 3.3
(../shared/papers/scal_uscal.txt). One file, top to bottom: arguments, metrics, data, model,
the method's losses (plain functions named after their equations), one function per training
step (method and baselines), evaluation (clean and under attack), the training loop.

Training batches are length-grouped (common.text_data.length_grouped_order: sorted by length within
seeded mega-batches of 50 batches, the batches shuffled), so padding wastes little compute;
evaluation runs in length order and restores the original order.

    python scal.py --task rte                               # BERT-base, GLUE RTE, SCAL (Table 3)
    python scal.py --task mrpc --method ft                  # the fine-tuning baseline row
    python scal.py --task cola --method adv                 # ablation "+AT" (Table 4); --method cl is "+CL"
    python scal.py --task trec                              # Table 5 (TREC error rate)
    python scal.py --preset anli-roberta-large              # Table 7 (trained on MNLI + SNLI, tested on ANLI)
    python scal.py --preset roberta-base --task sst2        # RoBERTa-base, batch 16
    python scal.py --preset cpu --task trec --seed 0        # CPU-scale protocol (MiniLM-L6; CoLA, SST-2, TREC)
    python scal.py --preset cpu-pairs --task rte --seed 0   # the same for the pair tasks (RTE, MRPC)
    python scal.py --preset smoke --task rte                # a tiny random model for a few steps

Per step, for a batch of (x, y) (Sec. 3.3):

  CE (Eq. 5)           L_ce(x, y) on the classifier that reads the [CLS] vector h
  perturbation         delta = eps * g / ||g||_2 per example (FGM, Eq. 6; `--attack fgsm`:
                       eps * sign(g), Eq. 2), g = dL_ce/dx_emb for this batch, detached
  adversarial CE       L_ce(x_emb + delta, y)
  contrastive (Eq. 7)  InfoNCE between z_i = pooler(h_i) and z_i^adv (positive), the other
                       z_k^adv of the batch as negatives, cosine similarity, tau = 0.05
  total (Eq. 8)        0.5 * (L_ce(x) + L_ce(x_adv)) + alpha * L_ct

Baselines in the same file (Tables 4-5): `--method ft` (CE only), `adv` ("+AT": Eq. 8
without L_ct), `cl` ("+CL": CE on x plus alpha * L_ct with a dropout positive, no adversarial
CE), `scal`. The step functions `ft_step`, `adv_step`, `cl_step`, `scal_step` take
(model, batch, args) and return (loss, terms), so a benchmark can time them on one batch.

Readings of the paper and choices it leaves open (README "paper vs. code" has them too):
- Eq. 7's denominator: read as sum_k exp(sim(z_i, z_k^adv)/tau) (the generic Eq. 4 runs it
  over the other view); the garbled text's literal z_k is `--ct-denominator anchor`.
- "Word embeddings" (Eq. 6) = the `inputs_embeds` of this batch (token embeddings before
  position/type embeddings, LayerNorm and dropout), perturbed per example (FreeLB-style),
  never the shared embedding matrix. The gradient flows into the embedding matrix from both
  the clean and the adversarial branch. Padding positions get no perturbation (their gradient
  is zero). The attack's gradient is taken in training mode (same dropout as the clean CE).
- ||g||_2 in Eq. 6 is the L2 norm of example i's whole [length, hidden] gradient.
- Pooler: "a pooler layer ... on the top of [CLS]" is a new Linear + tanh on the last-layer
  [CLS] vector (the BERT pooler's shape, freshly initialised; the pretrained NSP pooler is
  not used); the classifier (dropout + Linear) reads the [CLS] vector itself, not z.
- alpha: the paper says only "less than one"; default 0.5 (see `--alpha`). epsilon: the paper
  searches {0.1, ..., 0.5} per task without giving the values; default 0.3, the middle.
  FGM vs FGSM: the paper does not say which one its tables used; FGM (Eq. 6, "our" formula)
  is the default. FGSM's sign(g) moves every coordinate by eps: at eps 0.3 that is larger than
  a token embedding itself (norm ~1), so use it with a much smaller eps.
- "+CL" (Table 4) does not say what its positive is; ours is a second forward pass of the
  clean input with another dropout mask (SimCSE); `--cl-positive adv` uses the adversarial
  view instead (without its CE).
- Schedule: "warm up learning rate scheduler" -> linear warm-up over `--warmup-ratio` (0.1,
  ours) of the planned steps, then linear decay to 0. AdamW weight decay 0.01 on all weights
  but biases and LayerNorm (BERT's convention). Gradient-norm clipping at 1.0 (Hugging Face
  Trainer's default; the paper says nothing). Early stopping: `--patience` (3, ours)
  evaluations without improvement of the selection metric.
- Model selection and the reported number come from the same evaluation split, as in the
  paper ("GLUE dev"): GLUE dev; TREC and AG News test (Table 5); ANLI dev, then the
  best-dev checkpoint is evaluated on ANLI test (Tables 7-8). The local MRPC copy is the MSR
  release (no dev split; GLUE's dev is carved out of its train set), so offline MRPC is
  evaluated on the MSR test set (1,725 pairs).
- Metrics are GLUE's official ones, in percent: CoLA MCC, MRPC F1 (paper's Table 1) and
  accuracy, QQP accuracy (paper) and F1, STS-B Pearson/Spearman, MNLI matched (selection) and
  mismatched accuracy, the others accuracy; TREC error rate (selection on accuracy).
- Robustness (the paper claims it, but measures it only on ANLI): every evaluation also
  reports the metrics under a white-box FGM/FGSM attack on the input embeddings
  (`adv_` prefix; `--robust-attack`, `--robust-epsilon`, model in eval mode, true labels).
- ANLI (Table 7): trained on MNLI + SNLI (`--train-tasks mnli snli`); Table 8 adds ANLI train
  and FeverNLI: `--train-tasks mnli snli anli` covers all but FeverNLI, which has no loader
  here. The ANLI epoch count is not given (InfoBERT's protocol is cited): 3, ours.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn.metrics as skm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common import text_data
from common import utils
from common.text_models import load_encoder, tiny_encoder
from common.utils import MissingError, UsageError, arg

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli", "stsb")
TASK_CHOICES = GLUE_TASKS + ("ag_news", "trec", "anli", "snli")
METHODS = ("scal", "ft", "adv", "cl")


# =========================================================================================
# Arguments (defaults: the paper's BERT-base GLUE setting, Sec. 4.1)
# =========================================================================================
@dataclass
class Args:
    """SCAL (and its ft / +AT / +CL baselines) for sentence(-pair) classification."""

    # -- run
    exp_name: str = arg("", "run directory name (default: method__task__setting__seed__time)")
    seed: int = arg(0, "random seed (initialisation of the heads, data order, dropout)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    precision: str = arg("auto", "auto (bf16 on CUDA if supported, fp16 on older GPUs; on CPU bf16 if it has "
                         "native bf16, else fp32), fp32, bf16, fp16",
                         choices=["auto", "fp32", "bf16", "fp16"])
    deterministic: bool = arg(False, "deterministic kernels (CUDA: slower) and one CPU thread: bit-identical reruns")
    data_dir: str = arg("", "folder of the offline text data (default: $LIS_SHARED_DATA, ./data, ../shared/data)")
    source: str = arg("auto", "where data comes from: local files, the HF hub, or auto (local when present)",
                      choices=list(text_data.SOURCES))
    out_dir: str = arg("runs", "parent of the run directory")
    track: bool = arg(False, "also write TensorBoard events to <run>/tb")
    resume: str = arg("", "run directory to continue from its last checkpoint; its own"
                      " arguments are used, except --max-steps when given")
    max_steps: int | None = arg(None, "stop after this many optimizer steps (default: no limit)")
    skip_nonfinite: bool = arg(False, "skip a step whose loss is NaN or infinite (no update; counted in metrics.jsonl "
                               "and summary.json) instead of stopping the run with exit code 4")
    limit_train: int | None = arg(None, "train on a fixed random subset of this many examples (see --subset-seed)")
    subset_seed: int = arg(0, "seed of the --limit-train subset (fixed across --seed, so seeds share the data)")
    limit_eval: int | None = arg(None, "evaluate on the first N examples of each evaluation split (default: all)")
    preset: str | None = arg(None, "named group of settings, applied before the other flags")
    # -- task and model
    task: str = arg("rte", "task: GLUE, ag_news, trec (coarse, error rate), anli (rounds A1-A3), snli",
                    choices=list(TASK_CHOICES))
    train_tasks: list[str] = arg([], "train on the union of these tasks' train splits (same labels; default: --task)")
    train_split: str = arg("train", "split to train on (local AG News has only dev and test: --train-split dev)")
    model: str = arg("bert-base-uncased", "encoder: HF hub name, local directory, minilm-l6 / e5-small (offline "
                     "wheels) or tiny (random 2-layer BERT, for smoke runs only)")
    max_length: int = arg(128, "maximum tokens per example (pairs: longest-first truncation)", ge=8)
    # -- method
    method: str = arg("scal", "scal, ft (fine-tuning), adv (+AT: adversarial CE only), cl (+CL: contrastive only)",
                      choices=list(METHODS))
    attack: str = arg("fgm", "perturbation: fgm (Eq. 6, eps * g/||g||_2 per example) or fgsm (Eq. 2, eps * sign g)",
                      choices=["fgm", "fgsm"])
    epsilon: float = arg(0.3, "perturbation size (paper: searched in {0.1, ..., 0.5}, per-task value not given)")
    alpha: float = arg(0.5, "weight of the contrastive term in Eq. 8 (paper: 'less than one', value not given)")
    tau: float = arg(0.05, "temperature of the InfoNCE (Eq. 7)", gt=0)
    ct_denominator: str = arg("adv", "Eq. 7 denominator: adv (sum over z_k^adv, our reading) or anchor (literal z_k)",
                              choices=["adv", "anchor"])
    cl_positive: str = arg("dropout", "positive of --method cl: dropout (second pass, SimCSE) or adv "
                           "(adversarial view)", choices=["dropout", "adv"])
    # -- optimisation
    epochs: int = arg(15, "maximum training epochs (with early stopping)")
    batch_size: int = arg(32, "batch size (paper: 32 with BERT, 16 with RoBERTa)")
    lr: float = arg(3e-5, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = arg(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = arg(0.1, "fraction of the planned steps with linear warm-up, then linear decay to 0", lt=1)
    max_grad_norm: float = arg(1.0, "clip the gradient norm (0: no clipping)")
    patience: int = arg(3, "stop after this many evaluations without improvement (0: never stop early)", ge=0)
    eval_every: int = arg(0, "evaluate every N steps (0: at the end of every epoch)", ge=0)
    eval_batch_size: int = arg(64, "batch size for evaluation")
    # -- robustness evaluation
    robust_eval: bool = arg(True, "also evaluate under a white-box attack on the input embeddings (adv_ metrics)")
    robust_attack: str = arg("same", "attack of the robustness evaluation: same (as --attack), fgm or fgsm",
                             choices=["same", "fgm", "fgsm"])
    robust_epsilon: float | None = arg(None, "epsilon of the robustness evaluation (default: --epsilon)")


PRESETS = {
    "roberta-base": {"_doc": "RoBERTa-base, batch 16 (Sec. 4.1)", "model": "roberta-base", "batch_size": 16},
    "anli-bert-large": {"_doc": "Table 7: BERT-large trained on MNLI + SNLI, evaluated on ANLI, batch 32",
                        "model": "bert-large-uncased", "task": "anli", "train_tasks": ["mnli", "snli"],
                        "batch_size": 32, "epochs": 3},
    "anli-roberta-large": {"_doc": "Table 7: RoBERTa-large trained on MNLI + SNLI, evaluated on ANLI, batch 32",
                           "model": "roberta-large", "task": "anli", "train_tasks": ["mnli", "snli"],
                           "batch_size": 32, "epochs": 3},
    "cpu": {"_doc": "CPU-scale protocol for the single-sentence tasks (CoLA, SST-2, TREC): MiniLM-L6 (offline), "
                    "fixed 2,000-example training subset, 3 epochs, best of the 3 evaluations (the CPU suite adds "
                    "--lr 1e-4 --epochs 5 on CoLA, and --epsilon 0.1 for its adversarial runs: "
                    "benchmarks/suites.py says why)",
            "model": "minilm-l6", "source": "local", "limit_train": 2000, "epochs": 3, "patience": 0},
    "cpu-pairs": {"_doc": "CPU-scale protocol for the pair tasks (RTE, MRPC): as cpu with an 800-example subset and "
                          "the first 1,000 evaluation pairs (MRPC's MSR test has 1,725)",
                  "model": "minilm-l6", "source": "local", "limit_train": 800, "epochs": 3, "patience": 0,
                  "limit_eval": 1000},
    "smoke": {"_doc": "a tiny random BERT, 64-example subset, 3 steps: checks that everything runs",
              "model": "tiny", "source": "local", "limit_train": 64, "limit_eval": 64, "epochs": 1, "max_steps": 3,
              "batch_size": 16, "max_length": 64},
}


def validate(args: Args) -> None:
    """Check the values argparse cannot; each failure is one line naming the flag. check_args (types and
    bounds of every field) also covers a --resume run's args.json and Args built in code."""
    utils.check_args(args)
    if args.method in ("scal", "cl") and args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: the contrastive term needs >= 2 (in-batch negatives)")
    for t in args.train_tasks:
        if t not in text_data.TASKS:
            raise UsageError(f"--train-tasks {t}: allowed are {', '.join(TASK_CHOICES)}")
        if text_data.label_names(t) != text_data.label_names(args.task):
            raise UsageError(f"--train-tasks {t}: its labels {text_data.label_names(t)} differ from --task "
                             f"{args.task}'s {text_data.label_names(args.task)}")
    for t in args.train_tasks or [args.task]:
        if args.train_split not in text_data.task_splits(t):
            raise UsageError(f"--train-split {args.train_split}: {t} has the splits "
                             f"{', '.join(text_data.task_splits(t))}")


# =========================================================================================
# Metrics: GLUE's official ones, in percent (scikit-learn's; scipy's correlations); 0 on an empty set
# =========================================================================================
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


#: Headline metric per task (the paper's Tables 1 and 5); everything else reports accuracy.
PRIMARY_METRIC = {"cola": "mcc", "mrpc": "f1", "stsb": "spearman", "trec": "err"}
#: The metric the best evaluation is chosen by (higher is better): TREC's error -> accuracy.
SELECT_METRIC = {"trec": "acc"}


def task_metrics(task: str, pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """The official metrics of `task` from predictions (class ids, or scores for STS-B)."""
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


# =========================================================================================
# Data: examples -> token ids, batches with dynamic padding (tokenizer.pad)
# =========================================================================================
@dataclass
class EvalSet:
    """One evaluation split: tokenized examples, gold labels, the metric-name suffix
    ("" for the selection split, "_mm" for MNLI mismatched) and optional groups (ANLI rounds)."""

    name: str
    suffix: str
    encoded: list[dict]
    gold: np.ndarray
    groups: np.ndarray | None = None


def local_copy_present(task: str, split: str, data_dir: Path) -> bool:
    files = text_data.LOCAL_FILES.get(task, {}).get(split, ())
    return bool(files) and all((data_dir / f).exists() for f in files)


def evaluation_splits(args: Args, data_dir: Path) -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """[(name, metric suffix, [splits to concatenate])] for model selection, and the test
    splits evaluated once with the best checkpoint ([] when the paper reports none)."""
    task = args.task
    if task == "mnli":
        return [("dev_matched", "", ["dev_matched"]), ("dev_mismatched", "_mm", ["dev_mismatched"])], []
    if task == "anli":
        return [("dev", "", [f"dev_r{r}" for r in (1, 2, 3)])], [f"test_r{r}" for r in (1, 2, 3)]
    if task in ("trec", "ag_news"):
        return [("test", "", ["test"])], []  # Table 5 reports test; no dev split
    if task == "mrpc" and args.source != "hub" and local_copy_present("mrpc", "train", data_dir):
        return [("test", "", ["test"])], []  # the MSR release: no dev split (see docstring)
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


def load_task(args: Args, data_dir: Path, record: dict | None = None):
    """Training examples, evaluation splits and test splits as lists of text_data.Example.
    A missing data set raises MissingError (one line) here, before anything is written.
    `record`, when given, receives what defines the data (the run saves it as data_subsets.json):
    the training subset's indices into the (concatenated, labelled) training split, and the
    number of examples used of each evaluation split."""
    train = []
    for t in args.train_tasks or [args.task]:
        train += text_data.load_text_task(t, args.train_split, data_dir, args.source)
    train = [e for e in train if not (isinstance(e.label, int) and e.label < 0)]
    n_all = len(train)
    keep = None
    if args.limit_train:
        if args.limit_train > n_all:
            raise UsageError(f"--limit-train {args.limit_train}: {args.task} {args.train_split} has only "
                             f"{n_all} examples")
        keep = np.sort(np.random.default_rng(args.subset_seed).permutation(n_all)[: args.limit_train])
        train = [train[i] for i in keep]
    eval_spec, test_splits = evaluation_splits(args, data_dir)
    evals = []
    for name, suffix, splits in eval_spec:
        parts = [text_data.load_text_task(args.task, s, data_dir, args.source) for s in splits]
        evals.append((name, suffix, parts))
    tests = [text_data.load_text_task(args.task, s, data_dir, args.source) for s in test_splits]
    if record is not None:
        def used(splits, parts):  # evaluation: the first --limit-eval examples of each split
            return {s: {"n_all": len(p), "first": min(len(p), args.limit_eval or len(p))}
                    for s, p in zip(splits, parts)}

        record["train"] = {"tasks": args.train_tasks or [args.task], "split": args.train_split, "source": args.source,
                           "n_all": n_all, "subset_seed": args.subset_seed if keep is not None else None,
                           "indices": keep.tolist() if keep is not None else None}
        record["eval"] = {name: used(splits, parts) for (name, _, splits), (_, _, parts) in zip(eval_spec, evals)}
        record["test"] = used(test_splits, tests)
    return train, evals, ([("test", "", tests)] if tests else [])


def make_eval_sets(specs: list, tokenizer, args: Args) -> list[EvalSet]:
    """Tokenize each evaluation split; a split made of several parts (ANLI rounds) keeps the
    part of each example as its group, for per-round metrics (acc_r1 ...)."""
    out = []
    for name, suffix, parts in specs:
        examples, groups = [], []
        for g, part in enumerate(parts):
            part = part[: args.limit_eval] if args.limit_eval else part
            examples += part
            groups += [g + 1] * len(part)
        if any(isinstance(e.label, int) and e.label < 0 for e in examples):
            raise MissingError(f"{args.task} {name}: this split has no labels; it cannot be evaluated")
        out.append(EvalSet(name, suffix, encode_examples(tokenizer, examples, args.max_length),
                           np.array([e.label for e in examples]), np.array(groups) if len(parts) > 1 else None))
    return out


# =========================================================================================
# Model: encoder, classifier on [CLS], pooler on [CLS] for the contrastive term
# =========================================================================================
class SCALModel(nn.Module):
    """h = encoder(x_emb)[CLS]; logits = Linear(dropout(h)); z = tanh(Linear(h)) (Sec. 4.1).

    The forward takes the input embeddings (not ids), so that the training step can perturb
    them; `embed(input_ids)` looks them up in the encoder's (shared) embedding matrix."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.dropout = nn.Dropout(getattr(cfg, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.pooler = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh())
        for lin in (self.classifier, self.pooler[0]):  # the encoder's own initialisation of new heads
            nn.init.normal_(lin.weight, std=getattr(cfg, "initializer_range", 0.02))
            nn.init.zeros_(lin.bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.get_input_embeddings()(input_ids)

    def forward(self, embeds: torch.Tensor, batch: dict, with_z: bool = True):
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        h = self.encoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **extra).last_hidden_state[:, 0]
        logits = self.classifier(self.dropout(h)).float()
        return logits, (self.pooler(h).float() if with_z else None)


def load_model(args: Args, train_texts: list[str]):
    """(encoder, tokenizer): `tiny` builds a random 2-layer BERT whose WordPiece vocabulary
    is trained on the training texts; anything else goes through common.text_models."""
    if args.model == "tiny":
        return tiny_encoder(train_texts, hidden=64, layers=2, heads=2, max_length=max(args.max_length, 16),
                            seed=args.seed)
    return load_encoder(args.model)


# =========================================================================================
# The method: CE (Eq. 5), perturbations (Eq. 2 and 6), InfoNCE (Eq. 7), total (Eq. 8)
# =========================================================================================
def task_loss_eq5(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 5: cross-entropy for classification; squared error for the regression task STS-B."""
    if labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels, reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def fgm_perturbation_eq6(grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 6 (FGM): delta_i = eps * g_i / ||g_i||_2, the norm over example i's whole
    [length, hidden] gradient. A zero gradient gives a zero perturbation. Detached."""
    g = grad.detach().float()
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
    return (epsilon * g / norm).to(grad.dtype)


def fgsm_perturbation_eq2(grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 2 (FGSM): delta = eps * sign(g), coordinate-wise (max-norm eps). Detached."""
    return epsilon * grad.detach().sign()


def adversarial_perturbation(loss: torch.Tensor, embeds: torch.Tensor, attack: str, epsilon: float) -> torch.Tensor:
    """delta for `embeds` from the gradient of `loss` with respect to them (the graph is kept
    for the backward pass of the total loss; no parameter gradient is computed here)."""
    (grad,) = torch.autograd.grad(loss, embeds, retain_graph=True)
    return fgm_perturbation_eq6(grad, epsilon) if attack == "fgm" else fgsm_perturbation_eq2(grad, epsilon)


def infonce_eq7(z: torch.Tensor, z_pos: torch.Tensor, tau: float, denominator: str = "adv") -> torch.Tensor:
    """Eq. 7: mean_i -log( exp(sim(z_i, z+_i)/tau) / sum_k exp(sim(z_i, d_k)/tau) ), sim = cosine.

    denominator "adv" (our reading): d_k = z+_k, the positives of the batch (the other
    adversarial views are the negatives), as in the generic Eq. 4. "anchor" (literal): d_k =
    z_k, the clean vectors of the batch (k = i included)."""
    # fp32 on purpose, autocast off (it would run the matmul in bf16 even on fp32 inputs): a softmax over
    # cosine similarities divided by tau 0.05 turns bf16's rounding (~4e-3) into ~0.08 in the logits
    with torch.autocast(z.device.type, enabled=False):
        z, z_pos = F.normalize(z.float(), dim=-1), F.normalize(z_pos.float(), dim=-1)
        pos = (z * z_pos).sum(-1) / tau
        other = z_pos if denominator == "adv" else z
        return (torch.logsumexp(z @ other.t() / tau, dim=1) - pos).mean()


def scal_total_eq8(ce: torch.Tensor, ce_adv: torch.Tensor, l_ct: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 8: 0.5 * (L_ce(x) + L_ce(x_adv)) + alpha * L_ct(x, x_adv)."""
    return 0.5 * (ce + ce_adv) + alpha * l_ct


# =========================================================================================
# One training step per method: (model, batch, args) -> (loss, terms). Call them inside
# utils.autocast(...) and call loss.backward() after; that is all the training loop does.
# =========================================================================================
def ft_step(model: SCALModel, batch: dict, args: Args):
    """Baseline: plain fine-tuning, CE on the clean input."""
    logits, _ = model(model.embed(batch["input_ids"]), batch, with_z=False)
    ce = task_loss_eq5(logits, batch["labels"])
    return ce, {"ce": ce}


def adv_step(model: SCALModel, batch: dict, args: Args):
    """Ablation "+AT": 0.5 * (CE(x) + CE(x_adv)), no contrastive term."""
    x = model.embed(batch["input_ids"])
    logits, _ = model(x, batch, with_z=False)
    ce = task_loss_eq5(logits, batch["labels"])
    delta = adversarial_perturbation(ce, x, args.attack, args.epsilon)
    logits_adv, _ = model(x + delta, batch, with_z=False)
    ce_adv = task_loss_eq5(logits_adv, batch["labels"])
    return 0.5 * (ce + ce_adv), {"ce": ce, "ce_adv": ce_adv}


def cl_step(model: SCALModel, batch: dict, args: Args):
    """Ablation "+CL": CE(x) + alpha * InfoNCE(z, z+), z+ from a second dropout pass of x
    (`--cl-positive dropout`) or from the adversarial view, without its CE (`adv`)."""
    x = model.embed(batch["input_ids"])
    logits, z = model(x, batch)
    ce = task_loss_eq5(logits, batch["labels"])
    if args.cl_positive == "adv":
        delta = adversarial_perturbation(ce, x, args.attack, args.epsilon)
        _, z_pos = model(x + delta, batch)
    else:
        _, z_pos = model(x, batch)  # same input, another dropout mask
    l_ct = infonce_eq7(z, z_pos, args.tau, args.ct_denominator)
    return ce + args.alpha * l_ct, {"ce": ce, "l_ct": l_ct}


def scal_step(model: SCALModel, batch: dict, args: Args):
    """SCAL (Eq. 5-8): CE on x, FGM/FGSM view of the input embeddings, CE on it, InfoNCE
    between the pooled clean and adversarial [CLS] vectors."""
    x = model.embed(batch["input_ids"])
    logits, z = model(x, batch)
    ce = task_loss_eq5(logits, batch["labels"])
    delta = adversarial_perturbation(ce, x, args.attack, args.epsilon)
    logits_adv, z_adv = model(x + delta, batch)
    ce_adv = task_loss_eq5(logits_adv, batch["labels"])
    l_ct = infonce_eq7(z, z_adv, args.tau, args.ct_denominator)
    return scal_total_eq8(ce, ce_adv, l_ct, args.alpha), {"ce": ce, "ce_adv": ce_adv, "l_ct": l_ct}


STEPS = {"ft": ft_step, "adv": adv_step, "cl": cl_step, "scal": scal_step}


# =========================================================================================
# Evaluation: clean predictions and predictions under a white-box attack
# =========================================================================================
def predict(model: SCALModel, encoded: list[dict], args: Args, device, amp_dtype, tokenizer, regression: bool,
            attack: str = "", epsilon: float = 0.0) -> np.ndarray:
    """Predicted class ids (scores for regression) in the order of `encoded`, with the model in
    eval mode. With `attack`, each example's input embeddings are first perturbed along the
    gradient of its own loss w.r.t. them (true label), as in training but without dropout."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))  # less padding
    out = np.zeros(len(encoded), dtype=np.float64 if regression else np.int64)
    for s in range(0, len(order), args.eval_batch_size):
        idx = order[s: s + args.eval_batch_size]
        batch = collate([encoded[i] for i in idx], tokenizer, device, regression)
        with torch.no_grad():
            x = model.embed(batch["input_ids"])
        if attack:
            with torch.enable_grad(), utils.autocast(device, amp_dtype):
                x = x.detach().requires_grad_(True)
                logits, _ = model(x, batch, with_z=False)
                # summed, so that every example's gradient is its own loss's gradient
                x = x + adversarial_perturbation(task_loss_eq5(logits, batch["labels"], "sum"), x, attack, epsilon)
        with torch.no_grad(), utils.autocast(device, amp_dtype):
            logits, _ = model(x.detach(), batch, with_z=False)
        pred = logits.squeeze(-1) if regression else logits.argmax(-1)
        out[idx] = pred.cpu().numpy()
    model.train()
    return out


def evaluate(model: SCALModel, sets: list[EvalSet], args: Args, device, amp_dtype, tokenizer) -> dict:
    """Official metrics on every evaluation set (suffix per set, per-group for ANLI rounds),
    clean and (with --robust-eval) under attack (prefix adv_)."""
    regression = args.task in text_data.REGRESSION_TASKS
    runs = [("", "", 0.0)]
    if args.robust_eval:
        eps = args.epsilon if args.robust_epsilon is None else args.robust_epsilon
        runs.append(("adv_", args.attack if args.robust_attack == "same" else args.robust_attack, eps))
    out: dict[str, float] = {}
    for ev in sets:
        for prefix, attack, eps in runs:
            pred = predict(model, ev.encoded, args, device, amp_dtype, tokenizer, regression, attack, eps)
            out |= {f"{prefix}{k}{ev.suffix}": v for k, v in task_metrics(args.task, pred, ev.gold).items()}
            if ev.groups is not None:
                for g in np.unique(ev.groups):
                    sel = ev.groups == g
                    out |= {f"{prefix}{k}{ev.suffix}_r{g}": v
                            for k, v in task_metrics(args.task, pred[sel], ev.gold[sel]).items()}
    return out


# =========================================================================================
# Training
# =========================================================================================
def make_optimizer(model: nn.Module, args: Args, total_steps: int):
    """AdamW, no weight decay on biases and LayerNorm weights; linear warm-up, linear decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    # transformers' schedule (as in the HF Trainer): lr rises linearly from 0 over the warm-up steps,
    # then falls linearly to 0 at `total_steps`.
    return opt, get_linear_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch, in length-grouped batches, a function of (seed, epoch) only: a
    resumed run sees the same batches as an uninterrupted one."""
    return text_data.length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch))


def setting_name(args: Args) -> str:
    model = Path(args.model).name
    if args.method == "ft":
        return model
    s = f"{model}_{args.attack}{args.epsilon:g}"
    return s + (f"_a{args.alpha:g}" if args.method in ("scal", "cl") else "")


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "step", "history", "best", "bad_evals",
                   "stopped_early", "wall_s", "train_s", "samples")


def main(args: Args) -> dict:
    validate(args)
    resume = None
    if args.resume:  # continue a run: its own arguments, its directory, its last checkpoint (None: start over)
        # the run's own arguments; only the step limit may change, when given with --resume (as in lacol.py)
        given = {"max_steps": args.max_steps} if "max_steps" in utils.flags_given(args) else {}
        args, resume = utils.resume_run(Args, args.resume, {"resume": args.resume, **given})
        validate(args)
        if resume is not None:
            utils.require_keys(resume, CHECKPOINT_KEYS, args.resume)
    else:
        utils.check_out_dir(args.out_dir)
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)
    data_dir = utils.resolve_text_data_dir(args.data_dir)
    regression = args.task in text_data.REGRESSION_TASKS
    num_labels = 1 if regression else len(text_data.label_names(args.task))

    # ---- data and model (before the run directory exists: a failure here writes nothing)
    data_record: dict = {}
    train_ex, eval_specs, test_specs = load_task(args, data_dir, data_record)
    if args.batch_size > len(train_ex):
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(train_ex)} training examples")
    encoder, tokenizer = load_model(args, [t for e in train_ex for t in (e.text_a, e.text_b) if t])
    train_enc = encode_examples(tokenizer, train_ex, args.max_length)
    eval_sets = make_eval_sets(eval_specs, tokenizer, args)
    test_sets = make_eval_sets(test_specs, tokenizer, args)
    model = SCALModel(encoder, num_labels).to(device).train()

    steps_per_epoch = len(train_enc) // args.batch_size  # drop_last: every batch has negatives
    total_steps = args.epochs * steps_per_epoch
    opt, sched = make_optimizer(model, args, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    step_fn = STEPS[args.method]
    primary = PRIMARY_METRIC.get(args.task, "acc")
    select = SELECT_METRIC.get(args.task, primary)

    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = utils.make_run_dir(args.out_dir, utils.run_name(args.method, args.task, setting_name(args),
                                                                  args.seed, args.exp_name))
        utils.atomic_write_json(run_dir / "args.json", dataclasses.asdict(args))
    step, history, best, bad_evals, wall_before, train_time, samples = 0, [], None, 0, 0.0, 0.0, 0
    sums: dict[str, float] = {}  # training-loss sums since the last evaluation
    skipped = 0  # --skip-nonfinite: steps left out
    if resume is not None:
        with utils.restoring(run_dir):
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            utils.set_rng_state(resume["rng"])
        step, history, best, bad_evals = resume["step"], resume["history"], resume["best"], resume["bad_evals"]
        wall_before, train_time, samples = resume["wall_s"], resume["train_s"], resume["samples"]
        sums, skipped = dict(resume.get("sums", {})), resume.get("skipped_nonfinite", 0)
    else:  # a new run, or one that stopped before its first checkpoint (it starts over)
        utils.atomic_write_json(run_dir / "data_subsets.json", data_record)
    metrics = utils.MetricsWriter(run_dir, args.track)
    if args.resume:
        metrics.resume(resume, step)
        print(f"resuming {run_dir} at step {step}" if resume is not None else
              f"resuming {run_dir}: it stopped before its first checkpoint, so it starts over")
    print(f"run: {run_dir}  |  {args.method} on {args.task} ({len(train_enc)} train, "
          f"{', '.join(f'{e.name} {len(e.gold)}' for e in eval_sets)})  |  model {args.model}  |  device {device}, "
          f"precision {amp_dtype or 'fp32'}")

    t_start = time.time()

    def checkpoint() -> None:
        utils.save_checkpoint(run_dir, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng": utils.rng_state(), "step": step, "history": history,
            "best": best, "bad_evals": bad_evals, "stopped_early": args.patience > 0 and bad_evals >= args.patience,
            "wall_s": wall_before + time.time() - t_start, "train_s": train_time, "samples": samples,
            "sums": sums, "skipped_nonfinite": skipped, "metrics_lines": metrics.lines})

    def interrupted() -> None:
        """Ctrl-C / SIGTERM: checkpoint this step (the data order is a function of the epoch, so a
        run resumes in the middle of one), say how to continue, exit 130."""
        checkpoint()
        print(f"\ninterrupted at step {step}; checkpoint saved. Resume with: python scal.py --resume {run_dir}",
              flush=True)
        sys.exit(utils.EXIT_INTERRUPTED)

    def evaluate_and_checkpoint(epoch: float) -> bool:
        """Evaluate, log, keep the best, checkpoint. Returns True when early stopping fires."""
        nonlocal best, bad_evals, sums
        res = evaluate(model, eval_sets, args, device, amp_dtype, tokenizer)
        train_log = {k: v / sums["n"] for k, v in sums.items() if k != "n"} if sums.get("n") else {}
        sums = {}
        rec = {"step": step, "epoch": epoch, **res}
        history.append(rec)
        improved = best is None or res[select] > best[select]
        if improved:
            best, bad_evals = dict(rec), 0
            if test_sets:  # the best-dev weights, for the test evaluation at the end
                utils.atomic_torch_save(model.state_dict(), run_dir / "best_model.pt")
        else:
            bad_evals += 1
        if args.skip_nonfinite:
            train_log["skipped_nonfinite"] = skipped
        metrics.write(step, eval_sets[0].name, epoch=epoch, **res, lr=sched.get_last_lr()[0], **train_log)
        tqdm.write(f"step {step:6d}  epoch {epoch:5.2f}  {select} {res[select]:6.2f}  best {best[select]:6.2f}"
                   + (f"  adv_{select} {res['adv_' + select]:6.2f}" if "adv_" + select in res else "")
                   + "".join(f"  {k} {v:.4f}" for k, v in train_log.items()))
        checkpoint()
        return args.patience > 0 and bad_evals >= args.patience

    stop = utils.StopFlag()
    stopped_early = bool(resume and resume["stopped_early"])  # a finished run resumes to its summary
    last_eval_step = history[-1]["step"] if history else -1
    with stop:
        start_epoch = args.epochs if stopped_early else step // steps_per_epoch
        for epoch in range(start_epoch, args.epochs):
            order = epoch_order([len(e["input_ids"]) for e in train_enc], args.batch_size, args.seed, epoch)
            first = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       dynamic_ncols=True, disable=None)
            for b in bar:
                t0 = time.time()
                idx = order[b * args.batch_size: (b + 1) * args.batch_size]
                batch = collate([train_enc[i] for i in idx], tokenizer, device, regression)
                with utils.autocast(device, amp_dtype):
                    loss, terms = step_fn(model, batch, args)
                finite = utils.check_finite(loss, step, terms, args.skip_nonfinite)
                if finite:
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if args.max_grad_norm > 0:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    scaler.step(opt)
                    scaler.update()
                else:  # --skip-nonfinite: no backward pass, no update (the schedule moves on with the data)
                    skipped += 1
                sched.step()
                step += 1
                samples += len(idx)
                train_time += time.time() - t0
                if finite:
                    for k, v in {"loss": loss, **terms}.items():
                        sums[k] = sums.get(k, 0.0) + v.item()
                    sums["n"] = sums.get("n", 0) + 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if args.eval_every and step % args.eval_every == 0:  # also when interrupted: it is due here
                    last_eval_step = step
                    stopped_early = evaluate_and_checkpoint(step / steps_per_epoch)
                if stop or stopped_early or (args.max_steps and step >= args.max_steps):
                    break
            at_end = bool(args.max_steps and step >= args.max_steps) or epoch == args.epochs - 1
            if stop and step < (epoch + 1) * steps_per_epoch and not (args.max_steps and step >= args.max_steps) \
                    and not stopped_early:
                interrupted()  # in the middle of an epoch: no epoch-end evaluation yet
            if step != last_eval_step and (not args.eval_every or at_end):  # every epoch, and the last step
                last_eval_step = step
                stopped_early = evaluate_and_checkpoint(step / steps_per_epoch)
            if stop:
                interrupted()
            if stopped_early or (args.max_steps and step >= args.max_steps):
                break
    metrics.close()

    # ---- the paper's test numbers (ANLI): the best-dev checkpoint on the test split
    test = None
    if test_sets and best is not None:
        model.load_state_dict(torch.load(run_dir / "best_model.pt", map_location=device, weights_only=True))
        test = evaluate(model, test_sets, args, device, amp_dtype, tokenizer)
        test["step"] = best["step"]

    wall = wall_before + time.time() - t_start
    last = history[-1]
    summary = {
        "script": "scal.py", "method": args.method, "dataset": args.task, "setting": setting_name(args),
        "seed": args.seed, "model": args.model, "primary_metric": primary, "select_metric": select,
        "final": {k: v for k, v in last.items() if k != "epoch"},
        "best": {k: v for k, v in best.items() if k != "epoch"},
        "test": test, "n_train": len(train_enc), "steps": step, "evaluations": len(history),
        "stopped_early": stopped_early, "wall_s": round(wall, 2),
        "samples_per_s": round(samples / max(train_time, 1e-9), 2),  # training steps only, without evaluation
        "skipped_nonfinite_steps": skipped,
    }
    utils.write_summary(run_dir, summary)
    print(f"done: {primary} last {last[primary]:.2f}  best {best[primary]:.2f} (step {best['step']})"
          + (f"  test {test[primary]:.2f}" if test else "") + f"  ->  {run_dir}/summary.json")
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
