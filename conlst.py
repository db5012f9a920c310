"""CoNLST: Contrastive Negative Learning and Self-Training for zero-shot cross-lingual transfer.

Docs: docs/conlst.md
Paper: "Improving Cross-lingual Transfer with Contrastive Negative Learning and Self-training"
(../shared/papers/conlst.txt). One file, top to bottom: arguments, data, back-translation,
model, the method's losses and samplers (plain functions named after their equations), the
per-step computations, the three stages, evaluation and the confidence diagnostics, main.

Training batches are length-grouped (common.text_data.length_grouped_order: sorted by length within
seeded mega-batches of 50 batches, the batches shuffled), so padding wastes little compute;
evaluation runs in length order and restores the original order.

    python conlst.py --bt file --bt-file bt.tsv         # mBERT, MultiNLI -> 15 XNLI languages (GPU, downloads;
                                                       #   el and bg need precomputed back-translations)
    python conlst.py --preset xlmr --langs fr de sw    # XLM-R-large (Table 2), three languages, mBART-50 BT
    python conlst.py --lang fr --wo-clcs               # one ablation row (Table 3): w/o L_CLCS
    python conlst.py --wo-conl --wo-st --langs all     # the zero-shot baseline (stage 0 only)
    python conlst.py --preset cpu --lang fr            # CPU scale: e5-small, SNLI -> XNLI fr (~15 min, 2 cores)
    python conlst.py --preset cpu --lang sw --stage0-from runs/<an earlier cpu run, same seed>

The pipeline (one run: stage 0 once, then stages 1 and 2 for every target language, each
language starting again from the same stage-0 model):

  stage 0   fine-tune encoder + classifier on English labeled NLI (the paper's zero-shot
            baseline; trained once per seed, saved as stage0.pt and reusable with --stage0-from)
  stage 1   CoNL. Pseudo-label the unlabeled target pool with the stage-0 model (confidence q).
            Eq. 4  complementary label: a class other than argmax q when max q >= gamma,
                   else argmin q
            Eq. 5  negatives: K samples of the high-confidence pool (max q >= gamma) of the
                   whole target set whose pseudo-label is the anchor's complementary label
            Eq. 6  L_CL: anchor and its second dropout pass against the negatives, similarity =
                   minus the squared Euclidean distance of a linear contrastive head, / tau
            Eq. 7  L_CLCS: negative learning (Eq. 1) on a source batch, complementary label drawn
                   anew each step
            Eq. 8  L_CoNL = L_CL + lambda * L_CLCS (lambda = 0.001); Adam, 1 epoch, lr 2e-6
  stage 2   self-training, once per iteration: hard pseudo-labels of the pool from the current
            model, FlexMatch class-wise thresholds, one strong view per selected sample
            (back-translation, random token masking, or mixup of sentence embeddings with
            Beta(4, 4) soft labels, Eq. 9-11), then one pass of
            Eq. 12-14  L_SSL = CE(source batch) + lambda_u * CE(target views)

Readings and choices (README "paper vs. code" has the full table; "ours" = not in the paper):
- Eq. 4: for max q >= gamma the paper writes the SET {c != argmax q}; default samples one
  class of it per step (`--comp-label sample`), the whole set is `--comp-label all` (then
  Eq. 5 draws negatives of any of those classes and Eq. 1 sums over them). gamma = 0.9
  (ours: the edge of Table 4's high-confidence bin).
- Eq. 5: K = 8 (ours). Independent draws per anchor (`--neg-sharing anchor`, literal);
  `--neg-sharing batch` draws one K-set per complementary label per batch, which every
  anchor of that label uses (each anchor still gets K uniform samples of the right class;
  at most C*K instead of B*K negative passes per batch; the CPU preset uses it). Fewer than K candidates: all of
  them (masked, no duplicates); none: the anchor's L_CL term is 0 (counted as no_neg_frac).
  Negatives are encoded in the same forward pass as the anchors (dropout on, with gradient).
- Eq. 6: the numerator pairs the anchor with its own second dropout pass (the text's
  z_i/z_i is a typo); /tau on every term, positive in the denominator; s = -||a-b||^2
  (Prototypical Networks), `--distance euclidean` for ||a-b||. tau = 1 (ours: Snell et al.
  use none). The contrastive head is Linear(hidden, hidden) (size ours) on the pooled output,
  separate from the classifier; its output is not normalized (`--con-normalize` does).
- Eq. 7: read as the mean of L_NL, minimized (the outer minus sign would maximize it).
- Stage 1 updates the classifier only through L_CLCS. `--wo-cl` replaces L_CL by Eq. 1's
  negative learning on the target with the Eq. 4 complementary labels (L_CLCS kept).
- Eq. 14: hard pseudo-labels (argmax), as the text says; the soft q in the formula is not used.
  The pool is pseudo-labeled in eval mode (no dropout) once per iteration (ours).
- FlexMatch (ours, its defaults): base threshold 0.95, T_c = 0.95 * M(beta_c),
  M(x) = x / (2 - x), beta_c = sigma_c / max(max_c sigma_c, #unused) with warm-up
  (/ max_c sigma_c without); sigma_c counts pool samples whose latest prediction above 0.95
  was class c (FlexMatch's selected_label memory, kept across iterations).
- Strong views: each selected sample gets ONE augmentation per iteration, drawn uniformly
  among those enabled (back-translation only where a translation exists). Masking ratio 0.15
  (ours: BERT's), subword tokens, special tokens and the e5 "query:" prefix kept. Mixup mixes a
  sample's pooled embedding with that of a random other sample of the batch, lambda per sample.
  Back-translation: target -> English -> target (pivot ours; French for English targets) with
  mBART-50 many-to-many, greedy decoding (ours), cached to a TSV file; or --bt-file. mBART-50
  has no Greek or Bulgarian: those need --bt-file (the paper used Google Translate).
- Stage 0 (ours; the paper copies its baselines): AdamW, lr 2e-5, weight decay 0.01, 10%
  linear warm-up then linear decay, 2 epochs, batch 32, max length 128, gradient clipping at 1.0
  (all stages), best epoch on English dev. Stage 2 (ours): Adam, lr = stage 0's, 3 iterations,
  batch 32 target + 32 source.
- Model selection uses English dev only (zero-shot: no target labels). Every stage hands on its
  best-English-dev checkpoint (`--handoff last`: its last one); a language's reported "best" is
  the best-English-dev evaluation of the pipeline's last stage, "final" its last evaluation.
- Pooling: the encoder's pooler when it has one (mBERT, XLM-R, as BertForSequenceClassification),
  else mean pooling (e5-small, with the "query: " prefix on the premise: the E5 convention).
- Protocol (ours; the paper only says 7,500 dev+test examples per language): unlabeled pool =
  the target's XNLI dev split, evaluation = its test split. CPU preset: source = SNLI dev+test,
  pool = target XNLI test (no labels in that file), evaluation = target XNLI dev, selection =
  English XNLI dev, multilingual-e5-small with frozen word embeddings, back-translation OFF.
- Diagnostics (Table 4, Figure 3): pseudo-label accuracy per confidence bin after stages 0, 1
  and 2, on the pool when its gold labels exist (paper scale), else on the evaluation set (CPU
  scale). Target gold labels are read ONLY by `load_pool_gold_labels_for_analysis_only` and
  used only in `analysis_only_confidence_bins`; training and selection never see them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common import text_data, utils
from common.text_data import XNLI_LANGS, Example, hub_unavailable_reason, load_text_task
from common.text_models import default_cache_dir, load_encoder, mean_pool, tiny_encoder
from common.utils import MissingError, UsageError, arg

NUM_CLASSES = 3  # entailment, neutral, contradiction (XNLI, MultiNLI and SNLI share the order)


# =========================================================================================
# Arguments (defaults: the paper's mBERT setting, Table 1)
# =========================================================================================
@dataclass
class Args:
    """CoNLST: zero-shot cross-lingual NLI with contrastive negative learning and self-training."""

    # -- run
    exp_name: str = arg("", "run directory name (default: method__xnli__source-langs__seed__time)")
    seed: int = arg(0, "random seed (subsets, initialisation, data order, sampling)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    precision: str = arg("auto", "auto (bf16 on CUDA if supported, fp16 on older GPUs; on CPU bf16 if it has "
                         "native bf16, else fp32), fp32, bf16, fp16",
                         choices=["auto", "fp32", "bf16", "fp16"])
    deterministic: bool = arg(False, "ask PyTorch for deterministic kernels (CUDA: slower)")
    data_dir: str = arg("", "folder of the offline text data (default: $LIS_SHARED_DATA, ./data, ../shared/data)")
    data_source: str = arg("auto", "auto: local files where present, else the HF hub (labelled copies are "
                           "fetched from the hub when a local split has no labels); local; hub",
                           choices=["auto", "local", "hub"])
    out_dir: str = arg("runs", "parent of the run directory")
    track: bool = arg(False, "also write TensorBoard events to <run>/tb")
    resume: str = arg("", "run directory to continue from its last checkpoint (any stage, any language); its own"
                      " arguments are used, except --max-steps when given")
    max_steps: int | None = arg(None, "cap on optimizer steps per training pass (each stage-0 epoch, stage-1 "
                                "epoch and stage-2 iteration); for smoke tests. Default: no cap")
    skip_nonfinite: bool = arg(False, "skip a step whose loss is NaN or infinite (no update; counted in metrics.jsonl "
                               "and summary.json) instead of stopping the run with exit code 4")
    limit_train: int | None = arg(None, "random subset of this many labeled source pairs (default: all)")
    limit_pool: int | None = arg(None, "random subset of this many unlabeled target pairs (same rows in every "
                                 "language; default: all)")
    limit_eval: int | None = arg(None, "fixed random subset of this many pairs of the evaluation and the "
                                 "English selection sets (the same for every seed; default: all)")
    preset: str | None = arg(None, "named group of settings, applied before the other flags")
    # -- protocol
    lang: str = arg("", "one target language (XNLI code); short for --langs LANG and takes precedence")
    langs: list[str] = arg(["all"], "target languages (XNLI codes), or 'all' for the 15; stage 0 is trained "
                           "once and reused for each")
    source_task: str = arg("mnli", "labeled English source: mnli (MultiNLI, the paper) or snli (CPU scale)",
                           choices=["mnli", "snli"])
    source_splits: list[str] = arg(["train"], "source splits, concatenated (snli locally: dev test)")
    pool_split: str = arg("dev", "XNLI split of the target language used as unlabeled pool (labels dropped)",
                          choices=["dev", "test"])
    eval_split: str = arg("test", "XNLI split of the target language that is evaluated", choices=["dev", "test"])
    select_lang: str = arg("en", "language of the model-selection set (English: zero-shot)")
    select_split: str = arg("dev", "XNLI split of the model-selection set", choices=["dev", "test"])
    stage0_from: str = arg("", "reuse a stage-0 model: a run directory holding stage0.pt, or the file itself "
                           "(skips stage 0; the model must match --model)")
    # -- ablations (Table 3, one flag per row) and pipeline switches
    wo_st: bool = arg(False, "Table 3 'w/o self-training': stages 0 and 1 only (CoNL only)")
    wo_cl: bool = arg(False, "Table 3 'w/o contrastive learning': stage 1 uses negative learning with "
                      "cross-entropy (Eq. 1 on the target, Eq. 4 labels) instead of L_CL")
    wo_clcs: bool = arg(False, "Table 3 'w/o L_clcs': lambda = 0 in Eq. 8")
    wo_mixup: bool = arg(False, "Table 3 'w/o mixup': stage 2 without mixup views")
    wo_bt: bool = arg(False, "Table 3 'w/o back-translation': stage 2 without back-translated views")
    wo_conl: bool = arg(False, "skip stage 1 (stage 2 directly on the stage-0 model; not a Table 3 row). "
                        "With --wo-st: the zero-shot baseline")
    handoff: str = arg("best", "model a stage hands to the next: its best-English-dev checkpoint or its last",
                       choices=["best", "last"])
    # -- model
    model: str = arg("bert-base-multilingual-cased", "encoder: HF hub name or local directory, e5-small "
                     "(offline multilingual-e5-small), or tiny (random 2-layer model for smoke tests)")
    pooling: str = arg("auto", "sentence vector: auto (the encoder's pooler if it has one, else mean), pooler, "
                       "cls, mean", choices=["auto", "pooler", "cls", "mean"])
    text_prefix: str = arg("auto", "prefix of the premise: auto ('query: ' for e5-small, else none), none, or "
                           "the text itself")
    max_length: int = arg(128, "max tokens per pair (premise + hypothesis)")
    freeze_embeddings: bool = arg(False, "freeze the word-embedding matrix (CPU preset: speed; also leaves the "
                                  "target-language embeddings as pretrained)")
    classifier_dropout: float = arg(0.1, "dropout before the classifier (BertForSequenceClassification's)", lt=1)
    con_dim: int = arg(0, "output size of the linear contrastive head theta_con (0: hidden size)", ge=0)
    max_grad_norm: float = arg(1.0, "gradient-norm clipping in every stage (0: off)")
    eval_batch_size: int = arg(128, "batch size of prediction passes (evaluation, pseudo-labeling)")
    # -- stage 0 (ours: conventional fine-tuning)
    s0_epochs: int = arg(2, "stage 0: epochs over the source data")
    s0_lr: float = arg(2e-5, "stage 0: AdamW learning rate (peak)", gt=0)
    s0_batch_size: int = arg(32, "stage 0: batch size")
    s0_weight_decay: float = arg(0.01, "stage 0: AdamW weight decay")
    s0_warmup: float = arg(0.1, "stage 0: fraction of steps of linear warm-up (then linear decay to 0)", lt=1)
    s0_eval_every: int = arg(0, "stage 0: evaluate every N steps (0: once per epoch)", ge=0)
    # -- stage 1 (CoNL)
    s1_epochs: int = arg(1, "stage 1: epochs over the target pool (paper: 1)")
    s1_lr: float = arg(2e-6, "stage 1: Adam learning rate (paper: 2e-6 mBERT, 5e-6 XLM-R)", gt=0)
    s1_batch_size: int = arg(32, "stage 1: anchors per step (not given in the paper)")
    s1_source_batch_size: int = arg(32, "stage 1: source pairs per step for L_CLCS (N in Eq. 7; not given)")
    s1_eval_every: int = arg(0, "stage 1: evaluate every N steps (0: at the end of each epoch)", ge=0)
    gamma: float = arg(0.9, "Eq. 4/5 confidence threshold gamma (not given; Table 4's high bin edge)", gt=0, le=1)
    k_neg: int = arg(8, "Eq. 5: negatives per anchor K (not given)")
    tau: float = arg(1.0, "Eq. 6 temperature (not given; Prototypical Networks use none, i.e. 1)", gt=0)
    distance: str = arg("sqeuclidean", "Eq. 6 distance: squared Euclidean (Snell et al.) or Euclidean",
                        choices=["sqeuclidean", "euclidean"])
    con_normalize: bool = arg(False, "L2-normalize the contrastive head's output before the distance")
    comp_label: str = arg("sample", "Eq. 4 for max q >= gamma: sample one class != argmax q, or use all of them",
                          choices=["sample", "all"])
    neg_sharing: str = arg("anchor", "Eq. 5 draws: independent per anchor, or one set per complementary label "
                           "per batch", choices=["anchor", "batch"])
    lambda_clcs: float = arg(1e-3, "Eq. 8 lambda (paper: 0.001)")
    # -- stage 2 (self-training)
    s2_iterations: int = arg(3, "stage 2: self-training iterations (pseudo-label, select, one pass; not given)")
    s2_lr: float = arg(2e-5, "stage 2: Adam learning rate (not given; ours: stage 0's)", gt=0)
    s2_batch_size: int = arg(32, "stage 2: target views per step")
    s2_source_batch_size: int = arg(32, "stage 2: source pairs per step (l_sup, Eq. 13)")
    lambda_u: float = arg(1.0, "Eq. 12 weight of the target loss (paper: 1); 0 = a source-only control")
    flex_threshold: float = arg(0.95, "FlexMatch base threshold (FlexMatch's default)", gt=0, le=1)
    flex_mapping: str = arg("convex", "FlexMatch mapping M: convex x/(2-x) or linear x", choices=["convex", "linear"])
    flex_warmup: bool = arg(True, "FlexMatch threshold warm-up (unused samples count in the normalizer)")
    mask_ratio: float = arg(0.15, "random masking: probability of masking each token (not given)", lt=1)
    mixup_alpha: float = arg(4.0, "Eq. 11 Beta(alpha, alpha) (paper: 4)", gt=0)
    bt: str = arg("mbart", "back-translations from: mbart (mBART-50, computed once and cached), file (--bt-file), "
                  "off", choices=["mbart", "file", "off"])
    bt_file: str = arg("", "precomputed back-translations: TSV lines 'original<TAB>back-translation' (any languages)")
    bt_model: str = arg("facebook/mbart-large-50-many-to-many-mmt", "translation model for --bt mbart")
    bt_pivot: str = arg("en", "pivot language of back-translation (for a target equal to it: fr)")
    bt_cache_dir: str = arg("", "where mBART back-translations are cached (default: ~/.cache/lis/backtranslation)")
    bt_batch_size: int = arg(32, "sentences per mBART generation batch")
    keep_models: bool = arg(False, "keep every language's stage-1 and stage-2 models (stage1_LANG.pt, "
                            "stage2_LANG.pt; large); stage0.pt is always kept")


PRESETS = {
    "xlmr": {"_doc": "paper XLM-R-large (Table 2): stage-1 lr 5e-6; stage 0/2 lr 7e-6 (ours)",
             "model": "xlm-roberta-large", "s1_lr": 5e-6, "s0_lr": 7e-6, "s2_lr": 7e-6},
    "cpu": {"_doc": "CPU scale (~15 min per language and seed on 2 idle cores in fp32, stage 0 included; stage 0 "
                    "took 1.8x less in bf16): e5-small, SNLI "
                    "dev+test (3,000 pairs) -> XNLI test pool (800, no labels), eval on XNLI dev (1,000), selection on "
                    "English XNLI dev (1,000), no back-translation; gamma 0.45: this stage-0 model's max q rarely "
                    "exceeds 0.55 (XNLI-fr: 26 of 1,000 pairs above 0.5, none above 0.6), so 0.9 leaves stage 1 "
                    "without negatives; 0.45 keeps its most confident ~15%",
            "model": "e5-small", "langs": ["fr"], "source_task": "snli", "source_splits": ["dev", "test"],
            "pool_split": "test", "eval_split": "dev", "limit_train": 3000, "limit_pool": 800, "limit_eval": 1000,
            "freeze_embeddings": True, "s0_epochs": 1, "s0_lr": 5e-5, "s1_lr": 5e-6, "s2_lr": 5e-5, "gamma": 0.45,
            "s1_source_batch_size": 8, "neg_sharing": "batch", "s2_iterations": 2, "s2_source_batch_size": 16,
            "bt": "off"},
    "smoke": {"_doc": "seconds: tiny random model, a few hundred pairs, every stage (for tests)",
              "model": "tiny", "pooling": "mean", "langs": ["fr"], "source_task": "snli", "source_splits": ["dev"],
              "pool_split": "test", "eval_split": "dev", "limit_train": 64, "limit_pool": 96, "limit_eval": 96,
              "max_length": 64, "s0_epochs": 4, "s0_warmup": 0.0, "s0_lr": 3e-3, "s0_batch_size": 16, "s1_lr": 1e-4,
              "s1_batch_size": 16, "s1_source_batch_size": 8, "k_neg": 4, "s2_iterations": 2, "s2_lr": 1e-3,
              "s2_batch_size": 16, "s2_source_batch_size": 16, "bt": "off", "eval_batch_size": 64},
}


def resolve_langs(args: Args) -> list[str]:
    langs = [args.lang] if args.lang else list(args.langs)
    if langs == ["all"]:
        return list(XNLI_LANGS)
    return langs


def validate(args: Args) -> None:
    """Check the values argparse cannot; each failure is one line naming the flag. check_args (types and
    bounds of every field) also covers a --resume run's args.json and Args built in code."""
    utils.check_args(args)
    langs = resolve_langs(args)
    if not langs:
        raise UsageError("--langs: give at least one XNLI language, or 'all'")
    for lang in langs + [args.select_lang]:
        if lang not in XNLI_LANGS:
            flag = "--select-lang" if lang == args.select_lang and lang not in langs else \
                "--lang" if args.lang else "--langs"
            raise UsageError(f"{flag} {lang}: allowed are {', '.join(XNLI_LANGS)} (or 'all' for --langs)")
    if len(set(langs)) != len(langs):
        raise UsageError(f"--langs {' '.join(langs)}: a language is listed twice")
    if args.pool_split == args.eval_split:
        raise UsageError(f"--pool-split {args.pool_split}: equals --eval-split; the unlabeled pool must not be "
                         "the evaluation set")
    if args.source_task == "snli" and not set(args.source_splits) <= {"dev", "test", "train"}:
        raise UsageError(f"--source-splits {' '.join(args.source_splits)}: snli has train, dev, test")
    if args.wo_conl and (args.wo_cl or args.wo_clcs):
        raise UsageError("--wo-conl: skips stage 1, so --wo-cl / --wo-clcs have nothing to act on")
    if args.wo_st and (args.wo_mixup or args.wo_bt):
        raise UsageError("--wo-st: skips stage 2, so --wo-mixup / --wo-bt have nothing to act on")
    if args.bt == "file" and not args.bt_file:
        raise UsageError("--bt file: needs --bt-file PATH (TSV 'original<TAB>back-translation')")
    if args.bt_file and args.bt != "file":
        raise UsageError(f"--bt-file: given with --bt {args.bt}; use --bt file")
    if args.bt_pivot not in MBART50_CODES and args.bt == "mbart":
        raise UsageError(f"--bt-pivot {args.bt_pivot}: allowed are {', '.join(MBART50_CODES)}")
    if args.pooling == "pooler" and args.model == "e5-small":
        raise UsageError("--pooling pooler: e5-small has no pooler weights; use mean (its convention) or cls")


