"""MSMO: Multi-Scale and Multi-Objective optimization for cross-lingual aspect-based sentiment.

Paper: "MSMO-ABSA" (arXiv 2502.13718), of which only a summary is available; the code follows it,
then the authors' incomplete repository (swaggy66/MSMO), then the XABSA benchmark (IsakZhang/XABSA).
Each choice carries its source's tag, [summary], [repo], [xabsa] or [ours]; docs/msmo.md lists them.

Aspect-based sentiment as token tagging (BIEOS), trained on English (SemEval-2016 restaurants) and
tested zero-shot on fr, es, nl or ru by XABSA's micro-F1 on exact (begin, end, polarity) aspects. One
MSMO step, on a batch of the ACS mixture (English gold, translated smt-XX, code-switched cs_en-XX and
cs_XX-en) and a batch of aligned code-switched sentence pairs:

  L = CE(tags at words' first sub-tokens, past a bare "▁")          tagging           [xabsa/repo]
    + lambda * W,  W = mean_tok Q(h_source) - mean_tok Q(h_target)  sentence level    [repo]
        (critic Q: n_critic Adam steps maximizing W on the detached features, clipped to +-c)
    + beta * mean_aspects (KL(p||q) + KL(q||p)) / 2                aspect level        [repo]
        (p, q: [POS, NEG, NEU, O, rest] of an aspect and of the same aspect code-switched)
  schedule: CE + lambda W, then CE + beta KL [summary]; --schedule joint: all three terms [repo]
  MSMO-Distill: MSE(softmax(student), mean_t softmax(teacher_t)) on unlabeled target text [xabsa/repo]

    python msmo.py --preset smoke                        # seconds: tiny random BERT, real XABSA files
    python msmo.py --preset cpu --method acs --lang fr   # CPU scale (e5-small); zero_shot, acs, supervised
    python msmo.py --lang fr                             # MSMO, mBERT, the paper's setting (GPU)
    python msmo.py --lang nl --no-cons                   # an ablation: without the aspect-level objective
    python msmo.py --lang fr --distill --teachers runs/B runs/C   # MSMO, then MSMO-Distill in the same run
    python msmo.py --resume runs/<run>                   # continue (teacher training or distillation)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common import utils
from common.diagnostics import grad_norm_ratios, means_by_group
from common.run import Run, RunArgs, stages_summary, trained_run
from common.text_data import (POLARITIES, XABSA_LANGS, XABSA_TARGETS, AcsData, BatchStreams, EncodedSentence,
                              LengthGroupedBatches, acs_step_batches, check_acs_sizes, encode_acs_data,
                              load_acs_data, tag_list, word_tags_f1)
from common.text_data import tagging_batch  # noqa: F401 (benchmarks/speed.py, gpu_check.py use msmo.tagging_batch)
from common.text_models import (GradReverse, TrainableState, freeze_word_embeddings, load_trainable_state,
                                saved_taggers_softmax, tagger_word_tags, trainable_state, xabsa_encoder)
from common.utils import MissingError, UsageError, arg

METHODS = ("msmo", "acs", "zero_shot", "supervised", "distill")


# ==== Arguments (defaults: the paper's mBERT setting, from the repository's run script) ==============
@dataclass
class Args(RunArgs):
    """MSMO, its baselines (zero-shot, ACS, supervised) and MSMO-Distill on XABSA."""

    # -- run (and the flags every script shares: common.run.RunArgs)
    data_dir: str = arg("", "folder in the layout of shared/data holding xabsa/DOMAIN/*.txt "
                            "(default: $LIS_SHARED_DATA, ./data, ../shared/data; docs/data.md)")
    max_steps: int | None = arg(None, "stop each stage after this many optimizer steps (smoke tests; the "
                                      "learning-rate schedule still spans --steps / --distill-steps)")
    limit_train: int | None = arg(None, "use the first N sentences of each training file (default: all)")
    limit_eval: int | None = arg(None, "evaluate on the first N sentences of each dev/test file (default: all)")
    model: str = arg("bert-base-multilingual-cased", "encoder: a HF hub name or local directory, e5-small / "
                                                     "minilm-l6 (offline wheels), or tiny (random 2-layer BERT)")
    # -- data
    lang: str = arg("fr", "target language", choices=list(XABSA_TARGETS))
    eval_langs: list[str] = arg([], "target-language test sets to report (default: --lang), e.g. fr es nl ru")
    domain: str = arg("rest", "XABSA domain folder under xabsa/")
    tagging: str = arg("bieos", "tag scheme: bieos (XABSA, the repository) or bio (the summary's wording)",
                       choices=["bieos", "bio"])
    max_len: int = arg(128, "maximum sub-tokens per sentence, special tokens included", ge=8)
    # -- method
    method: str = arg("msmo", "msmo, a baseline (acs, zero_shot, supervised) or distill (MSMO-Distill from "
                              "--teachers)", choices=list(METHODS))
    # -- optimisation
    lr: float = arg(5e-5, "learning rate (Adam, linear decay to 0, no warm-up)", gt=0)
    head_lr: float | None = arg(None, "teacher training: learning rate of the linear tagger head (default: --lr, as "
                                      "the repository; the distilled student uses --distill-lr throughout)", gt=0)
    batch_size: int = arg(16, "sentences per tagging-CE batch")
    steps: int = arg(2000, "encoder optimizer steps of teacher training")
    max_grad_norm: float = arg(1.0, "gradient-norm clip of the encoder and tagger", gt=0)
    freeze_embeddings: bool = arg(False, "keep the word-embedding matrix fixed (CPU preset)")
    eval_every: int = arg(100, "evaluate (and checkpoint) every N steps, and at the end")
    select_from: int = arg(1500, "model selection: best dev F1 among evaluations at step >= N", ge=0)
    select_dev: str = arg("auto", "dev set for model selection: en, target, or auto (target for supervised, "
                                  "else English)", choices=["auto", "en", "target"])
    test_every_eval: bool = arg(False, "evaluate the test sets at every evaluation (default: each new best, the last)")
    metric: str = arg("xabsa", "span F1: xabsa (XABSA's official metric: lenient decoding, 1e-4 smoothing, words "
                               "cut off dropped) or seqeval (strict IOBES; before #23)", choices=["xabsa", "seqeval"])
    label_piece: str = arg("xabsa", "tagged sub-token: xabsa (after a bare SentencePiece '\u2581' first piece: XABSA's "
                                    "fix_space_issue) or first (before #23)", choices=["xabsa", "first"])
    diag_every: int = arg(20, "every N steps log each added term's encoder-gradient norm relative to the tagging "
                              "CE's, W and l_cons (metrics.jsonl split diag; summary.json per phase); 0: never", ge=0)
    # -- MSMO: sentence level
    adv: bool = arg(True, "msmo: the sentence-level adversarial objective (--no-adv: ablation)")
    adversary: str = arg("wgan", "wgan: Wasserstein critic (repository); grl: language classifier behind "
                                 "gradient reversal (the summary's 'flipping gradients')", choices=["wgan", "grl"])
    lambda_adv: float = arg(0.01, "weight of the adversarial term in the encoder's loss")
    critic_clip: float = arg(0.01, "wgan: critic weights clipped to [-c, c]", gt=0)
    critic_steps: int = arg(5, "wgan: critic updates per encoder step")
    critic_steps_warm: int = arg(10, "wgan: critic updates in the first --critic-warm-steps steps and every "
                                     "--critic-warm-every-th")
    critic_warm_steps: int = arg(25, "wgan: steps with --critic-steps-warm critic updates at the start", ge=0)
    critic_warm_every: int = arg(500, "wgan: every N-th step also gets --critic-steps-warm updates")
    critic_lr: float | None = arg(None, "critic / language-classifier learning rate (Adam; default --lr)", gt=0)
    critic_data: str = arg("batch", "batch: critic steps reuse the encoder step's detached features; fresh: new "
                                    "source/target batches per critic step, encoded without gradient (repository)",
                           choices=["batch", "fresh"])
    critic_codeswitch: bool = arg(True, "feed the code-switched sets to the critic (summary); off: only gold-en vs "
                                        "smt-XX (repository)")
    # -- MSMO: aspect level and schedule
    cons: bool = arg(True, "msmo: the aspect-level consistency objective (--no-cons: ablation)")
    beta: float | None = arg(None, "weight of the consistency term (default: per backbone and language, --beta-table)")
    beta_table: str = arg("auto", "which per-language beta table: mbert, xlmr, auto (xlmr for xlm-roberta "
                                  "models, else mbert)", choices=["auto", "mbert", "xlmr"])
    cons_batch: int = arg(16, "aligned sentence pairs per consistency batch")
    cons_pairs: str = arg("both", "pairs for the consistency term: source (gold-en <-> cs_XX-en), target "
                                  "(smt-XX <-> cs_en-XX) or both", choices=["both", "source", "target"])
    schedule: str = arg("two-step", "two-step: adversarial alignment, then consistency (summary); joint: all "
                                    "terms every step (repository)", choices=["two-step", "joint"])
    two_step_split: float = arg(0.5, "two-step: fraction of --steps spent in the adversarial step", gt=0, lt=1)
    # -- MSMO-Distill
    distill: bool = arg(False, "after training, distil into a student in the same run (teachers: this run's "
                               "selected model + --teachers)")
    teachers: list[str] = arg([], "run directories of trained teachers (their model_best.pt)")
    student_init: str = arg("", "--method distill: run directory whose selected model starts the student "
                                "(default: the first teacher)")
    distill_steps: int = arg(1000, "student optimizer steps")
    distill_lr: float | None = arg(None, "student learning rate (default --lr)", gt=0)


PRESETS = {
    "mbert": {"_doc": "the paper's mBERT setting (= the defaults): lr 5e-5, batch 16, 2000 steps, best English "
                      "dev in steps 1500-2000"},
    "xlmr-base": {"_doc": "XLM-R base: lr 2e-5, 2500 steps, selection window 2000-2500, 32 consistency pairs",
                  "model": "xlm-roberta-base", "lr": 2e-5, "steps": 2500, "select_from": 2000, "cons_batch": 32},
    "xlmr-large": {"_doc": "XLM-R large, as xlmr-base", "model": "xlm-roberta-large", "lr": 2e-5, "steps": 2500,
                   "select_from": 2000, "cons_batch": 32},
    "cpu": {"_doc": "CPU-scale protocol: multilingual-e5-small (frozen word embeddings), real XABSA data, 240 "
                    "steps (evaluation every 40, selection from step 160), head lr 2e-3, 8 consistency pairs, "
                    "150 distillation steps",
            "model": "e5-small", "freeze_embeddings": True, "lr": 5e-5, "head_lr": 2e-3, "steps": 240,
            "eval_every": 40, "select_from": 160, "cons_batch": 8, "beta_table": "xlmr", "distill_steps": 150,
            "critic_warm_every": 60},
    "smoke": {"_doc": "seconds: tiny random BERT on the first 64 sentences of each real file; no diagnostics",
              "model": "tiny", "limit_train": 64, "limit_eval": 32, "batch_size": 8, "cons_batch": 4, "steps": 8,
              "eval_every": 4, "select_from": 0, "distill_steps": 4, "lr": 1e-3, "critic_warm_steps": 2,
              "max_len": 64, "diag_every": 0},
}

#: beta per backbone and target language, "said to be in the paper" (METHODS.md; not verifiable here).
BETA_TABLE = {"mbert": {"fr": 4.5e-4, "es": 2.5e-4, "nl": 2.5e-4, "ru": 3.5e-4},
              "xlmr": {"fr": 2.5e-3, "es": 1.5e-3, "nl": 1.5e-3, "ru": 3.5e-3}}


def validate(args: Args) -> None:
    """Check the values argparse cannot; each failure is one line naming the flag. check_args (types and
    bounds of every field) also covers a --resume run's args.json and Args built in code."""
    utils.check_args(args)
    for lang in args.eval_langs:
        if lang not in XABSA_LANGS:
            raise UsageError(f"--eval-langs {lang}: allowed are {', '.join(XABSA_LANGS)}")
    if args.method == "distill":
        if not args.teachers:
            raise UsageError("--teachers: --method distill needs at least one teacher run directory")
        if args.distill:
            raise UsageError("--distill: not with --method distill (which is distillation already)")
    elif args.teachers and not args.distill:
        raise UsageError("--teachers: only with --method distill or --distill")
    if args.student_init and args.method != "distill":
        raise UsageError("--student-init: only with --method distill (--distill starts from this run's model)")


