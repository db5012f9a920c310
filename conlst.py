"""CoNLST: Contrastive Negative Learning and Self-Training for zero-shot cross-lingual transfer.

Docs: docs/conlst.md (paper vs. code: every reading of the paper; the CPU protocol; results)
Paper: "Improving Cross-lingual Transfer with Contrastive Negative Learning and Self-training"
(../shared/papers/conlst.txt). Top to bottom: arguments, data, model, the method's losses and samplers
(plain functions named after their equations), the per-step computations, the three stages, main.

    python conlst.py --bt file --bt-file bt.tsv         # mBERT, MultiNLI -> 15 XNLI languages (GPU, downloads)
    python -m common.back_translate --langs fr de sw   # mBART-50 back-translations (once), then:
    python conlst.py --preset xlmr --langs fr de sw    # XLM-R-large (Table 2), three languages
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
  stage 2   self-training as FlexMatch, every step: hard pseudo-labels of a batch of the pool from the
            current model, FlexMatch's class-wise thresholds (memory updated every step), one strong
            view per selected sample (back-translation, random token masking, or mixup of sentence
            embeddings with Beta(4, 4) soft labels, Eq. 9-11); an iteration is one pass over the pool
            Eq. 12-14  L_SSL = CE(source batch) + lambda_u * CE(target views)

Model selection uses English dev only (zero-shot); target gold labels are read only for the
confidence diagnostics (Table 4). Training batches are length-grouped, evaluation runs in length order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common import utils
from common.back_translate import bt_pair, check_bt_args, load_backtranslations
from common.run import Run, RunArgs
from common.stages import (CHECKPOINT_KEYS, HANDOFF, Net, Progress, accuracy, balanced_prior_weights,  # noqa: F401
                           check_stop, checkpoint_fields, class_fractions, confident_pool_record, flexmatch_record,
                           diagnose, distance_scale, finish_stage, handoff_file, predict, print_table, prior_corrected,
                           prior_correction_record, record_eval, save, staged_summary, tally_step, to_device,
                           train_step, trainable)
from common.text_data import (SOURCES, XNLI_LANGS, Example, SourceStream, TargetData, XnliData, check_transfer_args,
                              check_transfer_sizes, grouped_order, load_xnli_transfer, pass_key, tokenize_pairs)
from common.text_models import (TrainableState, freeze_word_embeddings, load_encoder, load_trainable, mean_pool,
                                resolve_pooling, tiny_encoder)
from common.utils import MissingError, UsageError, arg

NUM_CLASSES = 3  # entailment, neutral, contradiction (XNLI, MultiNLI and SNLI share the order)


# ==== Arguments (defaults: the paper's mBERT setting, Table 1) ============================================
@dataclass
class Args(RunArgs):
    """CoNLST: zero-shot cross-lingual NLI with contrastive negative learning and self-training."""

    # -- run (and the flags every script shares: common.run.RunArgs)
    data_dir: str = arg("", "folder of the offline text data (default: $LIS_SHARED_DATA, ./data, ../shared/data)")
    data_source: str = arg("auto", "local where present, else the HF hub (also for missing labels)", choices=SOURCES)
    resume: str = arg("", "run directory to continue from its last checkpoint (any stage, any language); its own"
                      " arguments are used, except --max-steps when given")
    max_steps: int | None = arg(None, "cap on optimizer steps per stage-0/1 epoch and stage-2 iteration (smoke tests)")
    limit_train: int | None = arg(None, "random subset of this many labeled source pairs (default: all)")
    limit_pool: int | None = arg(None, "random subset of N unlabeled target pairs (the same rows in every language)")
    limit_eval: int | None = arg(None, "fixed random subset of the evaluation and selection sets (same for every seed;"
                                 " selection rows disjoint from the evaluation rows)")
    # -- protocol
    lang: str = arg("", "one target language (XNLI code); short for --langs LANG and takes precedence")
    langs: list[str] = arg(["all"], "target languages (XNLI codes) or 'all' (15); stage 0 is trained once for all")
    source_task: str = arg("mnli", "labeled English source: MultiNLI (the paper) or SNLI", choices=["mnli", "snli"])
    source_splits: list[str] = arg(["train"], "source splits, concatenated (snli locally: dev test)")
    source_add: str = arg("none", "ours: add English NLI pairs to every stage's source; sick = all 9,840 SICK pairs "
                          "(--limit-train applies to --source-task only)", choices=["none", "sick"])
    pool_split: str = arg("dev", "XNLI split of the unlabeled target pool (labels dropped)", choices=["dev", "test"])
    eval_split: str = arg("test", "XNLI split of the target language that is evaluated", choices=["dev", "test"])
    select_lang: str = arg("en", "language of the model-selection set (English: zero-shot)")
    select_split: str = arg("dev", "XNLI split of the model-selection set", choices=["dev", "test"])
    stage0_from: str = arg("", "reuse a stage-0 model (same --model): a run directory with stage0.pt, or the file")
    # -- ablations (Table 3, one flag per row) and pipeline switches
    wo_st: bool = arg(False, "Table 3 'w/o self-training': stages 0 and 1 only (CoNL only)")
    wo_cl: bool = arg(False, "Table 3 'w/o contrastive learning': stage 1 uses Eq. 1 on the target instead of L_CL")
    wo_clcs: bool = arg(False, "Table 3 'w/o L_clcs': lambda = 0 in Eq. 8")
    wo_mixup: bool = arg(False, "Table 3 'w/o mixup': stage 2 without mixup views")
    wo_bt: bool = arg(False, "Table 3 'w/o back-translation': stage 2 without back-translated views")
    wo_conl: bool = arg(False, "skip stage 1 (not a Table 3 row); with --wo-st: the zero-shot baseline")
    clcs_only: bool = arg(False, "control (not a Table 3 row): stage 1 trains lambda * L_CLCS alone, no L_CL, to "
                          "show what the contrastive term adds")
    handoff: str = arg("best", "model a stage hands on: its best-English-dev or its last", choices=["best", "last"])
    # -- model
    model: str = arg("bert-base-multilingual-cased", "encoder: HF name or directory, e5-small (offline), or tiny")
    pooling: str = arg("auto", "auto: the encoder's pooler, else mean", choices=["auto", "pooler", "cls", "mean"])
    text_prefix: str = arg("auto", "premise prefix: auto ('query: ' for e5-small, else none), none, or the text")
    max_length: int = arg(128, "max tokens per pair (premise + hypothesis)")
    freeze_embeddings: bool = arg(False, "freeze the word embeddings (CPU preset: speed; targets stay pretrained)")
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
    tau: float = arg(1.0, "Eq. 6 temperature (not given; Prototypical Networks: 1); the cpu runs logged a saturated "
                     "l_cl (d2_pos, d2_neg: the scale); with --con-normalize try 0.05-0.1, chosen on English dev only",
                     gt=0)
    distance: str = arg("sqeuclidean", "Eq. 6 distance (Snell et al.: squared)", choices=["sqeuclidean", "euclidean"])
    con_normalize: bool = arg(False, "L2-normalize the contrastive head's output before the distance (with --tau "
                              "0.05-0.1; off by default until chosen on English dev)")
    comp_label: str = arg("sample", "Eq. 4, max q >= gamma: one class != argmax q, or all", choices=["sample", "all"])
    neg_sharing: str = arg("anchor", "Eq. 5 draws per anchor, or per label per batch", choices=["anchor", "batch"])
    lambda_clcs: float = arg(1e-3, "Eq. 8 lambda (paper: 0.001)")
    # -- stage 2 (self-training)
    s2_iterations: int = arg(3, "stage 2: self-training iterations, each one pass over the pool (not given)")
    s2_lr: float = arg(2e-5, "stage 2: Adam learning rate (not given; ours: stage 0's)", gt=0)
    s2_batch_size: int = arg(32, "stage 2: pool pairs per step (FlexMatch's unlabeled batch; the selected get a view)")
    s2_source_batch_size: int = arg(32, "stage 2: source pairs per step (l_sup, Eq. 13)")
    lambda_u: float = arg(1.0, "Eq. 12 weight of the target loss (paper: 1); 0 = a source-only control")
    flex_threshold: float = arg(0.95, "FlexMatch base threshold (FlexMatch's default)", gt=0, le=1)
    flex_mapping: str = arg("convex", "FlexMatch mapping M: convex x/(2-x) or linear x", choices=["convex", "linear"])
    flex_warmup: bool = arg(True, "FlexMatch threshold warm-up (unused samples count in the normalizer)")
    flex_floor: float = arg(0.0, "ours: floor under every FlexMatch threshold (0: off; e.g. --gamma's value)", ge=0,
                            le=1)
    pl_dropout: bool = arg(False, "stage 2: pseudo-labels from a dropout pass (Sec. 3.3's weak view), not eval mode")
    prior_correction: bool = arg(False, "ours: rescale the stage-0 model's target probabilities so that their mean "
                                 "over the pool is uniform (XNLI is balanced), for zero-shot acc_prior and stage 1")
    mask_ratio: float = arg(0.15, "random masking: probability of masking each token (not given)", lt=1)
    mixup_alpha: float = arg(4.0, "Eq. 11 Beta(alpha, alpha) (paper: 4)", gt=0)
    bt: str = arg("mbart", "mbart (from common.back_translate), file (--bt-file)", choices=["mbart", "file", "off"])
    bt_file: str = arg("", "precomputed back-translations: TSV lines 'original<TAB>back-translation' (any languages)")
    bt_model: str = arg("facebook/mbart-large-50-many-to-many-mmt", "translation model for --bt mbart")
    bt_pivot: str = arg("en", "pivot language of back-translation (for a target equal to it: fr)")
    bt_cache_dir: str = arg("", "where the mBART back-translations are (default: ~/.cache/lis/backtranslation)")
    bt_batch_size: int = arg(32, "sentences per mBART generation batch (of the back-translation command)")
    keep_models: bool = arg(False, "keep each language's stage1_LANG.pt and stage2_LANG.pt (large; stage0.pt is kept)")


PRESETS = {
    "xlmr": {"_doc": "paper XLM-R-large (Table 2): stage-1 lr 5e-6; stage 0/2 lr 7e-6 (ours)",
             "model": "xlm-roberta-large", "s1_lr": 5e-6, "s0_lr": 7e-6, "s2_lr": 7e-6},
    "cpu": {"_doc": "CPU scale (~15 min per language and seed on 2 cores in fp32): e5-small, SNLI dev+test (3,000 "
                    "pairs) -> XNLI test pool (800, no labels), eval on XNLI dev (1,000), selection on English XNLI "
                    "dev (1,000), no back-translation, gamma 0.45 (why: docs/conlst.md)",
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
    check_transfer_args(args, langs)  # languages, selection language, splits (common.text_data)
    if args.wo_conl and (args.wo_cl or args.wo_clcs):
        raise UsageError("--wo-conl: skips stage 1, so --wo-cl / --wo-clcs have nothing to act on")
    if args.clcs_only and (args.wo_conl or args.wo_cl or args.wo_clcs):
        raise UsageError("--clcs-only: stage 1 with L_CLCS alone; not with --wo-conl, --wo-cl or --wo-clcs")
    if args.wo_st and (args.wo_mixup or args.wo_bt):
        raise UsageError("--wo-st: skips stage 2, so --wo-mixup / --wo-bt have nothing to act on")
    check_bt_args(args)  # --bt, --bt-file, --bt-pivot (common.back_translate)
    if args.pooling == "pooler" and args.model == "e5-small":
        raise UsageError("--pooling pooler: e5-small has no pooler weights; use mean (its convention) or cls")


def stages_of(args: Args) -> list[int]:
    """The stages a target language goes through after stage 0."""
    return [s for s, off in ((1, args.wo_conl), (2, args.wo_st)) if not off]


def method_name(args: Args) -> str:
    if args.wo_conl and args.wo_st:
        return "zeroshot"
    name = "conlst"
    for flag in ("wo_st", "wo_cl", "wo_clcs", "wo_mixup", "wo_bt", "wo_conl", "clcs_only"):
        if getattr(args, flag):
            name += "_" + flag
    return name


def bt_enabled(args: Args) -> bool:
    return 2 in stages_of(args) and not args.wo_bt and args.bt != "off"


# ==== Data: common.text_data.load_xnli_transfer (English source, unlabeled target pool, target evaluation set,
# English selection set); common.back_translate.load_backtranslations (back-translations of the pool) =======


# ==== Model: encoder, pooled sentence vector, classifier theta_cl and contrastive head theta_con (linear) ===
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
    `tiny`: a random 2-layer BERT whose tokenizer is trained on the run's own texts. Pooling: the
    encoder's pooler when it has one (mBERT, XLM-R), else mean pooling with E5's "query: " prefix."""
    if args.model == "tiny":
        encoder, tok = tiny_encoder(tiny_texts, hidden=32, layers=2, heads=2, vocab_size=3000,
                                    max_length=args.max_length, seed=args.seed)
    else:
        encoder, tok = load_encoder(args.model)
    pooling = resolve_pooling(encoder, args.pooling, args.model)
    prefix = {"auto": "query: " if args.model == "e5-small" else "", "none": ""}.get(args.text_prefix, args.text_prefix)
    model = CoNLSTModel(encoder, pooling, args.con_dim, args.classifier_dropout)
    if args.freeze_embeddings:
        freeze_word_embeddings(model)
    if tok.mask_token_id is None and 2 in stages_of(args):
        raise UsageError(f"--model {args.model}: its tokenizer has no mask token, which random masking needs")
    return model, tok, prefix