def stages_of(args: Args) -> list[int]:
    """The stages a target language goes through after stage 0."""
    return [s for s, off in ((1, args.wo_conl), (2, args.wo_st)) if not off]


def method_name(args: Args) -> str:
    if args.wo_conl and args.wo_st:
        return "zeroshot"
    name = "conlst"
    for flag in ("wo_st", "wo_cl", "wo_clcs", "wo_mixup", "wo_bt", "wo_conl"):
        if getattr(args, flag):
            name += "_" + flag
    return name


def bt_enabled(args: Args) -> bool:
    return 2 in stages_of(args) and not args.wo_bt and args.bt != "off"


# =========================================================================================
# Data: labeled English source, unlabeled target pool, target evaluation set, English
# selection set. Examples are (premise, hypothesis, label); the pool keeps no labels.
# =========================================================================================
@dataclass
class TargetData:
    lang: str
    pool: list[tuple[str, str]]  # unlabeled: what stages 1 and 2 train on
    eval: list[Example]  # labelled: evaluation only
    bt: dict[str, str] | None = None  # back-translation of each pool sentence (where available)


def _data_dir(args: Args) -> Path | None:
    return Path(args.data_dir) if args.data_dir else None


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _note(record: dict | None, key: str, what: str, n_all: int, idx: np.ndarray) -> None:
    """Put a subset into `record` (saved as data_subsets.json): its indices into the split(s),
    None when every example is used."""
    if record is not None:
        record[key] = {"data": what, "n_all": n_all, "indices": None if len(idx) == n_all else idx.tolist()}