def resolve_beta(args: Args) -> float:
    """--beta, or the per-language value of the backbone's table."""
    if args.beta is not None:
        return args.beta
    auto = "xlmr" if "xlm-roberta" in args.model.lower() else "mbert"
    return BETA_TABLE[auto if args.beta_table == "auto" else args.beta_table][args.lang]


# ==== Data: the ACS mixture, its critic sides, the aligned pairs: common.text_data (load_acs_data, encode_acs_data)


# ==== Model: encoder + linear tagger; the language critic ============================================
class Tagger(nn.Module):
    """Encoder -> dropout -> Linear(hidden, tags) on every token [repo: BertABSATagger]. Returns the
    last hidden states (the critic's input) and the tag logits."""

    def __init__(self, encoder: nn.Module, num_tags: int):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(encoder.config.hidden_dropout_prob)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_tags)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h, self.classifier(self.dropout(h))


class Critic(nn.Module):
    """Q: dropout then Linear(hidden, 1) on every token -> [B, T] scores [repo: mBERTABSALanguageDetector].
    With --adversary grl the same head gives language logits."""

    def __init__(self, hidden: int, dropout: float, clip: float | None):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, 1)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)
        if clip is not None:
            clip_weights_(self, clip)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(h)).squeeze(-1)


def clip_weights_(module: nn.Module, c: float) -> None:
    """WGAN weight clipping: every parameter into [-c, c] [repo]."""
    with torch.no_grad():
        for p in module.parameters():
            p.clamp_(-c, c)