# ==== The method: Eq. 4, 5, 6, 1 and 7, FlexMatch thresholds, random masking, mixup (Eq. 9-11) ============
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
                         mapping: str = "convex", previous: torch.Tensor | None = None,
                         floor: float = 0.0) -> torch.Tensor:
    """Class-wise thresholds T_c = max(floor, base * M(beta_c)), beta_c = sigma_c / max(max_c sigma_c,
    #unused) with warm-up (sigma_c / max_c sigma_c without), sigma_c = #{i: memory_i = c}; M(x) =
    x/(2-x) (convex) or x. As FlexMatch, no update while one value fills the memory (all unused: the
    start; all one class): `previous` stays (None: T_c = 0, FlexMatch's start). floor: ours, 0 = off."""
    counts = torch.bincount(memory + 1, minlength=num_classes + 1).float()  # [#unused, sigma_0, sigma_1, ...]
    if counts.max() >= memory.numel():
        thr = previous if previous is not None else torch.zeros(num_classes)
    else:
        sigma = counts[1:]
        beta = sigma / (counts.max() if warmup else sigma.max())
        thr = base * (beta / (2.0 - beta) if mapping == "convex" else beta)
    return thr.clamp(min=floor)


def flexmatch_step(memory: torch.Tensor, previous: torch.Tensor | None, idx: torch.Tensor, probs: torch.Tensor,
                   args: Args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FlexMatch step on the unlabeled batch `idx` (pool rows, pseudo-label probabilities `probs`):
    thresholds from the memory as it stands, the batch's selection (Eq. 14), then the memory updated in
    place (FlexMatch's order). Returns (selected mask, pseudo-labels, thresholds)."""
    conf, pred = probs.max(1)
    thr = flexmatch_thresholds(memory, NUM_CLASSES, args.flex_threshold, args.flex_warmup, args.flex_mapping,
                               previous, args.flex_floor)
    memory[idx] = flexmatch_update_memory(memory[idx], conf, pred, args.flex_threshold)
    return select_confident_eq14(conf, pred, thr), pred, thr


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


# ==== Batches and steps: each *_step(model, batch, args) -> (loss, terms) is one step's forward and loss ===
def rows(enc: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in enc.items()}


def make_ft_batch(net: Net, examples: list[Example]) -> dict:
    """A labeled source batch."""
    enc = tokenize_pairs(net.tok, [(e.text_a, e.text_b) for e in examples], net.prefix, net.max_length)
    labels = torch.tensor([e.label for e in examples], device=net.device)
    return {"src": to_device(enc, net.device), "src_labels": labels}


def ft_step(model: CoNLSTModel, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """Plain fine-tuning (stage 0, and the baseline of the stage-1 speed ratio): CE on source."""
    loss = F.cross_entropy(model(batch["src"]).float(), batch["src_labels"])
    return loss, {"l_ce": loss.detach()}


def make_conl_batch(net: Net, pool: list[tuple[str, str]], anchor_pairs: list[tuple[str, str]], comp_mask: torch.Tensor,
                    neg_idx: torch.Tensor, neg_valid: torch.Tensor, source: list[Example]) -> dict:
    """Anchors and their unique negatives (rows of `pool`) tokenized together (one padding);
    neg_pos [B, K] points at the negatives' rows after the anchors."""
    uniq = torch.unique(neg_idx[neg_valid]) if neg_valid.any() else torch.zeros(0, dtype=torch.long)
    neg_pos = (torch.searchsorted(uniq, neg_idx).clamp(max=max(len(uniq) - 1, 0)) if len(uniq)
               else torch.zeros_like(neg_idx))
    enc = tokenize_pairs(net.tok, anchor_pairs + [pool[i] for i in uniq.tolist()], net.prefix, net.max_length)
    batch = {"tgt": to_device(enc, net.device), "n_anchor": len(anchor_pairs),
             "neg_pos": neg_pos.to(net.device), "neg_valid": neg_valid.to(net.device),
             "comp_mask": comp_mask.to(net.device)}
    if source:
        batch.update(make_ft_batch(net, source))
    return batch


def conl_step(model: CoNLSTModel, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """Stage 1: L_CoNL = L_CL + lambda * L_CLCS (Eq. 8). One encoder pass over [anchors,
    anchors again (the second dropout view), negatives]; the classifier learns only through
    L_CLCS. --wo-cl: Eq. 1 on the anchors (their Eq. 4 labels) instead of L_CL; --clcs-only: lambda *
    L_CLCS alone. Also logged: no_neg_frac (anchors without a negative) and the distance scale as the loss
    sees it: d2_pos (anchor-positive), d2_neg_sum / n_neg (mean over the valid anchor-negative pairs)."""
    if args.clcs_only:  # the control: a source batch only
        l_clcs = clcs_loss_eq7(model(batch["src"]), batch["src_labels"])
        return args.lambda_clcs * l_clcs, {"l_clcs": l_clcs.detach()}
    b, tgt = batch["n_anchor"], batch["tgt"]
    n_rows = tgt["input_ids"].shape[0]
    terms: dict[str, torch.Tensor] = {}
    if args.wo_cl:  # negative learning with cross-entropy on the target's complementary labels
        terms["l_nl"] = negative_learning_loss_eq1(model(rows(tgt, torch.arange(b, device=tgt["input_ids"].device))),
                                                   batch["comp_mask"])
        loss = terms["l_nl"]
    else:
        dev = tgt["input_ids"].device
        anchors = torch.arange(b, device=dev)
        order = torch.cat([anchors, anchors, torch.arange(b, n_rows, device=dev)])
        h = model.con_head(model.pool(rows(tgt, order))).float()
        if args.con_normalize:
            h = F.normalize(h, dim=-1)
        h_anchor, h_pos, h_negs = h[:b], h[b:2 * b], h[2 * b:]
        h_neg = h_negs[batch["neg_pos"]] if h_negs.shape[0] else h.new_zeros(b, batch["neg_pos"].shape[1], h.shape[1])
        terms["l_cl"] = contrastive_negative_loss_eq6(h_anchor, h_pos, h_neg, batch["neg_valid"], args.tau,
                                                      args.distance)
        terms["no_neg_frac"] = (~batch["neg_valid"].any(1)).float().mean()
        terms["d2_pos"] = (h_anchor - h_pos).pow(2).sum(-1).mean()
        d2_neg = (h_anchor[:, None, :] - h_neg).pow(2).sum(-1)
        terms["d2_neg_sum"], terms["n_neg"] = d2_neg[batch["neg_valid"]].sum(), batch["neg_valid"].sum().float()
        loss = terms["l_cl"]
    if not args.wo_clcs and "src" in batch:
        terms["l_clcs"] = clcs_loss_eq7(model(batch["src"]), batch["src_labels"])
        loss = loss + args.lambda_clcs * terms["l_clcs"]
    return loss, {k: v.detach() for k, v in terms.items()}


def make_st_batch(net: Net, args: Args, bt: dict[str, str] | None, pairs: list[tuple[str, str]], kinds: list[str],
                  labels: list[int], source: list[Example]) -> dict:
    """Stage 2: one strong view per target sample: 'bt' (the back-translated pair), 'mask'
    (random token masking) or 'mixup' (the original text; its pooled vector is mixed in the
    step with a random other sample of the batch, lambda ~ Beta(alpha, alpha)). No pairs: source only."""
    if not pairs:
        return make_ft_batch(net, source)
    view_pairs = [bt_pair(bt, p) if k == "bt" else p for p, k in zip(pairs, kinds)]
    enc = tokenize_pairs(net.tok, view_pairs, net.prefix, net.max_length, maskable=True)
    to_mask = torch.tensor([k == "mask" for k in kinds])
    masked = random_token_masking(enc["input_ids"], enc.pop("maskable") & to_mask[:, None], args.mask_ratio,
                                  net.tok.mask_token_id)
    enc["input_ids"] = masked
    b = len(pairs)
    is_mixup = torch.tensor([k == "mixup" for k in kinds])
    partner = (torch.arange(b) + torch.randint(1, max(b, 2), (b,))) % b if b > 1 else torch.zeros(1, dtype=torch.long)
    batch = {"tgt": to_device(enc, net.device), "tgt_labels": torch.tensor(labels, device=net.device),
             "is_mixup": is_mixup.to(net.device), "partner": partner.to(net.device),
             "lam": sample_mixup_lambda_eq11(b, args.mixup_alpha).to(net.device)}
    batch.update(make_ft_batch(net, source))
    return batch


def st_step(model: CoNLSTModel, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """Stage 2: L_SSL = CE(source) + lambda_u * CE(target views, hard pseudo-labels; soft for
    mixup rows) (Eq. 12-14). u_frac (selected / unlabeled batch; default 1) makes the target term
    FlexMatch's mean over the whole unlabeled batch, the unselected counting 0 (l_u logs that term)."""
    l_sup = F.cross_entropy(model(batch["src"]).float(), batch["src_labels"])
    if "tgt" not in batch:  # nothing selected in this batch
        return l_sup, {"l_sup": l_sup.detach(), "l_u": torch.zeros(())}
    pooled = model.pool(batch["tgt"])
    onehot = F.one_hot(batch["tgt_labels"], NUM_CLASSES).to(pooled.dtype)
    p = batch["partner"]
    mixed_x, mixed_y = mixup_eq9_10(pooled, pooled[p], onehot, onehot[p], batch["lam"])
    m = batch["is_mixup"][:, None]
    x, y = torch.where(m, mixed_x, pooled), torch.where(m, mixed_y, onehot)
    l_u = batch.get("u_frac", 1.0) * soft_cross_entropy(model.classify(x), y.float())
    return l_sup + args.lambda_u * l_u, {"l_sup": l_sup.detach(), "l_u": l_u.detach()}


# ==== The three stages (evaluation, train_step, record_eval, save, check_stop, finish_stage: common.stages) =====
# ---- stage 0: English fine-tuning (ours: AdamW, linear warm-up then decay, best English-dev epoch) ----------
def stage0(run: Run, net: Net, data: XnliData, prog: Progress, resumed: dict, path: Path) -> None:
    args, source, item = run.args, data.source, prog.item
    bs = args.s0_batch_size
    n_batches = math.ceil(len(source) / bs)
    per_epoch = min(n_batches, args.max_steps or n_batches)
    total = per_epoch * args.s0_epochs
    opt = torch.optim.AdamW(trainable(net.model), lr=args.s0_lr, weight_decay=args.s0_weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(args.s0_warmup * total), total)  # from 0 up, then down to 0
    if resumed.get("optimizer"):
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
    net.model.train()
    for epoch in range(item.get("epoch", 0), args.s0_epochs):
        order = grouped_order(source, bs, pass_key(args.seed, "s0", epoch))
        bar = tqdm(range(item.get("batch", 0), per_epoch), desc=f"stage 0 epoch {epoch + 1}/{args.s0_epochs}",
                   leave=False, disable=None)
        for b in bar:
            ex = [source[i] for i in order[b * bs:(b + 1) * bs]]
            loss = train_step(run, net, prog, opt, sched, ft_step, make_ft_batch(net, ex), len(ex))
            bar.set_postfix(loss=f"{loss:.3f}")
            item["batch"] = b + 1
            if args.s0_eval_every and item["batch"] % args.s0_eval_every == 0 and item["batch"] < per_epoch:
                record_eval(run, net, data, prog, 0, None, epoch + item["batch"] / per_epoch,
                            {"lr": sched.get_last_lr()[0]})
                save(run, prog, opt, sched)
            check_stop(run, prog, opt, sched)
        item["epoch"], item["batch"] = epoch + 1, 0
        record_eval(run, net, data, prog, 0, None, epoch + 1, {"lr": sched.get_last_lr()[0]})
        save(run, prog, opt, sched)
    best = finish_stage(run, net, prog, path, con_dim=args.con_dim)
    print(f"stage 0 done: English dev {best.get('en_dev_acc', float('nan')):.2f} (step {best.get('step')}) -> {path}")


def zero_shot(run: Run, net: Net, data: XnliData, prog: Progress, lang: str, stage0_path: Path) -> None:
    """The stage-0 model on a target language (the zero-shot baseline, and Table 4's 'before')."""
    meta = load_trainable(stage0_path, net.model, HANDOFF)
    known = (meta.get("record") or {}).get("en_dev_acc")  # stage 0's own English-dev result
    _, probs = record_eval(run, net, data, prog, 0, lang, 0, en_dev_acc=known, keep=False)
    diagnose(run, net, data, prog, lang, "after_stage0", probs)
    res, bs = prog.results[lang], run.args.eval_batch_size
    res["stage0_pred_frac"] = class_fractions(probs)  # XNLI is balanced: 1/3 each
    if run.args.prior_correction:  # ours: weights from the unlabeled pool, applied to the evaluation set
        res["prior_correction"] = prior_correction_record(net, data.targets[lang], probs, bs)


# ---- stage 1: contrastive negative learning (Eq. 4-8) --------------------------------------------------------
def stage1_conl(run: Run, net: Net, data: XnliData, prog: Progress, lang: str, resumed: dict,
                stage0_path: Path) -> None:
    args, item, pool = run.args, prog.item, data.targets[lang].pool
    if "probs" not in item:  # fresh start: the stage-0 model's pseudo-labels, fixed for the stage
        load_trainable(stage0_path, net.model, HANDOFF)
        item["probs"] = predict(net, pool, args.eval_batch_size)
        if args.prior_correction:  # ours: toward the balanced target
            item["prior_weights"] = balanced_prior_weights(item["probs"])
            item["probs"] = prior_corrected(item["probs"], item["prior_weights"])
    probs = item["probs"]
    hc_idx, hc_label = high_confidence_pool_eq5(probs, args.gamma)
    stats = confident_pool_record(f"stage 1 {lang}", len(pool), hc_label, NUM_CLASSES, args.gamma,
                                  warn=not (args.wo_cl or args.clcs_only))  # warns when fewer than 2 classes
    prog.results.setdefault(lang, {})["stage1_pool"] = {**stats, "prior_weights": item.get("prior_weights")}
    stats = prog.results[lang]["stage1_pool"]
    opt = torch.optim.Adam(trainable(net.model), lr=args.s1_lr)
    if resumed.get("optimizer"):
        opt.load_state_dict(resumed["optimizer"])
    src = SourceStream(data.source, args.seed, f"s1-{lang}", item.get("src"))
    bs = args.s1_batch_size
    n_batches = math.ceil(len(pool) / bs)
    per_epoch = min(n_batches, args.max_steps or n_batches)
    net.model.train()
    for epoch in range(item.get("epoch", 0), args.s1_epochs):
        order = grouped_order(pool, bs, pass_key(args.seed, "s1", lang, epoch))
        bar = tqdm(range(item.get("batch", 0), per_epoch), desc=f"stage 1 {lang} epoch {epoch + 1}/{args.s1_epochs}",
                   leave=False, disable=None)
        for b in bar:
            anchors = torch.tensor(order[b * bs:(b + 1) * bs])
            comp = complementary_labels_eq4(probs[anchors], args.gamma, args.comp_label)  # Eq. 4
            if args.wo_cl or args.clcs_only:  # no negatives needed
                neg_idx, neg_valid = torch.zeros(len(anchors), 0, dtype=torch.long), torch.zeros(len(anchors), 0).bool()
            else:  # Eq. 5
                neg_idx, neg_valid = sample_negatives_eq5(comp, hc_idx, hc_label, args.k_neg, args.neg_sharing)
                no_neg = item.get("no_neg", [0, 0])
                item["no_neg"] = [no_neg[0] + int((~neg_valid.any(1)).sum()), no_neg[1] + len(anchors)]
            source = [] if args.wo_clcs else src.next(args.s1_source_batch_size)  # Eq. 7's source batch
            batch = make_ft_batch(net, source) if args.clcs_only else \
                make_conl_batch(net, pool, [pool[i] for i in anchors.tolist()], comp, neg_idx, neg_valid, source)
            loss = train_step(run, net, prog, opt, None, conl_step, batch, len(anchors) + len(source))  # Eq. 6-8
            bar.set_postfix(loss=f"{loss:.3f}")
            item["batch"], item["src"] = b + 1, src.state
            if args.s1_eval_every and item["batch"] % args.s1_eval_every == 0 and item["batch"] < per_epoch:
                record_eval(run, net, data, prog, 1, lang, epoch + item["batch"] / per_epoch, distance_scale(run))
                save(run, prog, opt)
            check_stop(run, prog, opt)
        item["epoch"], item["batch"] = epoch + 1, 0
        record_eval(run, net, data, prog, 1, lang, epoch + 1, {"high_conf": stats["high_conf"], **distance_scale(run),
                                                               "high_conf_classes": stats["high_conf_classes"]})
        stats["no_neg_frac"] = item["no_neg"][0] / max(item["no_neg"][1], 1) if "no_neg" in item else None
        save(run, prog, opt)
    finish_stage(run, net, prog, run.dir / f"stage1_{lang}.pt", con_dim=args.con_dim)
    diagnose(run, net, data, prog, lang, "after_stage1", item.get("best_probs"))


# ---- stage 2: self-training (FlexMatch selection, strong views, Eq. 9-14) ---------------------------------------
def strong_views(args: Args, target: TargetData, rows: list[int]) -> list[str]:
    """One strong view per selected pool row, drawn uniformly among those enabled (back-translation
    only where one exists)."""
    kinds = ["mask"] + ([] if args.wo_mixup else ["mixup"])
    options = [kinds + ["bt"] if bt_enabled(args) and bt_pair(target.bt, target.pool[i]) else kinds for i in rows]
    return [o[int(torch.randint(len(o), (1,)))] for o in options]


def stage2_self_training(run: Run, net: Net, data: XnliData, prog: Progress, lang: str, resumed: dict,
                         start: Path) -> None:
    """FlexMatch every step: a batch of the pool is pseudo-labeled by the current model (hard labels,
    Eq. 14's text; eval mode, or a dropout pass with --pl-dropout), selected with the class-wise
    thresholds, the memory updated (flexmatch_step), one strong view per selected sample trained on;
    an iteration is one pass over the pool. metrics.jsonl gets a 'flexmatch' line every step."""
    args, item, target = run.args, prog.item, data.targets[lang]
    pool = target.pool
    if "memory" not in item:  # fresh start from stage 1's hand-off (or stage 0's with --wo-conl)
        load_trainable(start, net.model, HANDOFF)
        item["memory"] = torch.full((len(pool),), -1, dtype=torch.long)
    opt = torch.optim.Adam(trainable(net.model), lr=args.s2_lr)
    if resumed.get("optimizer"):
        opt.load_state_dict(resumed["optimizer"])
    src = SourceStream(data.source, args.seed, f"s2-{lang}", item.get("src"))
    bs = args.s2_batch_size
    per_iter = min(math.ceil(len(pool) / bs), args.max_steps or len(pool))
    net.model.train()
    iters = prog.results.setdefault(lang, {}).setdefault("stage2_iterations", [])
    for it in range(item.get("iter", 0), args.s2_iterations):
        order = grouped_order(pool, bs, pass_key(args.seed, "s2", lang, it))
        bar = tqdm(range(item.get("batch", 0), per_iter), leave=False, disable=None,
                   desc=f"stage 2 {lang} iteration {it + 1}/{args.s2_iterations}")
        for b in bar:
            idx = torch.tensor(order[b * bs:(b + 1) * bs])
            probs = predict(net, [pool[i] for i in idx.tolist()], args.eval_batch_size, dropout=args.pl_dropout)
            sel, pred, item["thr"] = flexmatch_step(item["memory"], item.get("thr"), idx, probs, args)
            picked, labels = idx[sel].tolist(), pred[sel]
            kinds = strong_views(args, target, picked)
            source = src.next(args.s2_source_batch_size)
            batch = make_st_batch(net, args, target.bt, [pool[r] for r in picked], kinds, labels.tolist(), source)
            batch["u_frac"] = len(picked) / len(idx)
            loss = train_step(run, net, prog, opt, None, st_step, batch, len(picked) + len(source))  # Eq. 12-14
            item["tally"] = tally_step(item.get("tally"), target, len(idx), picked, labels, kinds, NUM_CLASSES)
            run.log(prog.step, "flexmatch", stage=2, lang=lang, iteration=it + 1, batch=len(idx),
                    **flexmatch_record(item["memory"], item["thr"], NUM_CLASSES, labels))
            bar.set_postfix(loss=f"{loss:.3f}")
            item["batch"], item["src"] = b + 1, src.state
            check_stop(run, prog, opt)
        t = item.pop("tally", None) or tally_step(None, target, 0, [], torch.zeros(0, dtype=torch.long), [],
                                                  NUM_CLASSES)
        iters.append({"iteration": it + 1, **t, "selected_frac": t["n_selected"] / max(t["n_seen"], 1),
                      **flexmatch_record(item["memory"], item["thr"], NUM_CLASSES)})
        tqdm.write(f"[stage 2 {lang}] iteration {it + 1}: {iters[-1]}")
        item["iter"], item["batch"] = it + 1, 0
        record_eval(run, net, data, prog, 2, lang, it + 1, {"n_selected": t["n_selected"]})
        save(run, prog, opt)
    finish_stage(run, net, prog, run.dir / f"stage2_{lang}.pt" if args.keep_models else None, con_dim=args.con_dim)
    diagnose(run, net, data, prog, lang, "after_stage2", item.get("best_probs"))


# ==== The summary, main ====================================================================================
def build_summary(args: Args, data: XnliData, prog: Progress, langs: list[str], stage0_path: Path) -> dict:
    head = {"script": "conlst.py", "method": method_name(args), "dataset": "xnli",
            "setting": f"{args.source_task}->{'+'.join(langs) if len(langs) < len(XNLI_LANGS) else 'all'}",
            "seed": args.seed, "primary_metric": "acc", "model": args.model, "langs": langs,
            "protocol": {"source": f"{args.source_task} {'+'.join(args.source_splits)}"
                                   f"{' + sick' if args.source_add == 'sick' else ''} ({len(data.source)} pairs)",
                         "pool": f"xnli {args.pool_split} (labels dropped)", "eval": f"xnli {args.eval_split}",
                         "select": f"xnli-{args.select_lang} {args.select_split} ({len(data.select)} pairs)",
                         "back_translation": args.bt if bt_enabled(args) else "off"}}
    return staged_summary(head, args.handoff, prog, langs, stage0_path)


def main(args: Args) -> dict:
    run = Run("conlst.py", Args, args, validate, keys=CHECKPOINT_KEYS)  # only --max-steps may change on --resume
    args = run.args
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)
    langs = resolve_langs(args)

    # ---- data, back-translations, model (before the run directory: a failure writes nothing)
    data_record: dict = {}
    data = load_xnli_transfer(args, langs, data_record)
    check_transfer_sizes(args, data, stages_of(args))
    model, tok, prefix = build_model(args, [s for e in data.source for s in (e.text_a, e.text_b)]
                                     + [s for t in data.targets.values() for p in t.pool for s in p])
    model.to(device)
    if bt_enabled(args):
        for lang in langs:
            data.targets[lang].bt = load_backtranslations(args, lang, data.targets[lang].pool)
    stage0_file = handoff_file("--stage0-from", args.stage0_from, "stage0.pt", args.seed, model=args.model,
                               con_dim=args.con_dim, pooling=model.pooling, prefix=prefix) if args.stage0_from else None
    net = Net(model, tok, prefix, args.max_length, device, amp_dtype,
              torch.amp.GradScaler(device.type, enabled=use_scaler))

    # ---- the plan: stage 0 (unless reused), then per language: zero-shot evaluation, stage 1, stage 2
    plan: list[tuple[str, str | None]] = [] if stage0_file else [("s0", None)]
    for lang in langs:
        plan += [("zs", lang)] + [(f"s{s}", lang) for s in stages_of(args)]
    ckpt = run.restore(model=TrainableState(model, f"--resume {args.resume}"), scaler=net.scaler)  # {}: a new run
    prog = Progress(**checkpoint_fields(ckpt)) if ckpt else Progress()
    start = prog.plan_pos
    if not isinstance(start, int) or not 0 <= start <= len(plan):
        raise MissingError(f"--resume {args.resume}: checkpoint.pt does not fit this run (plan item {start})")
    setting = f"{args.source_task}-{'+'.join(langs) if len(langs) < len(XNLI_LANGS) else 'all'}"
    run.open(utils.run_name(method_name(args), "xnli", setting, args.seed, args.exp_name),
             files={"data_subsets.json": data_record},
             resumed_at=f"at plan item {start} ({plan[start] if start < len(plan) else 'done'}), step {prog.step}")
    stage0_path = stage0_file or run.dir / "stage0.pt"
    print(f"run: {run.dir}  |  {method_name(args)}  {args.model} ({model.pooling} pooling"
          f"{', prefix ' + repr(prefix) if prefix else ''})  |  source {args.source_task} {len(data.source)}  |  "
          f"langs {' '.join(langs)}  |  back-translation {args.bt if bt_enabled(args) else 'off'}  |  device {device}, "
          f"precision {amp_dtype or 'fp32'}")

    with run:
        for pos in range(start, len(plan)):
            kind, lang = plan[pos]
            resumed = ckpt if pos == start and prog.item else {}  # continue the stage the checkpoint is in
            prog.plan_pos = pos
            if kind == "s0":  # stage 0: English fine-tuning
                stage0(run, net, data, prog, resumed, stage0_path)
            elif kind == "zs":  # the stage-0 model on the target language
                zero_shot(run, net, data, prog, lang, stage0_path)
            elif kind == "s1":  # stage 1: CoNL
                stage1_conl(run, net, data, prog, lang, resumed, stage0_path)
            else:  # stage 2: self-training, from stage 1's hand-off (stage 0's with --wo-conl)
                stage2_self_training(run, net, data, prog, lang, resumed,
                                     stage0_path if args.wo_conl else run.dir / f"stage1_{lang}.pt")
            prog.plan_pos, prog.item = pos + 1, {}
            save(run, prog)  # the checkpoint to resume from
            if kind == "s2" and not args.keep_models:  # stage 1's hand-off is no longer needed
                (run.dir / f"stage1_{lang}.pt").unlink(missing_ok=True)
            run.write_summary(build_summary(args, data, prog, langs, stage0_path))
            check_stop(run, prog)  # a Ctrl-C during an evaluation-only item
    (run.dir / "best_in_stage.pt").unlink(missing_ok=True)

    summary = run.finish(build_summary(args, data, prog, langs, stage0_path))
    print_table(summary, stages_of(args), run.dir)
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