def load_labelled(args: Args, task: str, split: str) -> list[Example]:
    """A labelled split; with --data-source auto, a local copy without labels (local XNLI test)
    is replaced by the hub's labelled copy."""
    ex = load_text_task(task, split, _data_dir(args), args.data_source)
    if any(e.label == -1 for e in ex):
        if args.data_source == "auto":
            ex = load_text_task(task, split, _data_dir(args), "hub")
        else:
            raise MissingError(f"{task} {split}: this copy has no labels (the local XNLI test files have none); "
                               "use --data-source auto/hub on a machine with network, or --eval-split dev")
    return ex


def load_source(args: Args, record: dict | None = None) -> list[Example]:
    ex: list[Example] = []
    for split in args.source_splits:
        ex += [e for e in load_text_task(args.source_task, split, _data_dir(args), args.data_source) if e.label >= 0]
    idx = _subset(len(ex), args.limit_train, args.seed)
    _note(record, "source", f"{args.source_task} {'+'.join(args.source_splits)} (labelled pairs)", len(ex), idx)
    return [ex[i] for i in idx]


def load_eval_set(args: Args, lang: str, split: str, record: dict | None = None, key: str = "") -> list[Example]:
    ex = load_labelled(args, f"xnli-{lang}", split)
    idx = _subset(len(ex), args.limit_eval, 12345)  # fixed: same subset for every seed
    _note(record, key or f"eval_{lang}", f"xnli-{lang} {split}", len(ex), idx)
    return [ex[i] for i in idx]


def load_pool(args: Args, lang: str, record: dict | None = None) -> list[tuple[str, str]]:
    """The unlabeled target pool: premise/hypothesis only. XNLI is parallel across languages, so
    the same rows are taken in every language."""
    ex = load_text_task(f"xnli-{lang}", args.pool_split, _data_dir(args), args.data_source)
    idx = _subset(len(ex), args.limit_pool, args.seed)
    _note(record, f"pool_{lang}", f"xnli-{lang} {args.pool_split} (labels dropped)", len(ex), idx)
    return [(ex[i].text_a, ex[i].text_b) for i in idx]


def load_pool_gold_labels_for_analysis_only(args: Args, lang: str) -> torch.Tensor | None:
    """READS TARGET GOLD LABELS. For the confidence diagnostics (Table 4, Figure 3) only: the
    labels of the pool rows, or None where the pool split has none (local XNLI test, CPU scale).
    Nothing that trains or selects a model calls this."""
    ex = load_text_task(f"xnli-{lang}", args.pool_split, _data_dir(args), args.data_source)
    gold = [ex[i].label for i in _subset(len(ex), args.limit_pool, args.seed)]
    return None if any(y == -1 for y in gold) else torch.tensor(gold)


# =========================================================================================
# Back-translation (stage 2's first strong augmentation): target -> pivot -> target with
# mBART-50 many-to-many, computed once per (model, language, pivot) and cached as TSV.
# =========================================================================================
MBART50_CODES = {"ar": "ar_AR", "de": "de_DE", "en": "en_XX", "es": "es_XX", "fr": "fr_XX", "hi": "hi_IN",
                 "ru": "ru_RU", "sw": "sw_KE", "th": "th_TH", "tr": "tr_TR", "ur": "ur_PK", "vi": "vi_VN",
                 "zh": "zh_CN"}  # XNLI languages that mBART-50 covers: no el, no bg


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def read_translations(path: str | Path) -> dict[str, str]:
    """A TSV of 'original<TAB>translation' lines (tabs and newlines inside a text are spaces)."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"--bt-file {path}: not found (expected TSV lines 'original<TAB>back-translation')")
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        src, sep, tgt = line.partition("\t")
        if not sep or "\t" in tgt:
            raise MissingError(f"{path}:{i}: expected 'original<TAB>back-translation'")
        out[_clean(src)] = _clean(tgt)
    return out


def write_translations(path: str | Path, mapping: dict[str, str]) -> None:
    utils.atomic_write_text(path, "".join(f"{_clean(s)}\t{_clean(t)}\n" for s, t in mapping.items()))


def mbart_translator(model_name: str, device: torch.device, batch_size: int, max_length: int) -> Callable:
    """translate(texts, src_lang, tgt_lang) -> texts, with mBART-50 many-to-many (greedy decoding).
    Loaded on first use; offline and not cached it fails with one line."""
    state: dict[str, Any] = {}

    def load():
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        offline = hub_unavailable_reason() is not None
        try:
            state["tok"] = AutoTokenizer.from_pretrained(model_name, local_files_only=offline)
            model = AutoModelForSeq2SeqLM.from_pretrained(model_name, local_files_only=offline)
            state["model"] = model.to(device).eval()
        except (OSError, ValueError) as e:
            why = f"the hub is {hub_unavailable_reason()}" if offline else str(e).splitlines()[0][:150]
            raise MissingError(f"back-translation model {model_name}: could not be loaded ({why}); run once with "
                               "network to cache it, or give --bt file --bt-file PATH, or --bt off") from None

    @torch.no_grad()
    def translate(texts: list[str], src: str, tgt: str) -> list[str]:
        if not state:
            load()
        tok, model = state["tok"], state["model"]
        tok.src_lang = MBART50_CODES[src]
        out = []
        for i in tqdm(range(0, len(texts), batch_size), desc=f"mBART {src}->{tgt}", leave=False, disable=None):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length).to(device)
            gen = model.generate(**enc, forced_bos_token_id=tok.convert_tokens_to_ids(MBART50_CODES[tgt]),
                                 num_beams=1, do_sample=False, max_new_tokens=max_length)
            out += tok.batch_decode(gen, skip_special_tokens=True)
        return out

    return translate


def back_translate(sentences: list[str], lang: str, pivot: str, translate: Callable,
                   cache_file: Path | None) -> dict[str, str]:
    """{sentence: back-translation} for every sentence, lang -> pivot -> lang; already cached
    sentences are not translated again, and the cache is rewritten (atomically) when it grew."""
    cached = read_translations(cache_file) if cache_file is not None and cache_file.is_file() else {}
    todo = sorted({_clean(s) for s in sentences} - set(cached))
    if todo:
        there = translate(todo, lang, pivot)
        back = translate(there, pivot, lang)
        cached.update({s: _clean(b) for s, b in zip(todo, back)})
        if cache_file is not None:
            write_translations(cache_file, cached)
    return cached


def load_backtranslations(args: Args, lang: str, pool: list[tuple[str, str]], device: torch.device,
                          translator: Callable | None = None) -> dict[str, str]:
    """Back-translations of the pool's sentences (keys: whitespace-normalised originals)."""
    sentences = [s for pair in pool for s in pair]
    if args.bt == "file":
        return read_translations(args.bt_file)
    if lang not in MBART50_CODES:
        raise MissingError(f"back-translation ({lang}): mBART-50 does not cover this language (the paper used "
                           "Google Translate); give precomputed ones with --bt file --bt-file PATH, or use --wo-bt")
    pivot = args.bt_pivot if lang != args.bt_pivot else "fr"
    cache_dir = Path(args.bt_cache_dir) if args.bt_cache_dir else default_cache_dir() / "backtranslation"
    cache_file = cache_dir / f"{args.bt_model.replace('/', '__')}.{lang}.via-{pivot}.tsv"
    translate = translator or mbart_translator(args.bt_model, device, args.bt_batch_size, args.max_length)
    return back_translate(sentences, lang, pivot, translate, cache_file)


def bt_pair(bt: dict[str, str] | None, pair: tuple[str, str]) -> tuple[str, str] | None:
    """The back-translated pair, or None when either sentence has no translation."""
    if not bt:
        return None
    a, b = bt.get(_clean(pair[0])), bt.get(_clean(pair[1]))
    return (a, b) if a and b else None