# ==== The method's losses (plain functions: tensors in, tensor out) ==================================
def tagging_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over the labelled positions (first sub-tokens) [xabsa/repo]."""
    if not (labels != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, T] over the positions where mask is 1 (non-padding tokens)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


def wasserstein_gap(q_src: torch.Tensor, mask_src: torch.Tensor, q_tgt: torch.Tensor,
                    mask_tgt: torch.Tensor) -> torch.Tensor:
    """The critic's estimate W = mean Q(source tokens) - mean Q(target tokens), each mean over the
    non-padding tokens of its batch [repo; the repository's mean also counts padding]. The critic
    maximizes it; the encoder minimizes lambda * W."""
    return masked_token_mean(q_src, mask_src) - masked_token_mean(q_tgt, mask_tgt)


def language_bce(logit_src: torch.Tensor, mask_src: torch.Tensor, logit_tgt: torch.Tensor,
                 mask_tgt: torch.Tensor) -> torch.Tensor:
    """--adversary grl: per-token BCE of a language classifier (source 1, target 0), each side
    averaged over its non-padding tokens, then the two averaged [ours]."""
    l_src = F.binary_cross_entropy_with_logits(logit_src, torch.ones_like(logit_src), reduction="none")
    l_tgt = F.binary_cross_entropy_with_logits(logit_tgt, torch.zeros_like(logit_tgt), reduction="none")
    return 0.5 * (masked_token_mean(l_src, mask_src) + masked_token_mean(l_tgt, mask_tgt))


def span_distribution(tok_probs: torch.Tensor, tag_index: dict[str, int], scheme: str,
                      floor: float = 1e-20) -> torch.Tensor:
    """5-way distribution [POS, NEG, NEU, O, rest] of one aspect from the tag softmax of its own L
    words' tokens (tok_probs [L, C]) [repo: tok_score_2_span_prob, minus its indexing defect].

    bieos: one word -> P(S-x); longer -> P(B-x at the first) * prod P(I-x in the middle) * P(E-x at
    the last). bio: P(B-x at the first) * prod P(I-x after it). O: prod of P(O) over the words.
    Each of the four floored at `floor`, rest = 1 - their sum, floored as well.
    """
    n = tok_probs.shape[0]
    parts = []
    for pol in POLARITIES:
        if scheme == "bieos" and n == 1:
            p = tok_probs[0, tag_index[f"S-{pol}"]]
        elif scheme == "bieos":
            p = (tok_probs[0, tag_index[f"B-{pol}"]] * tok_probs[1:-1, tag_index[f"I-{pol}"]].prod()
                 * tok_probs[-1, tag_index[f"E-{pol}"]])
        else:
            p = tok_probs[0, tag_index[f"B-{pol}"]] * tok_probs[1:, tag_index[f"I-{pol}"]].prod()
        parts.append(p)
    parts.append(tok_probs[:, tag_index["O"]].prod())
    four = torch.stack(parts).clamp_min(floor)
    rest = (1.0 - four.sum()).clamp_min(floor)
    return torch.cat([four, rest[None]])


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(KL(p||q) + KL(q||p)) / 2 per row of p, q [N, K], mean over rows [repo]."""
    kl_pq = (p * (p.log() - q.log())).sum(-1)
    kl_qp = (q * (q.log() - p.log())).sum(-1)
    return ((kl_pq + kl_qp) / 2).mean()


def aspect_consistency(logits: torch.Tensor, aspects: list[tuple[int, list[int], int, list[int]]],
                       tag_index: dict[str, int], scheme: str) -> torch.Tensor:
    """Mean symmetric KL between the span distributions of the aligned aspects of a batch; each
    aspect read at its own token positions."""
    probs = logits.float().softmax(-1)
    p = torch.stack([span_distribution(probs[ra, pa], tag_index, scheme) for ra, pa, _, _ in aspects])
    q = torch.stack([span_distribution(probs[rb, pb], tag_index, scheme) for _, _, rb, pb in aspects])
    return symmetric_kl(p, q)


def average_teacher_probs(per_teacher: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Distillation targets: per sentence, the equal-weight mean of the teachers' softmax
    (per_teacher[t][i]: teacher t's [T_i, C] probabilities of sentence i) [repo, any number]."""
    return [torch.stack(ps).mean(0) for ps in zip(*per_teacher)]


def distill_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between the student's softmax and the teachers' averaged softmax, mean over the
    non-padding tokens and the tags [xabsa/repo: MSELoss on the active tokens]."""
    diff = (student_logits.float().softmax(-1) - teacher_probs) ** 2
    return diff[mask.bool()].mean()


# ==== Per-step computations (the speed benchmark times these on the same batch) ======================
def ce_step(model: Tagger, batch: dict, args: Args, amp_dtype: torch.dtype | None = None):
    """Baselines (zero-shot, ACS, supervised): one encoder forward, tagging CE. Returns (loss, terms);
    the caller backpropagates and steps the optimizer."""
    with utils.autocast(batch["input_ids"].device, amp_dtype):
        _, logits = model(batch["input_ids"], batch["attention_mask"])
    loss = tagging_ce(logits, batch["labels"])
    return loss, {"l_ce": loss.detach()}


def msmo_step(model: Tagger, critic: Critic, critic_opt: torch.optim.Optimizer, batch: dict, args: Args,
              phase: str, n_critic: int, amp_dtype: torch.dtype | None = None,
              fresh: list[tuple[dict, dict]] | None = None, rng_seed: int | None = None, parts: dict | None = None):
    """One MSMO encoder step; phase "adv" (CE + sentence level), "cons" (CE + aspect level) or "joint".
    The encoder runs once on the CE batch and once on the pair batch. wgan: n_critic critic updates on
    the DETACHED features of that forward [ours], or on `fresh` source/target batches encoded without
    gradient [repo], weights clipped after each; then CE + lambda * W (critic frozen) + beta * KL.
    Returns (loss, terms): the caller backpropagates, clips and steps the optimizer (with --adversary
    grl also critic_opt: the language classifier learns from the same backward). `parts` receives the
    weighted terms (graph kept: diagnostics). With `rng_seed`, all but the CE forward draw from their own
    generator (common.utils.private_rng): MSMO with lambda = beta = 0 is the ACS run of its seed [ours]."""
    device = batch["input_ids"].device
    with utils.autocast(device, amp_dtype):
        feats, logits = model(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"]
    loss = tagging_ce(logits, batch["labels"])
    terms, parts = {"l_ce": loss.detach()}, {} if parts is None else parts
    parts["ce"] = loss
    src, tgt = batch["side"] == 0, batch["side"] == 1
    with contextlib.nullcontext() if rng_seed is None else utils.private_rng(rng_seed, device):  # the added terms
        if args.adv and phase in ("adv", "joint") and src.any() and tgt.any():
            h_s, m_s, h_t, m_t = feats[src], mask[src], feats[tgt], mask[tgt]
            if args.adversary == "wgan":
                critic.requires_grad_(True)
                for k in range(n_critic):
                    if fresh:  # the repository's way: new batches, the encoder run again (no gradient)
                        with torch.no_grad(), utils.autocast(device, amp_dtype):
                            cs, ct = fresh[k]
                            hs, ms = model(cs["input_ids"], cs["attention_mask"])[0], cs["attention_mask"]
                            ht, mt = model(ct["input_ids"], ct["attention_mask"])[0], ct["attention_mask"]
                    else:
                        hs, ms, ht, mt = h_s.detach(), m_s, h_t.detach(), m_t
                    with utils.autocast(device, amp_dtype):
                        q_s, q_t = critic(hs), critic(ht)
                    critic_loss = -wasserstein_gap(q_s.float(), ms, q_t.float(), mt)  # the critic maximizes W
                    critic_opt.zero_grad(set_to_none=True)
                    critic_loss.backward()
                    critic_opt.step()
                    clip_weights_(critic, args.critic_clip)
                critic.requires_grad_(False)  # the encoder's term must not move the critic
                with utils.autocast(device, amp_dtype):
                    q_s, q_t = critic(h_s), critic(h_t)
                gap = wasserstein_gap(q_s.float(), m_s, q_t.float(), m_t)
                parts["adv"] = args.lambda_adv * gap
                loss = loss + parts["adv"]
                terms["w_gap"] = gap.detach()
                terms["critic_w"] = -critic_loss.detach()
            else:
                with utils.autocast(device, amp_dtype):
                    l_s = critic(GradReverse.apply(h_s, args.lambda_adv))
                    l_t = critic(GradReverse.apply(h_t, args.lambda_adv))
                l_lang = language_bce(l_s.float(), m_s, l_t.float(), m_t)
                loss = loss + l_lang  # classifier: minimizes it; encoder (reversed): maximizes lambda * it
                parts["adv"] = l_lang
                terms["l_lang"] = l_lang.detach()
        pb = batch["pairs"]
        if args.cons and phase in ("cons", "joint") and pb is not None:
            with utils.autocast(device, amp_dtype):
                _, pair_logits = model(pb["input_ids"], pb["attention_mask"])
            index = {t: i for i, t in enumerate(tag_list(args.tagging))}
            l_cons = aspect_consistency(pair_logits, pb["aspects"], index, args.tagging)
            parts["cons"] = resolve_beta(args) * l_cons
            loss = loss + parts["cons"]
            terms["l_cons"] = l_cons.detach()
    return loss, terms


def distill_step(model: Tagger, batch: dict, teacher_probs: torch.Tensor, args: Args,
                 amp_dtype: torch.dtype | None = None):
    """MSMO-Distill: one student forward on unlabeled target text, MSE to the teachers' average."""
    with utils.autocast(batch["input_ids"].device, amp_dtype):
        _, logits = model(batch["input_ids"], batch["attention_mask"])
    loss = distill_mse(logits, teacher_probs, batch["attention_mask"])
    return loss, {"l_kd": loss.detach()}


def phase_at(step: int, args: Args) -> str:
    """ce for the baselines; msmo: adv then cons (two-step) or joint."""
    if args.method != "msmo":
        return "ce"
    if args.schedule == "joint":
        return "joint"
    return "adv" if step < round(args.two_step_split * args.steps) else "cons"


def critic_rng_seed(args: Args, step: int) -> int:
    """The seed of the added terms' generator at a step (-1: the critic's initialisation)."""
    return (args.seed + 1) * 1_000_003 + step


def critic_steps_at(step: int, args: Args) -> int:
    """5 critic updates per encoder step; 10 in the first 25 steps and every 500th [repo]."""
    warm = step < args.critic_warm_steps or step % args.critic_warm_every == 0
    return args.critic_steps_warm if warm else args.critic_steps


# ==== Evaluation =====================================================================================
def evaluate_f1(model: Tagger, encoded: list[EncodedSentence], gold_tags: list[list[str]], scheme: str, pad_id: int,
                device: torch.device, amp_dtype: torch.dtype | None, metric: str = "xabsa") -> float:
    """Span F1 (in %) of the argmax word tags (common.text_data.word_tags_f1): XABSA's official metric on the words
    that fit --max-len [xabsa], or seqeval's strict IOBES with the words cut off predicted O [ours]."""
    pred = tagger_word_tags(model, encoded, tag_list(scheme), pad_id, device, amp_dtype)
    return word_tags_f1(gold_tags, pred, scheme, metric)


def test_scores(model: Tagger, data: AcsData, args: Args, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """f1_<lang> per test set, and f1_avg when there are several."""
    res = {f"f1_{lang}": evaluate_f1(model, enc, data.test_tags[lang], args.tagging, data.pad_id, device, amp_dtype,
                                     args.metric) for lang, enc in data.tests.items()}
    if len(res) > 1:
        res["f1_avg"] = float(np.mean(list(res.values())))
    return res


# ==== Distillation: the teachers =====================================================================
def teacher_targets(args: Args, files: list[Path], data: AcsData, device: torch.device,
                    amp_dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The distillation targets: per unlabeled sentence, the equal-weight mean of the teachers'
    softmax (eval mode, no temperature; [T_i, C] on the CPU), computed once [xabsa/repo]."""
    return average_teacher_probs(saved_taggers_softmax(
        lambda: Tagger(xabsa_encoder(args.model, args.data_dir, args.domain)[0], len(tag_list(args.tagging))),
        files, data.unlabeled, data.pad_id, device, amp_dtype))


# ==== One stage: teacher training (or a baseline), or distillation ===================================
@dataclass
class Stage:
    """A stage's optimizers and data streams (make_stage)."""

    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]  # the tagger's trainable parameters (gradient-norm clip)
    critic: Critic | None
    critic_opt: torch.optim.Optimizer | None
    pool: list[EncodedSentence]
    sides: list[int]
    samplers: BatchStreams


def make_stage(args: Args, stage: str, model: Tagger, data: AcsData, device: torch.device, use_scaler: bool) -> Stage:
    """Adam (no weight decay), no warm-up, linear decay to 0 over the stage's steps [repo]; the
    tagger head at --head-lr [ours, CPU preset]; the critic with its own Adam at --critic-lr [repo];
    length-grouped samplers seeded per stage."""
    lr = args.distill_lr or args.lr if stage == "distill" else args.lr
    head = list(model.classifier.parameters())
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    head_lr = args.head_lr or lr if stage == "train" else lr
    opt = torch.optim.Adam([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, 0, args.steps if stage == "train" else args.distill_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    critic = critic_opt = None
    if stage == "train" and args.method == "msmo" and args.adv:
        with utils.private_rng(critic_rng_seed(args, -1), device):  # not from the run's random stream [ours]
            critic = Critic(model.encoder.config.hidden_size, model.encoder.config.hidden_dropout_prob,
                            args.critic_clip if args.adversary == "wgan" else None).to(device)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr or args.lr)
        critic.requires_grad_(args.adversary == "grl")
    seed = args.seed * 1000 + (0 if stage == "train" else 500)
    pool, sides = (data.ce_pool, data.ce_sides) if stage == "train" else (data.unlabeled, [-1] * len(data.unlabeled))
    samplers = BatchStreams(ce=LengthGroupedBatches([len(e.input_ids) for e in pool], args.batch_size, seed + 1))
    if stage == "train" and data.pairs:
        samplers["pairs"] = LengthGroupedBatches([len(p.a.input_ids) + len(p.b.input_ids) for p in data.pairs],
                                                 args.cons_batch, seed + 2)
    src_pool, tgt_pool = data.critic_pools
    if critic is not None and args.critic_data == "fresh" and src_pool and tgt_pool:
        samplers["critic_src"] = LengthGroupedBatches([len(e.input_ids) for e in src_pool], args.batch_size, seed + 3)
        samplers["critic_tgt"] = LengthGroupedBatches([len(e.input_ids) for e in tgt_pool], args.batch_size, seed + 4)
    return Stage(opt, sched, scaler, body + head, critic, critic_opt, pool, sides, samplers)


def step_loss(st: Stage, model: Tagger, data: AcsData, args: Args, stage: str, phase: str, step: int,
              device: torch.device, amp: torch.dtype | None, targets: list[torch.Tensor] | None, parts: dict | None):
    """One step's batches (common.text_data.acs_step_batches) and loss: (loss, terms, the CE batch)."""
    n_critic = critic_steps_at(step, args)
    idx, batch, fresh = acs_step_batches(st.samplers, data, st.pool, st.sides, device, args.cons and phase in (
        "cons", "joint"), n_critic if phase in ("adv", "joint") else 0)
    if stage == "distill":
        teacher = torch.zeros(*batch["input_ids"].shape, len(tag_list(args.tagging)), device=device)
        for k, i in enumerate(idx):
            teacher[k, : targets[i].shape[0]] = targets[i].to(device)
        loss, terms = distill_step(model, batch, teacher, args, amp)
    elif phase == "ce":
        loss, terms = ce_step(model, batch, args, amp)
    else:
        return (*msmo_step(model, st.critic, st.critic_opt, batch, args, phase, n_critic, amp, fresh,
                           critic_rng_seed(args, step), parts), batch)
    if parts is not None:  # the diagnostics: the loss is one term
        parts["kd" if stage == "distill" else "ce"] = loss
    return loss, terms, batch


def run_stage(run: Run, stage: str, model: Tagger, data: AcsData, device: torch.device, amp: torch.dtype | None,
              use_scaler: bool, offset: int, completed: dict, targets: list[torch.Tensor] | None = None) -> dict:
    """The training loop of one stage ("train": teacher training / baselines; "distill": the
    student). Evaluates every --eval-every steps and at the end, keeps the selected model (best dev F1
    from --select-from on [repo]), checkpoints at each evaluation. Returns the stage's result."""
    args = run.args
    st = make_stage(args, stage, model, data, device, use_scaler)
    state = run.restore(model=TrainableState(model, f"--resume {run.dir}"), optimizer=st.opt, scheduler=st.sched,
                        scaler=st.scaler, samplers=st.samplers,
                        **({"critic": st.critic, "critic_opt": st.critic_opt} if st.critic is not None else {}))
    step, history, best = state.get("step", 0), state.get("history", []), state.get("best")
    train_time, sentences, diag = state.get("train_time", 0.0), state.get("sentences", 0), state.get("diag", [])
    wall0 = run.wall() - state.get("stage_wall_s", 0.0)
    total = args.steps if stage == "train" else args.distill_steps
    end = min(total, args.max_steps) if args.max_steps else total
    window = min(args.select_from, end) if stage == "train" else 0
    best_file = run.dir / ("teacher_best.pt" if stage == "train" and args.distill else "model_best.pt")
    if best is not None and best["step"] < window:  # resumed with a larger --max-steps: the old best is outside
        best = None
        best_file.unlink(missing_ok=True)
    grl = st.critic is not None and args.adversary == "grl"  # the classifier learns from the encoder's backward
    model.train()

    def save() -> None:
        run.save(stage=stage, step=step, history=history, best=best, train_time=train_time, sentences=sentences,
                 completed=completed, stage_wall_s=run.wall() - wall0, diag=diag)

    bar = tqdm(total=end, initial=step, desc=stage, leave=False, dynamic_ncols=True, disable=None)
    while step < end:
        if run.stopped:  # Ctrl-C / SIGTERM: checkpoint this step (the samplers' state says which batch comes next)
            save()
            run.interrupt(f"at {stage} step {step}")
        t0 = time.time()
        phase = phase_at(step, args) if stage == "train" else "distill"
        parts = {} if args.diag_every and step % args.diag_every == 0 else None  # the diagnostics' step
        loss, terms, batch = step_loss(st, model, data, args, stage, phase, step, device, amp, targets, parts)
        if run.finite(loss, step, terms):  # else (--skip-nonfinite): no backward pass, no encoder update (the
            if parts:  # critic's own updates of this step, on detached features, happened)
                encoder = [p for p in model.encoder.parameters() if p.requires_grad]
                diag.append({"stage_step": step, "phase": phase, **grad_norm_ratios(parts, encoder, "ce"),
                             **{k: v.item() for k, v in terms.items() if k != "l_ce"}})
                run.log(offset + step, "diag", stage=stage, **diag[-1])
            st.opt.zero_grad(set_to_none=True)
            if grl:
                st.critic_opt.zero_grad(set_to_none=True)
            st.scaler.scale(loss).backward()
            st.scaler.unscale_(st.opt)
            torch.nn.utils.clip_grad_norm_(st.params, args.max_grad_norm)
            st.scaler.step(st.opt)
            if grl:
                st.scaler.step(st.critic_opt)
            st.scaler.update()
            run.add(terms)
        st.sched.step()
        step += 1
        sentences += batch["input_ids"].shape[0] + (batch["pairs"]["input_ids"].shape[0] if batch["pairs"] else 0)
        train_time += time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", phase=phase)
        if step % args.eval_every and step != end:
            continue
        # ---- evaluation: dev always; the test sets where a result needs them (or --test-every-eval)
        dev = evaluate_f1(model, data.dev, data.dev_tags, args.tagging, data.pad_id, device, amp, args.metric)
        new_best = step >= window and (best is None or dev > best["dev_f1"])
        res = {"dev_f1": dev, **(test_scores(model, data, args, device, amp)
                                 if new_best or step == end or args.test_every_eval else {})}
        history.append({**res, "step": step, "stage": stage, "phase": phase})
        if new_best:
            best = history[-1]
            utils.atomic_torch_save({"model": trainable_state(model), "step": step, "stage": stage, "dev_f1": dev},
                                    best_file)
        train_log = run.means()
        run.log(offset + step, "eval", stage=stage, stage_step=step, phase=phase, lr=st.opt.param_groups[0]["lr"],
                **res, **train_log)
        tqdm.write(f"{stage} step {step:5d}  " + "  ".join(f"{k} {v:.2f}" for k, v in res.items())
                   + "  " + "  ".join(f"{k} {v:.4f}" for k, v in train_log.items()))
        save()
    bar.close()
    if run.stopped:  # Ctrl-C during the stage's last step: its checkpoint was written at its last evaluation
        run.interrupt(f"at the end of {stage} (step {step})")
    final = history[-1] if history else {}
    return {"final": final, "best": best or final, "steps": step, "history": history,
            "wall_s": round(run.wall() - wall0, 2), "train_time_s": round(train_time, 2), "sentences": sentences,
            "diagnostics": means_by_group(diag, "phase", skip=("stage_step",))}


# ==== main ===========================================================================================
def method_label(args: Args) -> str:
    """The run's method name: a baseline, or msmo with its ablations and readings."""
    if args.method != "msmo":
        return args.method
    parts = [(not args.adv, "_wo_adv"), (args.adv and args.adversary == "grl", "_grl"), (not args.cons, "_wo_cons"),
             (args.adv and not args.critic_codeswitch, "_wo_cs_critic"), (args.schedule == "joint", "_joint"),
             (args.distill, "_distill")]
    return "msmo" + "".join(suffix for on, suffix in parts if on)


CHECKPOINT_KEYS = ("stage", "step", "model", "optimizer", "scheduler", "scaler", "samplers", "rng", "history", "best",
                   "train_time", "sentences", "wall_s")


def main(args: Args) -> dict:
    run = Run("msmo.py", Args, args, validate, keys=CHECKPOINT_KEYS)  # on --resume only --max-steps may change
    args = run.args
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)
    torch.set_float32_matmul_precision("high")

    # ---- data, model and teachers (before the run directory exists: a failure writes nothing)
    record: dict = {}
    sentences = load_acs_data(args, record)
    why = "teachers and student must share tokenizer and tags"
    for d in args.teachers:
        trained_run(d, "--teachers", args, ("model", "tagging"), why=why)
    if args.student_init:
        trained_run(args.student_init, "--student-init", args, ("model", "tagging"), why=why)
    encoder, tokenizer = xabsa_encoder(args.model, args.data_dir, args.domain)
    model = Tagger(encoder, len(tag_list(args.tagging)))
    if args.freeze_embeddings:
        freeze_word_embeddings(model)
    model.to(device)
    data = encode_acs_data(args, sentences, tokenizer)
    check_acs_sizes(args, data)
    stages = ["distill"] if args.method == "distill" else ["train", "distill"] if args.distill else ["train"]
    ckpt = run.state  # the checkpoint being resumed, None for a new run
    if ckpt is not None and ckpt["stage"] not in stages:
        raise MissingError(f"--resume {args.resume}: checkpoint.pt does not fit this run (stage {ckpt['stage']})")

    # ---- the run directory (data_subsets.json: the sentences used of each file)
    run.open(utils.run_name(method_label(args), f"xabsa_{args.domain}", f"en-{args.lang}", args.seed, args.exp_name),
             files={"data_subsets.json": record},
             resumed_at=f"(stage {ckpt['stage']} at step {ckpt['step']})" if ckpt else "")
    beta = resolve_beta(args) if args.method == "msmo" and args.cons else None
    what = (f"{len(data.ce_pool)} training sentences" if args.method != "distill"
            else f"{len(data.unlabeled)} unlabeled gold-{args.lang}-train sentences")
    what += f", {len(data.pairs)} aligned pairs with aspects {data.pair_stats}" if data.pairs else ""
    what += f", beta {beta:g}" if beta is not None else ""
    print(f"run: {run.dir}  |  {method_label(args)} en->{args.lang}  |  {args.model} ({args.tagging})  |  {what}  |  "
          f"device {device}, precision {amp_dtype or 'fp32'}")

    completed = ckpt.get("completed", {}) if ckpt else {}  # the results of the stages already done
    t_start = time.time()
    with run:
        for stage in stages[stages.index(ckpt["stage"]) if ckpt else 0:]:
            targets, extra = None, {}
            if stage == "distill":  # teachers: this run's selected model (--distill) and --teachers
                teacher_files = ([run.dir / "teacher_best.pt"] if args.method != "distill" else []) + [
                    Path(d) / "model_best.pt" for d in args.teachers]
                student_file = Path(args.student_init) / "model_best.pt" if args.student_init else teacher_files[0]
                targets = teacher_targets(args, teacher_files, data, device, amp_dtype)
                if run.state is None:  # the student starts from a trained model (a resumed one from its checkpoint)
                    load_trainable_state(model, torch.load(student_file, map_location="cpu", weights_only=False)[
                        "model"], f"student start {student_file}")
                extra = {"teachers": [str(f) for f in teacher_files], "student_init": str(student_file)}
            result = run_stage(run, stage, model, data, device, amp_dtype, use_scaler,
                               sum(r["steps"] for r in completed.values()), completed, targets)
            result.pop("history")
            completed[stage] = {**result, **extra}
            run.end_stage()  # the next stage starts from scratch

    # ---- summary: final and best of the last stage; each stage's own under "stages"
    eval_langs = args.eval_langs or [args.lang]
    keys = ["dev_f1"] + [f"f1_{lang}" for lang in eval_langs] + (["f1_avg"] if len(eval_langs) > 1 else [])
    summary = run.finish({
        "script": "msmo.py", "method": method_label(args), "dataset": f"xabsa_{args.domain}",
        "setting": f"en-{args.lang}", "seed": args.seed, "model": args.model, "tagging": args.tagging,
        "primary_metric": "f1_avg" if len(eval_langs) > 1 else f"f1_{eval_langs[0]}",
        **stages_summary(completed, keys), "pairs": data.pair_stats, "beta": beta, "metric": args.metric,
        "selection": {"dev": data.dev_lang, "from_step": args.select_from if stages[-1] == "train" else 0},
        "process_wall_s": round(time.time() - t_start, 2),
    })
    print(f"done: final {summary['final']}  best {summary['best']}  ->  {run.dir}/summary.json")
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