# =========================================================================================
# Model: multilingual encoder, pooled sentence vector, classifier theta_cl and contrastive
# head theta_con (both linear, on the pooled output)
# =========================================================================================
class CoNLSTModel(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str, con_dim: int, dropout: float):
        super().__init__()
        hidden = encoder.config.hidden_size
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, NUM_CLASSES)  # theta_cl
        self.con_head = nn.Linear(hidden, con_dim or hidden)  # theta_con (Sec. 3.2)

    def pool(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.encoder(**enc)
        if self.pooling == "pooler":
            return out.pooler_output
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]
        return mean_pool(out.last_hidden_state, enc["attention_mask"])

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))

    def forward(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(self.pool(enc))


def build_model(args: Args, tiny_texts: list[str]):
    """(model, tokenizer, premise prefix). Hub names and e5-small through common.text_models;
    `tiny`: a random 2-layer BERT whose tokenizer is trained on the run's own texts."""
    if args.model == "tiny":
        encoder, tok = tiny_encoder(tiny_texts, hidden=32, layers=2, heads=2, vocab_size=3000,
                                    max_length=args.max_length, seed=args.seed)
    else:
        encoder, tok = load_encoder(args.model)
    pooling = args.pooling
    if pooling == "auto":
        pooling = "pooler" if getattr(encoder, "pooler", None) is not None else "mean"
    if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
        raise UsageError(f"--pooling pooler: {args.model} has no pooler; use mean or cls")
    prefix = {"auto": "query: " if args.model == "e5-small" else "", "none": ""}.get(args.text_prefix, args.text_prefix)
    model = CoNLSTModel(encoder, pooling, args.con_dim, args.classifier_dropout)
    if args.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    if tok.mask_token_id is None and 2 in stages_of(args):
        raise UsageError(f"--model {args.model}: its tokenizer has no mask token, which random masking needs")
    return model, tok, prefix


def frozen_keys(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without frozen parameters (they equal the pretrained weights): a frozen
    e5-small embedding matrix is 96M of its 117M parameters."""
    skip = frozen_keys(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in skip}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    emb = {n for n, p in model.named_parameters() if p is model.encoder.get_input_embeddings().weight}
    if unexpected or set(missing) - emb:
        raise MissingError(f"{what}: does not fit this model (missing {sorted(set(missing) - emb)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")


# =========================================================================================
# The method: Eq. 4 (complementary labels), Eq. 5 (negatives), Eq. 6 (L_CL), Eq. 1 and 7
# (negative learning, L_CLCS), FlexMatch thresholds, random masking, mixup (Eq. 9-11)
# =========================================================================================
def complementary_labels_eq4(probs: torch.Tensor, gamma: float, mode: str = "sample") -> torch.Tensor:
    """Eq. 4 as a [N, C] bool mask of complementary classes. max q >= gamma: the classes other
    than argmax q (mode all), or one of them drawn uniformly (mode sample); max q < gamma:
    argmin q."""
    n, c = probs.shape
    conf, pred = probs.max(dim=1)
    high = conf >= gamma
    out = F.one_hot(probs.argmin(dim=1), c).bool()  # low-confidence branch
    if mode == "all":
        others = ~F.one_hot(pred, c).bool()
    else:
        shift = torch.randint(1, c, (n,), device=probs.device)  # uniform over the c-1 other classes
        others = F.one_hot((pred + shift) % c, c).bool()
    return torch.where(high[:, None], others, out)


def high_confidence_pool_eq5(probs: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The high-confidence samples of the whole target set: (indices, pseudo-labels)."""
    conf, pred = probs.max(dim=1)
    idx = torch.nonzero(conf >= gamma).squeeze(1)
    return idx, pred[idx]


def sample_negatives_eq5(comp_mask: torch.Tensor, pool_idx: torch.Tensor, pool_label: torch.Tensor, k: int,
                         sharing: str = "anchor") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: for anchor i, K samples of the high-confidence pool whose pseudo-label is one of
    i's complementary classes, uniformly without replacement.

    comp_mask [B, C] bool; pool_idx [P] target-set indices; pool_label [P]. Returns
    (idx [B, K] target-set indices, valid [B, K]): where fewer than K candidates exist all of
    them are taken and the other slots are invalid. sharing: anchor (independent draws) or
    batch (one draw per distinct complementary-label row, shared by the anchors that have it)."""
    b, p = comp_mask.shape[0], pool_idx.numel()
    if p == 0:
        return torch.zeros(b, k, dtype=torch.long), torch.zeros(b, k, dtype=torch.bool)
    allowed = comp_mask[:, pool_label]  # [B, P]
    if sharing == "batch":
        rows, inverse = torch.unique(comp_mask, dim=0, return_inverse=True)
        scores = torch.rand(rows.shape[0], p)[inverse]
    else:
        scores = torch.rand(b, p)
    scores = scores.masked_fill(~allowed, -1.0)  # disallowed sort last
    kk = min(k, p)
    top, j = scores.topk(kk, dim=1)
    idx, valid = pool_idx[j], top >= 0
    if kk < k:
        idx = torch.cat([idx, idx.new_zeros(b, k - kk)], 1)
        valid = torch.cat([valid, valid.new_zeros(b, k - kk)], 1)
    return idx, valid


def similarity_eq6(a: torch.Tensor, b: torch.Tensor, distance: str = "sqeuclidean") -> torch.Tensor:
    """s(a, b) = -||a - b||^2 (Prototypical Networks), or -||a - b||; over the last dimension."""
    d2 = (a - b).pow(2).sum(-1)
    return -d2 if distance == "sqeuclidean" else -(d2 + 1e-12).sqrt()


def contrastive_negative_loss_eq6(h_anchor: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor,
                                  neg_valid: torch.Tensor, tau: float, distance: str = "sqeuclidean") -> torch.Tensor:
    """L_CL = mean_i -log( e^{s(h_i, h_i')/tau} / (e^{s(h_i, h_i')/tau} + sum_{j in N_i} e^{s(h_i, h_j)/tau}) ).

    h_anchor, h_pos [B, D] (two dropout passes of the anchors); h_neg [B, K, D]; invalid
    negatives are left out (an anchor with none contributes 0)."""
    # fp32 on purpose (also under bf16 autocast): squared distances and their softmax need the mantissa
    pos = similarity_eq6(h_anchor.float(), h_pos.float(), distance) / tau  # [B]
    neg = similarity_eq6(h_anchor.float()[:, None, :], h_neg.float(), distance) / tau  # [B, K]
    neg = neg.masked_fill(~neg_valid, float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos).mean()


def negative_learning_loss_eq1(logits: torch.Tensor, comp_mask: torch.Tensor) -> torch.Tensor:
    """L_NL = -sum_k ybar_k log(1 - p_k), averaged over samples; ybar = comp_mask (one or more
    complementary classes). log(1 - p_k) = logsumexp_{j != k} l_j - logsumexp_j l_j (stable)."""
    logits = logits.float()
    c = logits.shape[1]
    eye = torch.eye(c, dtype=torch.bool, device=logits.device)
    others = logits[:, None, :].expand(-1, c, -1).masked_fill(eye, float("-inf"))  # [N, k, j]
    log_one_minus_p = torch.logsumexp(others, dim=2) - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(comp_mask.float() * log_one_minus_p).sum(dim=1).mean()


def random_complementary_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sec. 3.1: a class drawn uniformly among those other than the given one, as a [N, C] mask."""
    shift = torch.randint(1, num_classes, labels.shape, device=labels.device)
    return F.one_hot((labels + shift) % num_classes, num_classes).bool()


def clcs_loss_eq7(source_logits: torch.Tensor, source_labels: torch.Tensor) -> torch.Tensor:
    """L_CLCS = (1/N) sum_i L_NL(f(x_i^s), ybar_i), ybar_i drawn anew at every call (Eq. 7 read
    as a quantity to minimize)."""
    return negative_learning_loss_eq1(source_logits, random_complementary_labels(source_labels, source_logits.shape[1]))


def flexmatch_update_memory(memory: torch.Tensor, max_probs: torch.Tensor, preds: torch.Tensor,
                            base: float) -> torch.Tensor:
    """FlexMatch's selected_label: a sample's class is updated whenever its confidence reaches the
    base threshold, and kept otherwise (-1: never reached it)."""
    return torch.where(max_probs >= base, preds, memory)


def flexmatch_thresholds(memory: torch.Tensor, num_classes: int, base: float, warmup: bool = True,
                         mapping: str = "convex") -> torch.Tensor:
    """Class-wise thresholds T_c = base * M(beta_c), beta_c = sigma_c / max(max_c sigma_c, #unused)
    with warm-up (sigma_c / max_c sigma_c without), sigma_c = #{i: memory_i = c}; M(x) = x/(2-x)
    (convex) or x. Nothing learnt yet: beta = 0, i.e. T_c = 0 (as FlexMatch's start)."""
    sigma = torch.bincount(memory[memory >= 0], minlength=num_classes).float()
    denom = sigma.max()
    if warmup:
        denom = torch.maximum(denom, (memory < 0).sum().float())
    beta = sigma / denom if denom > 0 else torch.zeros_like(sigma)
    return base * (beta / (2.0 - beta) if mapping == "convex" else beta)


def select_confident_eq14(max_probs: torch.Tensor, preds: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Eq. 14's indicator with class-wise thresholds: max q_i >= T_{argmax q_i}."""
    return max_probs >= thresholds[preds]


def random_token_masking(input_ids: torch.Tensor, maskable: torch.Tensor, ratio: float, mask_id: int) -> torch.Tensor:
    """Each maskable token (not special, not padding, not the prefix) becomes the mask token
    with probability `ratio`."""
    hit = (torch.rand(input_ids.shape) < ratio).to(input_ids.device) & maskable
    return torch.where(hit, torch.full_like(input_ids, mask_id), input_ids)


def sample_mixup_lambda_eq11(n: int, alpha: float) -> torch.Tensor:
    """Eq. 11: lambda ~ Beta(alpha, alpha), one per sample."""
    return torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((n,))


def mixup_eq9_10(x_i: torch.Tensor, x_j: torch.Tensor, y_i: torch.Tensor, y_j: torch.Tensor,
                 lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9-10: x~ = lam x_i + (1-lam) x_j, y~ = lam y_i + (1-lam) y_j (lam [B], rows mixed)."""
    lx, ly = lam.to(x_i.dtype)[:, None], lam.to(y_i.dtype)[:, None]
    return lx * x_i + (1 - lx) * x_j, ly * y_i + (1 - ly) * y_j


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """H(y, p) = -sum_k y_k log p_k, averaged over rows (targets may be soft)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


# =========================================================================================
# Batches and the per-step computations. Each *_step(model, batch, args) -> (loss, terms)
# is one training step's forward and loss on a ready batch (tensors on the device), so a
# benchmark can time the method against its baseline on the same batch (see time_steps).
# =========================================================================================
def tokenize_pairs(tok, pairs: list[tuple[str, str]], prefix: str, max_length: int,
                   maskable: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize (premise, hypothesis) pairs, padded to the longest; with `maskable`, also the
    [N, T] bool mask of tokens random masking may replace (not special, not the prefix)."""
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


def to_device(enc: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in enc.items()}


def rows(enc: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in enc.items()}


def make_ft_batch(ctx: "Ctx", examples: list[Example]) -> dict:
    """A labeled source batch."""
    enc = tokenize_pairs(ctx.tok, [(e.text_a, e.text_b) for e in examples], ctx.prefix, ctx.args.max_length)
    return {"src": to_device(enc, ctx.device), "src_labels": torch.tensor([e.label for e in examples], device=ctx.device)}


def ft_step(model: CoNLSTModel, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """Plain fine-tuning (stage 0, and the baseline of the stage-1 speed ratio): CE on source."""
    loss = F.cross_entropy(model(batch["src"]).float(), batch["src_labels"])
    return loss, {"l_ce": loss.detach()}


def make_conl_batch(ctx: "Ctx", anchor_pairs: list[tuple[str, str]], comp_mask: torch.Tensor,
                    neg_idx: torch.Tensor, neg_valid: torch.Tensor, source: list[Example]) -> dict:
    """Anchors and their unique negatives tokenized together (one padding); neg_pos [B, K] points
    at the negatives' rows after the anchors."""
    pool = ctx.target.pool
    uniq = torch.unique(neg_idx[neg_valid]) if neg_valid.any() else torch.zeros(0, dtype=torch.long)
    neg_pos = torch.searchsorted(uniq, neg_idx).clamp(max=max(len(uniq) - 1, 0)) if len(uniq) else torch.zeros_like(neg_idx)
    enc = tokenize_pairs(ctx.tok, anchor_pairs + [pool[i] for i in uniq.tolist()], ctx.prefix, ctx.args.max_length)
    batch = {"tgt": to_device(enc, ctx.device), "n_anchor": len(anchor_pairs),
             "neg_pos": neg_pos.to(ctx.device), "neg_valid": neg_valid.to(ctx.device),
             "comp_mask": comp_mask.to(ctx.device)}
    if source:
        batch.update(make_ft_batch(ctx, source))
    return batch


def conl_step(model: CoNLSTModel, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """Stage 1: L_CoNL = L_CL + lambda * L_CLCS (Eq. 8). One encoder pass over [anchors,
    anchors again (the second dropout view), negatives]. --wo-cl: Eq. 1 on the anchors instead."""
    b, tgt = batch["n_anchor"], batch["tgt"]
    n_rows = tgt["input_ids"].shape[0]
    terms: dict[str, torch.Tensor] = {}
    if args.wo_cl:  # negative learning with cross-entropy on the target's complementary labels
        terms["l_nl"] = negative_learning_loss_eq1(model(rows(tgt, torch.arange(b, device=tgt["input_ids"].device))),
                                                   batch["comp_mask"])
        loss = terms["l_nl"]
    else:
        dev = tgt["input_ids"].device
        order = torch.cat([torch.arange(b, device=dev), torch.arange(b, device=dev), torch.arange(b, n_rows, device=dev)])
        h = model.con_head(model.pool(rows(tgt, order))).float()
        if args.con_normalize:
            h = F.normalize(h, dim=-1)
        h_anchor, h_pos, h_negs = h[:b], h[b:2 * b], h[2 * b:]
        h_neg = h_negs[batch["neg_pos"]] if h_negs.shape[0] else h.new_zeros(b, batch["neg_pos"].shape[1], h.shape[1])
        terms["l_cl"] = contrastive_negative_loss_eq6(h_anchor, h_pos, h_neg, batch["neg_valid"], args.tau, args.distance)
        terms["no_neg_frac"] = (~batch["neg_valid"].any(1)).float().mean()
        loss = terms["l_cl"]
    if not args.wo_clcs and "src" in batch:
        terms["l_clcs"] = clcs_loss_eq7(model(batch["src"]), batch["src_labels"])
        loss = loss + args.lambda_clcs * terms["l_clcs"]
    return loss, {k: v.detach() for k, v in terms.items()}


def make_st_batch(ctx: "Ctx", pairs: list[tuple[str, str]], kinds: list[str], labels: list[int],
                  source: list[Example]) -> dict:
    """Stage 2: one strong view per target sample: 'bt' (the back-translated pair), 'mask'
    (random token masking) or 'mixup' (the original text; its pooled vector is mixed in the
    step with a random other sample of the batch, lambda ~ Beta(alpha, alpha))."""
    args = ctx.args
    view_pairs = [bt_pair(ctx.target.bt, p) if k == "bt" else p for p, k in zip(pairs, kinds)]
    enc = tokenize_pairs(ctx.tok, view_pairs, ctx.prefix, args.max_length, maskable=True)
    to_mask = torch.tensor([k == "mask" for k in kinds])
    masked = random_token_masking(enc["input_ids"], enc.pop("maskable") & to_mask[:, None], args.mask_ratio,
                                  ctx.tok.mask_token_id)
    enc["input_ids"] = masked
    b = len(pairs)
    is_mixup = torch.tensor([k == "mixup" for k in kinds])
    partner = (torch.arange(b) + torch.randint(1, max(b, 2), (b,))) % b if b > 1 else torch.zeros(1, dtype=torch.long)
    batch = {"tgt": to_device(enc, ctx.device), "tgt_labels": torch.tensor(labels, device=ctx.device),
             "is_mixup": is_mixup.to(ctx.device), "partner": partner.to(ctx.device),
             "lam": sample_mixup_lambda_eq11(b, args.mixup_alpha).to(ctx.device)}
    batch.update(make_ft_batch(ctx, source))
    return batch


def st_step(model: CoNLSTModel, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """Stage 2: L_SSL = CE(source) + lambda_u * CE(target views, hard pseudo-labels; soft for
    mixup rows) (Eq. 12-14)."""
    pooled = model.pool(batch["tgt"])
    onehot = F.one_hot(batch["tgt_labels"], NUM_CLASSES).to(pooled.dtype)
    p = batch["partner"]
    mixed_x, mixed_y = mixup_eq9_10(pooled, pooled[p], onehot, onehot[p], batch["lam"])
    m = batch["is_mixup"][:, None]
    x, y = torch.where(m, mixed_x, pooled), torch.where(m, mixed_y, onehot)
    l_u = soft_cross_entropy(model.classify(x), y.float())
    l_sup = F.cross_entropy(model(batch["src"]).float(), batch["src_labels"])
    return l_sup + args.lambda_u * l_u, {"l_sup": l_sup.detach(), "l_u": l_u.detach()}


def make_fixmatch_batch(ctx: "Ctx", pairs: list[tuple[str, str]], source: list[Example]) -> dict:
    """The plain-FixMatch baseline's batch: weak (original) and strong (masked) views."""
    enc = tokenize_pairs(ctx.tok, pairs, ctx.prefix, ctx.args.max_length, maskable=True)
    strong = dict(enc, input_ids=random_token_masking(enc["input_ids"], enc["maskable"], ctx.args.mask_ratio,
                                                      ctx.tok.mask_token_id))
    enc.pop("maskable")
    strong.pop("maskable")
    return {"weak": to_device(enc, ctx.device), "strong": to_device(strong, ctx.device), **make_ft_batch(ctx, source)}


def fixmatch_step(model: CoNLSTModel, batch: dict, args: Args, threshold: float = 0.95) -> tuple[torch.Tensor, dict]:
    """Plain FixMatch (speed baseline of stage 2): pseudo-labels from the weak view in the same
    step (no gradient), CE on the strong view where the confidence reaches a fixed threshold."""
    with torch.no_grad():
        conf, pl = model(batch["weak"]).float().softmax(1).max(1)
    l_u = (F.cross_entropy(model(batch["strong"]).float(), pl, reduction="none") * (conf >= threshold)).mean()
    l_sup = F.cross_entropy(model(batch["src"]).float(), batch["src_labels"])
    return l_sup + args.lambda_u * l_u, {"l_sup": l_sup.detach(), "l_u": l_u.detach()}


# =========================================================================================
# Prediction, evaluation and the confidence diagnostics
# =========================================================================================
@torch.no_grad()
def predict(ctx: "Ctx", pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Class probabilities [N, C] (eval mode, batches sorted by length), on the CPU."""
    model = ctx.model
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = torch.zeros(len(pairs), NUM_CLASSES)
    bs = ctx.args.eval_batch_size
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        enc = to_device(tokenize_pairs(ctx.tok, [pairs[i] for i in idx], ctx.prefix, ctx.args.max_length), ctx.device)
        with utils.autocast(ctx.device, ctx.amp_dtype):
            logits = model(enc)
        out[idx] = logits.float().softmax(1).cpu()
    model.train(was_training)
    return out


def accuracy(probs: torch.Tensor, examples: list[Example]) -> float:
    gold = torch.tensor([e.label for e in examples])
    return 100.0 * (probs.argmax(1) == gold).float().mean().item()


def evaluate(ctx: "Ctx", lang: str | None, en_dev_acc: float | None = None) -> tuple[dict, torch.Tensor | None]:
    """English-dev accuracy (model selection; `en_dev_acc` when already known) and, for a
    language, its evaluation accuracy. Returns (metrics, the evaluation set's probabilities or None)."""
    out: dict[str, float] = {} if en_dev_acc is None else {"en_dev_acc": en_dev_acc}
    probs = None
    if lang is not None:
        target = ctx.data.targets[lang]
        probs = predict(ctx, [(e.text_a, e.text_b) for e in target.eval])
        out["acc"] = accuracy(probs, target.eval)
        if "en_dev_acc" not in out and lang == ctx.args.select_lang and ctx.args.eval_split == ctx.args.select_split:
            out["en_dev_acc"] = out["acc"]  # the same set
    if "en_dev_acc" not in out:
        sel = ctx.data.select
        out["en_dev_acc"] = accuracy(predict(ctx, [(e.text_a, e.text_b) for e in sel]), sel)
    return out, probs


CONFIDENCE_BINS = {"high": "max q > 0.9", "mid": "0.5 <= max q <= 0.9", "low": "max q < 0.5"}


def analysis_only_confidence_bins(probs: torch.Tensor, gold: torch.Tensor, n_hist: int = 20) -> dict:
    """ANALYSIS ONLY (Table 4, Figure 3): pseudo-label accuracy and counts per confidence bin,
    and histograms of the confidence of correctly (clean) and wrongly (noisy) pseudo-labeled
    samples. Reads target gold labels; its output never feeds training or model selection."""
    conf, pred = probs.max(dim=1)
    correct = pred == gold
    masks = {"high": conf > 0.9, "low": conf < 0.5}
    masks["mid"] = ~masks["high"] & ~masks["low"]
    out: dict[str, Any] = {}
    for name in ("high", "mid", "low"):
        m = masks[name]
        out[name] = {"n": int(m.sum()), "acc": 100.0 * correct[m].float().mean().item() if m.any() else None}
    out["all"] = {"n": int(len(gold)), "acc": 100.0 * correct.float().mean().item() if len(gold) else None}
    edges = torch.linspace(0, 1, n_hist + 1)
    b = torch.bucketize(conf.clamp(0, 1 - 1e-7), edges[1:-1], right=True)
    out["hist"] = {"edges": [round(x, 4) for x in edges.tolist()],
                   "clean": torch.bincount(b[correct], minlength=n_hist).tolist(),
                   "noisy": torch.bincount(b[~correct], minlength=n_hist).tolist()}
    return out


def plot_confidence(path: Path, lang: str, bins: dict[str, dict], analysed_on: str) -> None:
    """Figure 3 style: clean vs noisy pseudo-labels per confidence, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in ("after_stage0", "after_stage1", "after_stage2") if p in bins]
    if not points:
        return
    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.2), squeeze=False)
    for ax, point in zip(axes[0], points):
        h = bins[point]["hist"]
        edges = np.array(h["edges"])
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], h["clean"], width=width, align="edge", color="tab:blue", label="clean")
        ax.bar(edges[:-1], h["noisy"], width=width, align="edge", color="tab:orange", bottom=h["clean"], label="noisy")
        acc = " / ".join("-" if bins[point][k]["acc"] is None else f"{bins[point][k]['acc']:.1f}"
                         for k in ("high", "mid", "low"))
        ax.set_title(f"{lang} {point.replace('_', ' ')}\npseudo-label acc high / mid / low: {acc}", fontsize=9)
        ax.set_xlabel("confidence max q")
        ax.axvline(0.5, color="gray", lw=0.5)
        ax.axvline(0.9, color="gray", lw=0.5)
    axes[0][0].set_ylabel(f"samples ({analysed_on} set)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


# =========================================================================================
# Run state, checkpoints, and the three stages
# =========================================================================================
@dataclass
class Data:
    source: list[Example]
    select: list[Example]
    targets: dict[str, TargetData]


@dataclass
class Ctx:
    """What every stage needs; `target` is the language being trained."""

    args: Args
    model: CoNLSTModel
    tok: Any
    prefix: str
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: Any
    data: Data
    run_dir: Path
    metrics: utils.MetricsWriter
    stop: utils.StopFlag
    stage0_path: Path
    step: int = 0
    samples: int = 0
    train_s: float = 0.0  # seconds inside training steps (forward, backward, update)
    wall_before: float = 0.0  # wall seconds of the earlier sessions of a resumed run
    t_start: float = dataclasses.field(default_factory=time.time)
    history: list = dataclasses.field(default_factory=list)  # one record per evaluation
    results: dict = dataclasses.field(default_factory=dict)  # per language: bins, stage-2 statistics
    target: TargetData | None = None
    skipped: int = 0  # --skip-nonfinite: steps left out
    on_stop: Callable[[], None] | None = None  # saves the running stage's state at a Ctrl-C


def pass_key(*parts: Any) -> int:
    """A seed for the data order of one pass (stable across processes, so a resumed pass
    repeats the same order)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def grouped_order(pairs: list, batch_size: int, key: int) -> list[int]:
    """One pass's data order, in length-grouped batches (length: characters of premise plus
    hypothesis, a proxy for tokens); a function of `key` only, so a resumed pass repeats it."""
    lengths = [len(p[0]) + len(p[1] or "") for p in pairs]  # Example or (premise, hypothesis)
    return text_data.length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(key))


class SourceStream:
    """Endless shuffled source batches for stages 1 and 2, resumable from (epoch, position)."""

    def __init__(self, examples: list[Example], seed: int, tag: str, state: dict | None = None):
        self.examples, self.seed, self.tag = examples, seed, tag
        self.state = dict(state or {"epoch": 0, "pos": 0})

    def next(self, n: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < n:
            order = grouped_order(self.examples, n, pass_key(self.seed, self.tag, self.state["epoch"]))
            take = order[self.state["pos"]:self.state["pos"] + n - len(out)]
            out += [self.examples[i] for i in take]
            self.state["pos"] += len(take)
            if self.state["pos"] >= len(order):
                self.state = {"epoch": self.state["epoch"] + 1, "pos": 0}
        return out


def save_weights(path: Path, model: nn.Module, meta: dict) -> None:
    utils.atomic_torch_save({"model": trainable_state(model), "meta": meta}, path)


def load_weights(path: Path, model: nn.Module) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise MissingError(f"{path}: not found (a stage hand-off file of this run)") from None
    load_trainable_state(model, blob["model"], str(path))
    return blob.get("meta", {})


def save_state(ctx: Ctx, plan_pos: int, item: dict, opt=None, sched=None) -> None:
    """checkpoint.pt: everything to continue from this point (model, optimizer, scheduler, scaler,
    RNG, global step, position in the plan, the current stage's own state, history)."""
    utils.save_checkpoint(ctx.run_dir, {
        "model": trainable_state(ctx.model), "optimizer": opt.state_dict() if opt else None,
        "scheduler": sched.state_dict() if sched else None, "scaler": ctx.scaler.state_dict(),
        "rng": utils.rng_state(), "step": ctx.step, "plan_pos": plan_pos, "item": item,
        "history": ctx.history, "results": ctx.results, "samples": ctx.samples, "train_s": ctx.train_s,
        "wall_s": ctx.wall_before + time.time() - ctx.t_start, "skipped_nonfinite": ctx.skipped,
        "metrics_lines": ctx.metrics.lines})


def make_optimizer(ctx: Ctx, kind: str, lr: float, weight_decay: float = 0.0):
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr)


def train_step(ctx: Ctx, opt, sched, step_fn: Callable, batch: dict, n_samples: int, sums: dict) -> float:
    """Forward (autocast), loss check, backward, clip, optimizer step; returns the loss."""
    t0 = time.time()
    with utils.autocast(ctx.device, ctx.amp_dtype):
        loss, terms = step_fn(ctx.model, batch, ctx.args)
    finite = utils.check_finite(loss, ctx.step, terms, ctx.args.skip_nonfinite)
    if finite:
        opt.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        if ctx.args.max_grad_norm > 0:
            ctx.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for p in ctx.model.parameters() if p.requires_grad],
                                           ctx.args.max_grad_norm)
        ctx.scaler.step(opt)
        ctx.scaler.update()
    else:  # --skip-nonfinite: no backward pass, no update (the schedule moves on with the data)
        ctx.skipped += 1
    if sched is not None:
        sched.step()
    ctx.step += 1
    ctx.samples += n_samples
    ctx.train_s += time.time() - t0
    value = loss.item()
    if finite:
        sums["n"] = sums.get("n", 0) + 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        sums["loss"] = sums.get("loss", 0.0) + value
    return value


def record_eval(ctx: Ctx, stage: int, lang: str | None, epoch: float, sums: dict, extra: dict | None = None,
                en_dev_acc: float | None = None):
    """Evaluate, write one metrics line, append to the history; returns (record, eval probs)."""
    res, probs = evaluate(ctx, lang, en_dev_acc)
    train = {k: v / sums["n"] for k, v in sums.items() if k != "n"} if sums.get("n") else {}
    rec = {"step": ctx.step, "stage": stage, "lang": lang, "epoch": epoch, **res, **train, **(extra or {})}
    if ctx.args.skip_nonfinite:
        rec["skipped_nonfinite"] = ctx.skipped
    ctx.metrics.write(ctx.step, "eval", epoch=epoch, **{k: v for k, v in rec.items() if k not in ("step", "epoch")})
    ctx.history.append(rec)
    sums.clear()
    tqdm.write(f"[stage {stage}{' ' + lang if lang else ''}] step {ctx.step}  "
               + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                           if k not in ("step", "stage", "lang")))
    return rec, probs


def keep_best(ctx: Ctx, item: dict, rec: dict, probs: torch.Tensor | None) -> None:
    """Track the stage's best English-dev evaluation (ties: the later one) and its weights."""
    if ctx.args.handoff == "best" and (item.get("best") is None or rec["en_dev_acc"] >= item["best"]["en_dev_acc"]):
        item["best"] = rec
        item["best_probs"] = probs
        save_weights(ctx.run_dir / "best_in_stage.pt", ctx.model, {"record": rec})
    if ctx.args.handoff == "last":
        item["best"], item["best_probs"] = rec, probs


def finish_stage(ctx: Ctx, item: dict, path: Path | None) -> dict:
    """Put the hand-off weights (best-English-dev or last) in the model and, unless None, in `path`."""
    if ctx.args.handoff == "best" and item.get("best") is not None and item["best"]["step"] != ctx.step:
        load_weights(ctx.run_dir / "best_in_stage.pt", ctx.model)
    if path is not None:
            save_weights(path, ctx.model, {"record": item.get("best"), "model": ctx.args.model,
                                       "pooling": ctx.model.pooling, "prefix": ctx.prefix, "seed": ctx.args.seed,
                                       "con_dim": ctx.args.con_dim})
    return item.get("best") or {}


def check_stop(ctx: Ctx) -> None:
    """After each step: on Ctrl-C / SIGTERM, checkpoint the running stage here (ctx.on_stop; its
    state says which batch comes next), say how to continue, exit 130."""
    if ctx.stop:
        if ctx.on_stop is not None:
            ctx.on_stop()
        print(f"\ninterrupted at step {ctx.step}; checkpoint saved. "
              f"Resume with: python conlst.py --resume {ctx.run_dir}", flush=True)
        sys.exit(utils.EXIT_INTERRUPTED)


# ---- stage 0: English fine-tuning ------------------------------------------------------------
def run_stage0(ctx: Ctx, plan_pos: int, item: dict, ckpt: dict | None) -> None:
    args, source = ctx.args, ctx.data.source
    bs = args.s0_batch_size
    n_batches = math.ceil(len(source) / bs)
    per_epoch = min(n_batches, args.max_steps or n_batches)
    total = per_epoch * args.s0_epochs
    warm = int(args.s0_warmup * total)
    opt = make_optimizer(ctx, "adamw", args.s0_lr, args.s0_weight_decay)
    sched = get_linear_schedule_with_warmup(opt, warm, total)  # linear warm-up from 0, then linear decay to 0
    if ckpt is not None and ckpt.get("optimizer"):
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    ctx.model.train()
    sums = item.setdefault("sums", {})
    ctx.on_stop = lambda: save_state(ctx, plan_pos, item, opt, sched)
    for epoch in range(item.get("epoch", 0), args.s0_epochs):
        order = grouped_order(source, bs, pass_key(args.seed, "s0", epoch))
        bar = tqdm(range(item.get("batch", 0), per_epoch), desc=f"stage 0 epoch {epoch + 1}/{args.s0_epochs}",
                   leave=False, disable=None)
        for b in bar:
            ex = [source[i] for i in order[b * bs:(b + 1) * bs]]
            loss = train_step(ctx, opt, sched, ft_step, make_ft_batch(ctx, ex), len(ex), sums)
            bar.set_postfix(loss=f"{loss:.3f}")
            item["batch"] = b + 1
            if args.s0_eval_every and item["batch"] % args.s0_eval_every == 0 and item["batch"] < per_epoch:
                rec, probs = record_eval(ctx, 0, None, epoch + item["batch"] / per_epoch, sums,
                                         {"lr": sched.get_last_lr()[0]})
                keep_best(ctx, item, rec, probs)
                save_state(ctx, plan_pos, item, opt, sched)
            check_stop(ctx)
        item["epoch"], item["batch"] = epoch + 1, 0
        rec, probs = record_eval(ctx, 0, None, epoch + 1, sums, {"lr": sched.get_last_lr()[0]})
        keep_best(ctx, item, rec, probs)
        save_state(ctx, plan_pos, item, opt, sched)
    best = finish_stage(ctx, item, ctx.stage0_path)
    print(f"stage 0 done: English dev {best.get('en_dev_acc', float('nan')):.2f} (step {best.get('step')})"
          f" -> {ctx.stage0_path}")


# ---- the zero-shot evaluation of a language (stage-0 model) ----------------------------------
def run_zero_shot(ctx: Ctx, lang: str) -> None:
    meta = load_weights(ctx.stage0_path, ctx.model)
    known = (meta.get("record") or {}).get("en_dev_acc")  # stage 0's own English-dev result
    rec, probs = record_eval(ctx, 0, lang, 0, {}, en_dev_acc=known)
    diagnose(ctx, lang, "after_stage0", probs)


def diagnose(ctx: Ctx, lang: str, point: str, eval_probs: torch.Tensor | None) -> None:
    """Confidence bins of the current model at `point`: on the pool when its gold labels exist,
    else on the evaluation set (whose probabilities the last evaluation computed)."""
    res = ctx.results.setdefault(lang, {})
    gold = load_pool_gold_labels_for_analysis_only(ctx.args, lang)
    if gold is not None:
        probs, on = predict(ctx, ctx.data.targets[lang].pool), "pool"
    else:
        target = ctx.data.targets[lang]
        probs = eval_probs if eval_probs is not None else predict(ctx, [(e.text_a, e.text_b) for e in target.eval])
        gold, on = torch.tensor([e.label for e in target.eval]), "eval"
    res.setdefault("bins", {})[point] = analysis_only_confidence_bins(probs, gold)
    res["bins_on"] = on
    plot_confidence(ctx.run_dir / f"confidence_{lang}.png", lang, res["bins"], on)


# ---- stage 1: contrastive negative learning ---------------------------------------------------
def run_stage1(ctx: Ctx, plan_pos: int, lang: str, item: dict, ckpt: dict | None) -> None:
    args, pool = ctx.args, ctx.target.pool
    if "probs" not in item:  # fresh start: the stage-0 model's pseudo-labels, fixed for the stage
        load_weights(ctx.stage0_path, ctx.model)
        item["probs"] = predict(ctx, pool)
    probs = item["probs"]
    hc_idx, hc_label = high_confidence_pool_eq5(probs, args.gamma)
    stats = {"pool": len(pool), "high_conf": int(len(hc_idx)),
             "high_conf_per_class": torch.bincount(hc_label, minlength=NUM_CLASSES).tolist()}
    ctx.results.setdefault(lang, {})["stage1_pool"] = stats
    opt = make_optimizer(ctx, "adam", args.s1_lr)
    if ckpt is not None and ckpt.get("optimizer"):
        opt.load_state_dict(ckpt["optimizer"])
    src = SourceStream(ctx.data.source, args.seed, f"s1-{lang}", item.get("src"))
    bs = args.s1_batch_size
    n_batches = math.ceil(len(pool) / bs)
    per_epoch = min(n_batches, args.max_steps or n_batches)
    ctx.model.train()
    sums = item.setdefault("sums", {})
    ctx.on_stop = lambda: save_state(ctx, plan_pos, item, opt)
    use_source = not args.wo_clcs
    for epoch in range(item.get("epoch", 0), args.s1_epochs):
        order = grouped_order(pool, bs, pass_key(args.seed, "s1", lang, epoch))
        bar = tqdm(range(item.get("batch", 0), per_epoch), desc=f"stage 1 {lang} epoch {epoch + 1}/{args.s1_epochs}",
                   leave=False, disable=None)
        for b in bar:
            anchors = torch.tensor(order[b * bs:(b + 1) * bs])
            comp = complementary_labels_eq4(probs[anchors], args.gamma, args.comp_label)
            if args.wo_cl:
                neg_idx = torch.zeros(len(anchors), 0, dtype=torch.long)  # no negatives needed
                neg_valid = torch.zeros(len(anchors), 0, dtype=torch.bool)
            else:
                neg_idx, neg_valid = sample_negatives_eq5(comp, hc_idx, hc_label, args.k_neg, args.neg_sharing)
            source = src.next(args.s1_source_batch_size) if use_source else []
            batch = make_conl_batch(ctx, [pool[i] for i in anchors.tolist()], comp, neg_idx, neg_valid, source)
            loss = train_step(ctx, opt, None, conl_step, batch, len(anchors) + len(source), sums)
            bar.set_postfix(loss=f"{loss:.3f}")
            item["batch"], item["src"] = b + 1, src.state
            if args.s1_eval_every and item["batch"] % args.s1_eval_every == 0 and item["batch"] < per_epoch:
                rec, eprobs = record_eval(ctx, 1, lang, epoch + item["batch"] / per_epoch, sums)
                keep_best(ctx, item, rec, eprobs)
                save_state(ctx, plan_pos, item, opt)
            check_stop(ctx)
        item["epoch"], item["batch"] = epoch + 1, 0
        rec, eprobs = record_eval(ctx, 1, lang, epoch + 1, sums, {"high_conf": stats["high_conf"]})
        keep_best(ctx, item, rec, eprobs)
        save_state(ctx, plan_pos, item, opt)
    finish_stage(ctx, item, ctx.run_dir / f"stage1_{lang}.pt")
    diagnose(ctx, lang, "after_stage1", item.get("best_probs"))


# ---- stage 2: self-training ------------------------------------------------------------------
def plan_iteration(ctx: Ctx, lang: str, item: dict) -> dict:
    """Pseudo-label the pool with the current model, update FlexMatch's memory, select with the
    class-wise thresholds, and give each selected sample one strong augmentation."""
    args, target = ctx.args, ctx.target
    probs = predict(ctx, target.pool)
    conf, pred = probs.max(1)
    item["memory"] = flexmatch_update_memory(item["memory"], conf, pred, args.flex_threshold)
    thr = flexmatch_thresholds(item["memory"], NUM_CLASSES, args.flex_threshold, args.flex_warmup, args.flex_mapping)
    selected = torch.nonzero(select_confident_eq14(conf, pred, thr)).squeeze(1)
    kinds = ["mask"] + ([] if args.wo_mixup else ["mixup"])
    with_bt = kinds + ["bt"] if bt_enabled(args) else kinds
    choice = []
    for i in selected.tolist():
        options = with_bt if bt_pair(target.bt, target.pool[i]) else kinds
        choice.append(options[int(torch.randint(len(options), (1,)))])
    stats = {"n_selected": len(choice), "selected_frac": len(choice) / max(len(target.pool), 1),
             "thresholds": [round(x, 4) for x in thr.tolist()],
             "selected_per_class": torch.bincount(pred[selected], minlength=NUM_CLASSES).tolist(),
             "views": {k: choice.count(k) for k in ("bt", "mask", "mixup")},
             "bt_available": sum(bt_pair(target.bt, target.pool[i]) is not None for i in selected.tolist())
             if target.bt else 0}
    return {"selected": selected.tolist(), "labels": pred[selected].tolist(), "kinds": choice, "stats": stats}


def run_stage2(ctx: Ctx, plan_pos: int, lang: str, item: dict, ckpt: dict | None) -> None:
    args, pool = ctx.args, ctx.target.pool
    if "memory" not in item:  # fresh start from stage 1's hand-off (or stage 0's with --wo-conl)
        load_weights(ctx.stage0_path if args.wo_conl else ctx.run_dir / f"stage1_{lang}.pt", ctx.model)
        item["memory"] = torch.full((len(pool),), -1, dtype=torch.long)
    opt = make_optimizer(ctx, "adam", args.s2_lr)
    if ckpt is not None and ckpt.get("optimizer"):
        opt.load_state_dict(ckpt["optimizer"])
    src = SourceStream(ctx.data.source, args.seed, f"s2-{lang}", item.get("src"))
    bs = args.s2_batch_size
    ctx.model.train()
    sums = item.setdefault("sums", {})
    ctx.on_stop = lambda: save_state(ctx, plan_pos, item, opt)
    iters = ctx.results.setdefault(lang, {}).setdefault("stage2_iterations", [])
    for it in range(item.get("iter", 0), args.s2_iterations):
        if item.get("plan") is None:
            item["plan"] = plan_iteration(ctx, lang, item)
            iters.append({"iteration": it + 1, **item["plan"]["stats"]})
            tqdm.write(f"[stage 2 {lang}] iteration {it + 1}: {item['plan']['stats']}")
        plan = item["plan"]
        n = len(plan["selected"])
        order = grouped_order([pool[r] for r in plan["selected"]], bs, pass_key(args.seed, "s2", lang, it))
        n_batches = math.ceil(n / bs)
        per_iter = min(n_batches, args.max_steps or n_batches)
        bar = tqdm(range(item.get("batch", 0), per_iter), desc=f"stage 2 {lang} iteration {it + 1}/{args.s2_iterations}",
                   leave=False, disable=None)
        for b in bar:
            rows_ = order[b * bs:(b + 1) * bs]
            pairs = [pool[plan["selected"][r]] for r in rows_]
            source = src.next(args.s2_source_batch_size)
            batch = make_st_batch(ctx, pairs, [plan["kinds"][r] for r in rows_], [plan["labels"][r] for r in rows_], source)
            loss = train_step(ctx, opt, None, st_step, batch, len(pairs) + len(source), sums)
            bar.set_postfix(loss=f"{loss:.3f}")
            item["batch"], item["src"] = b + 1, src.state
            check_stop(ctx)
        item["iter"], item["batch"], item["plan"] = it + 1, 0, None
        rec, eprobs = record_eval(ctx, 2, lang, it + 1, sums, {"n_selected": plan["stats"]["n_selected"]})
        keep_best(ctx, item, rec, eprobs)
        save_state(ctx, plan_pos, item, opt)
    finish_stage(ctx, item, ctx.run_dir / f"stage2_{lang}.pt" if args.keep_models else None)
    diagnose(ctx, lang, "after_stage2", item.get("best_probs"))


# =========================================================================================
# Loading everything (before the run directory exists), the summary, main
# =========================================================================================
def load_data(args: Args, langs: list[str], record: dict | None = None) -> Data:
    """Every data set of the run; `record` receives the subsets (saved as data_subsets.json)."""
    source = load_source(args, record)
    select = load_eval_set(args, args.select_lang, args.select_split, record, "select")
    targets = {}
    for lang in langs:
        targets[lang] = TargetData(lang, load_pool(args, lang, record),
                                   load_eval_set(args, lang, args.eval_split, record))
    return Data(source, select, targets)


def check_sizes(args: Args, data: Data) -> None:
    """Batch sizes and K against the data the stages that run will see (one line naming the flag)."""
    n_src = len(data.source)
    n_pool = min(len(t.pool) for t in data.targets.values())
    checks = [] if args.stage0_from else [("s0_batch_size", n_src, "labeled source pairs")]
    if 1 in stages_of(args):
        checks += [("s1_batch_size", n_pool, "pairs of the unlabeled pool")]
        checks += [] if args.wo_clcs else [("s1_source_batch_size", n_src, "labeled source pairs")]
    if 2 in stages_of(args):
        checks += [("s2_batch_size", n_pool, "pairs of the unlabeled pool"),
                   ("s2_source_batch_size", n_src, "labeled source pairs")]
    for name, n, what in checks:
        if getattr(args, name) > n:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: larger than the {n} {what}")
    if 1 in stages_of(args) and not args.wo_cl and args.k_neg > n_pool - 1:
        raise UsageError(f"--k-neg {args.k_neg}: an anchor's negatives are other pairs of the unlabeled pool, "
                         f"which has {n_pool}; at most {n_pool - 1} are possible")


def load_stage0_file(args: Args, pooling: str, prefix: str) -> Path:
    """The stage-0 weights to reuse: a run directory holding stage0.pt, or the file."""
    path = Path(args.stage0_from)
    if path.is_dir():
        path = path / "stage0.pt"
    if not path.is_file():
        raise MissingError(f"--stage0-from {args.stage0_from}: no stage0.pt there (train stage 0 once with this "
                           "script; its run directory holds stage0.pt)")
    meta = torch.load(path, map_location="cpu", weights_only=False).get("meta", {})
    for key, mine in (("model", args.model), ("con_dim", args.con_dim), ("pooling", pooling), ("prefix", prefix)):
        if meta.get(key) != mine:
            raise UsageError(f"--stage0-from {args.stage0_from}: trained with {key} {meta.get(key)}, this run uses {mine}")
    if meta.get("seed") != args.seed:
        print(f"note: --stage0-from was trained with seed {meta.get('seed')}, this run uses seed {args.seed}")
    return path


def language_summary(ctx: Ctx, lang: str) -> dict:
    """Per language: the zero-shot (stage-0) result, each stage's hand-off evaluation, the final
    (last) evaluation, and 'best' = the best-English-dev evaluation of the last stage run."""
    recs = [r for r in ctx.history if r["lang"] == lang]
    if not recs:
        return {}
    keep = ("acc", "en_dev_acc", "step")
    out: dict[str, Any] = {"stage0": {k: recs[0][k] for k in keep}}
    last_stage = max(r["stage"] for r in recs)
    for s in (1, 2):
        in_stage = [r for r in recs if r["stage"] == s]
        if in_stage:
            pick = max(in_stage, key=lambda r: (r["en_dev_acc"], r["step"])) if ctx.args.handoff == "best" else in_stage[-1]
            out[f"stage{s}"] = {k: pick[k] for k in keep}
    final_stage = [r for r in recs if r["stage"] == last_stage]
    out["final"] = {k: recs[-1][k] for k in keep}
    out["best"] = {k: max(final_stage, key=lambda r: (r["en_dev_acc"], r["step"]))[k] for k in keep}
    out.update(ctx.results.get(lang, {}))
    return out


def build_summary(ctx: Ctx, langs: list[str], wall: float) -> dict:
    args = ctx.args
    per_lang = {lang: language_summary(ctx, lang) for lang in langs}
    done = [lang for lang in langs if per_lang[lang]]

    def mean_of(key: str, metric: str = "acc") -> float | None:
        vals = [per_lang[lang][key][metric] for lang in done if key in per_lang[lang]]
        return float(np.mean(vals)) if vals and len(vals) == len(done) else None

    s0 = [r for r in ctx.history if r["stage"] == 0 and r["lang"] is None]
    return {
        "script": "conlst.py", "method": method_name(args), "dataset": "xnli",
        "setting": f"{args.source_task}->{'+'.join(langs) if len(langs) < len(XNLI_LANGS) else 'all'}",
        "seed": args.seed, "primary_metric": "acc", "model": args.model, "langs": langs,
        "protocol": {"source": f"{args.source_task} {'+'.join(args.source_splits)} ({len(ctx.data.source)} pairs)",
                     "pool": f"xnli {args.pool_split} (labels dropped)", "eval": f"xnli {args.eval_split}",
                     "select": f"xnli-{args.select_lang} {args.select_split} ({len(ctx.data.select)} pairs)",
                     "back_translation": args.bt if bt_enabled(args) else "off"},
        "final": {"acc": mean_of("final"), "en_dev_acc": mean_of("final", "en_dev_acc"), "step": ctx.step},
        "best": {"acc": mean_of("best"), "en_dev_acc": mean_of("best", "en_dev_acc"),
                 "step": per_lang[done[-1]]["best"]["step"] if done else None,
                 "steps": {lang: per_lang[lang]["best"]["step"] for lang in done}},
        "avg": {k: mean_of(k) for k in ("stage0", "stage1", "stage2", "final", "best")},
        "per_lang": per_lang,
        "stage0": {"path": str(ctx.stage0_path), "evals": [{k: r[k] for k in ("step", "epoch", "en_dev_acc")} for r in s0]},
        "steps": ctx.step, "wall_s": round(wall, 2),
        "samples_per_s": round(ctx.samples / max(ctx.train_s, 1e-9), 2),
        "skipped_nonfinite_steps": ctx.skipped,
    }


CHECKPOINT_KEYS = ("model", "scaler", "rng", "step", "plan_pos", "item", "history", "results", "samples", "train_s",
                   "wall_s")


def main(args: Args) -> dict:
    validate(args)
    ckpt = None
    if args.resume:  # continue a run: its own arguments, its directory, its last checkpoint (None: start over)
        # the run's own arguments; only the step limit may change, when given with --resume (as in lacol.py)
        given = {"max_steps": args.max_steps} if "max_steps" in utils.flags_given(args) else {}
        args, ckpt = utils.resume_run(Args, args.resume, {"resume": args.resume, **given})
        validate(args)
        if ckpt is not None:
            utils.require_keys(ckpt, CHECKPOINT_KEYS, args.resume)
    else:
        utils.check_out_dir(args.out_dir)
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)
    langs = resolve_langs(args)

    # ---- data, back-translations, model (before the run directory: a failure writes nothing)
    data_record: dict = {}
    data = load_data(args, langs, data_record)
    check_sizes(args, data)
    tiny_texts = [s for e in data.source for s in (e.text_a, e.text_b)] + \
        [s for t in data.targets.values() for p in t.pool for s in p]
    model, tok, prefix = build_model(args, tiny_texts)
    model.to(device)
    if bt_enabled(args):
        for lang in langs:
            data.targets[lang].bt = load_backtranslations(args, lang, data.targets[lang].pool, device)
    stage0_file = load_stage0_file(args, model.pooling, prefix) if args.stage0_from else None

    if args.resume:
        run_dir = Path(args.resume)
    else:
        setting = f"{args.source_task}-{'+'.join(langs) if len(langs) < len(XNLI_LANGS) else 'all'}"
        name = utils.run_name(method_name(args), "xnli", setting, args.seed, args.exp_name)
        run_dir = utils.make_run_dir(args.out_dir, name)
        utils.atomic_write_json(run_dir / "args.json", dataclasses.asdict(args))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ctx = Ctx(args, model, tok, prefix, device, amp_dtype, scaler, data, run_dir,
              utils.MetricsWriter(run_dir, args.track), utils.StopFlag(), stage0_file or run_dir / "stage0.pt")

    # The plan: stage 0 (unless reused), then per language: zero-shot evaluation, stage 1, stage 2.
    plan: list[tuple[str, str | None]] = [] if stage0_file else [("s0", None)]
    for lang in langs:
        plan += [("zs", lang)] + [(f"s{s}", lang) for s in stages_of(args)]
    start, item = 0, {}
    if ckpt is not None:
        with utils.restoring(run_dir):
            load_trainable_state(model, ckpt["model"], f"--resume {run_dir}")
            scaler.load_state_dict(ckpt["scaler"])
            utils.set_rng_state(ckpt["rng"])
        ctx.step, ctx.history, ctx.results = ckpt["step"], ckpt["history"], ckpt["results"]
        ctx.samples, ctx.train_s, ctx.wall_before = ckpt["samples"], ckpt["train_s"], ckpt["wall_s"]
        ctx.skipped = ckpt.get("skipped_nonfinite", 0)
        start, item = ckpt["plan_pos"], ckpt["item"]
        if not isinstance(start, int) or not 0 <= start <= len(plan):
            raise MissingError(f"--resume {run_dir}: checkpoint.pt does not fit this run (plan item {start})")
    else:  # a new run, or one that stopped before its first checkpoint (it starts over)
        utils.atomic_write_json(run_dir / "data_subsets.json", data_record)
    if args.resume:
        ctx.metrics.resume(ckpt, ctx.step)
        where = plan[start] if start < len(plan) else "done"
        print(f"resuming {run_dir} at plan item {start} ({where}), step {ctx.step}" if ckpt is not None
              else f"resuming {run_dir}: it stopped before its first checkpoint, so it starts over")
    print(f"run: {run_dir}  |  {method_name(args)}  {args.model} ({model.pooling} pooling"
          f"{', prefix ' + repr(prefix) if prefix else ''})  |  source {args.source_task} {len(data.source)}  |  "
          f"langs {' '.join(langs)}  |  back-translation {args.bt if bt_enabled(args) else 'off'}  |  device {device}, "
          f"precision {amp_dtype or 'fp32'}")

    ctx.t_start = time.time()
    with ctx.stop:
        for pos in range(start, len(plan)):
            kind, lang = plan[pos]
            ctx.target = data.targets.get(lang) if lang else None
            resumed = ckpt if (ckpt is not None and pos == start and item) else None
            if kind == "s0":
                run_stage0(ctx, pos, item, resumed)
            elif kind == "zs":
                run_zero_shot(ctx, lang)
            elif kind == "s1":
                run_stage1(ctx, pos, lang, item, resumed)
            else:
                run_stage2(ctx, pos, lang, item, resumed)
            item = {}
            ctx.on_stop = None  # the checkpoint below is the one to resume from
            save_state(ctx, pos + 1, item)
            if kind == "s2" and not args.keep_models:  # stage 1's hand-off is no longer needed
                (run_dir / f"stage1_{lang}.pt").unlink(missing_ok=True)
            utils.write_summary(run_dir, build_summary(ctx, langs, ctx.wall_before + time.time() - ctx.t_start))
            check_stop(ctx)  # a Ctrl-C during an evaluation-only item
    ctx.metrics.close()
    (run_dir / "best_in_stage.pt").unlink(missing_ok=True)

    wall = ctx.wall_before + time.time() - ctx.t_start
    summary = utils.write_summary(run_dir, build_summary(ctx, langs, wall))
    rows_ = [(lang, summary["per_lang"][lang]) for lang in langs]
    print("lang   zero-shot  " + "  ".join(f"stage{s}" for s in stages_of(args)) + "   best(en-dev sel.)")
    for lang, r in rows_:
        print(f"{lang:5s}  {r['stage0']['acc']:8.2f}  " + "  ".join(f"{r[f'stage{s}']['acc']:6.2f}" for s in stages_of(args))
              + f"   {r['best']['acc']:6.2f}")
    print(f"done: average best {summary['best']['acc']:.2f}  ->  {run_dir}/summary.json")
    return summary


# =========================================================================================
# Speed: the method's steps against their baselines on the same batches, in one process
# =========================================================================================
def speed_steps(args: Args, lang: str | None = None, pick: Callable | None = None) -> dict[str, Callable[[], float]]:
    """Zero-argument callables, each one full training step (forward, loss, backward, optimizer
    step with lr 0) on a fixed batch: 'ft' (plain fine-tuning, ft_step) and 'conl' (stage 1,
    conl_step) share their source pairs; 'fixmatch' (plain FixMatch, fixmatch_step) and 'st'
    (stage 2, st_step) share their target and source pairs. The model is `args`'s encoder with
    fresh heads; in the stage-1 batch every anchor has K valid negatives (the costliest case).
    `pick(items, n)` chooses the rows of each batch (default: the first n, cycling when fewer).
    Writes nothing. For benchmarks/speed.py and time_steps."""
    validate(args)
    device = utils.resolve_device(args.device)
    amp_dtype, _ = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed)
    lang = lang or resolve_langs(args)[0]
    data = load_data(args, [lang])
    model, tok, prefix = build_model(args, [s for e in data.source for s in (e.text_a, e.text_b)]
                                     + [s for p in data.targets[lang].pool for s in p])
    model.to(device).train()
    ctx = Ctx(args, model, tok, prefix, device, amp_dtype, None, data, Path("."), None, None,  # type: ignore[arg-type]
              Path("."))
    ctx.target = data.targets[lang]
    pool = ctx.target.pool
    b1, b2 = args.s1_batch_size, args.s2_batch_size
    hc_idx = torch.arange(len(pool))
    hc_label = hc_idx % NUM_CLASSES  # every pool sample confident, classes round-robin: K real negatives each
    probs = F.one_hot(torch.arange(b1) % NUM_CLASSES, NUM_CLASSES).float()
    comp = complementary_labels_eq4(probs, args.gamma, args.comp_label)
    neg_idx, neg_valid = sample_negatives_eq5(comp, hc_idx, hc_label, args.k_neg, args.neg_sharing)
    pick = pick or (lambda items, n: [i % len(items) for i in range(n)])
    anchors = [pool[i] for i in pick(pool, b1)]
    src1 = [data.source[i] for i in pick(data.source, b1)]
    tgt = [pool[i] for i in pick(pool, b2)]
    src2 = [data.source[i] for i in pick(data.source, args.s2_source_batch_size)]
    kinds = [("mask", "mixup")[i % 2] for i in range(b2)]
    batches = {"ft": (ft_step, make_ft_batch(ctx, src1)),
               "conl": (conl_step, make_conl_batch(ctx, anchors, comp, neg_idx, neg_valid,
                                                   [] if args.wo_clcs else src1[:args.s1_source_batch_size])),
               "fixmatch": (fixmatch_step, make_fixmatch_batch(ctx, tgt, src2)),
               "st": (st_step, make_st_batch(ctx, tgt, kinds, [i % NUM_CLASSES for i in range(b2)], src2))}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def one_step(fn: Callable, batch: dict) -> Callable[[], float]:
        def run() -> float:
            with utils.autocast(device, amp_dtype):
                loss, _ = fn(model, batch, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
        return run

    return {name: one_step(fn, batch) for name, (fn, batch) in batches.items()}


def time_steps(args: Args, repeats: int = 3, lang: str | None = None) -> dict:
    """Seconds per step (median over `repeats` interleaved rounds, after one warm-up round) of
    ft vs conl (stage 1) and fixmatch vs st (stage 2), and the two ratios."""
    steps = speed_steps(args, lang)
    cuda = utils.resolve_device(args.device).type == "cuda"
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats + 1):
        for name, run in steps.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t0)
    out = {f"{k}_s": float(np.median(v)) for k, v in times.items()}
    out["conl_over_ft"] = out["conl_s"] / out["ft_s"]
    out["st_over_fixmatch"] = out["st_s"] / out["fixmatch_s"]
    return out


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
