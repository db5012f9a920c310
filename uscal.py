"""USCAL: Unsupervised Contrastive Adversarial Learning of sentence embeddings.

Docs: docs/scal.md
Paper: "Simple Contrastive Representation Adversarial Learning for NLP Tasks", Sec. 3.4 and
4.5 (../shared/papers/scal_uscal.txt). USCAL is unsupervised SimCSE plus an adversarial
positive. One file, top to bottom: arguments, data, model, the losses (plain functions named
after their equations), the training steps of USCAL and SimCSE, STS evaluation, the loop.

Training batches are length-grouped (common.text_data.length_grouped_order: sorted by length within
seeded mega-batches of 50 batches, the batches shuffled), so padding wastes little compute;
evaluation runs in length order and restores the original order.

    python uscal.py                                    # BERT-base on wiki1m (Table 6), USCAL
    python uscal.py --alpha 0                          # the same run without the adversarial term = SimCSE
    python uscal.py --preset roberta-base              # RoBERTa-base (lr 1e-5, SimCSE's)
    python uscal.py --preset cpu --seed 0              # CPU-scale protocol (MiniLM-L6 [CLS], offline sentences)
    python uscal.py --preset cpu --eval-only           # the untrained starting point of the CPU protocol
    python uscal.py --preset smoke                     # a tiny random model for a few steps

Per step, for a batch of sentences x (Sec. 3.4):

  SimCSE (Eq. 4)      two passes with different dropout masks -> z1, z2 (MLP on [CLS]);
                      L_ct(z1, z2) = InfoNCE, positive z2_i, negatives z2_k, cosine, tau = 0.05
  perturbation (Eq. 9) delta = eps * g / ||g||_2 per sentence, g = dL_ct(z1, z2)/dx_emb1,
                      detached (FGM; `--attack fgsm`: eps * sign(g))
  adversarial view    z_adv from x_emb1 + delta (a third pass)
  total (Eq. 10)      L_ct(z1, z2) + alpha * L_ct(z1, z_adv), whose negatives are the other
                      adversarial vectors of the batch (as in Eq. 4)

`--alpha 0` skips the adversarial pass entirely: the step is then exactly unsupervised SimCSE
(the baseline). The step functions `simcse_step` and `uscal_step` take (model, batch, args)
and return (loss, terms), so a benchmark can time them on one batch.

Protocol (Sec. 4.1; what it leaves out is SimCSE's): wiki1m, batch 64, max length 32, one
epoch, lr 3e-5 (BERT) / 1e-5 (RoBERTa, SimCSE's), tau 0.05, STS-B dev Spearman every 250 steps,
the best checkpoint is kept and tested on STS12-16, STS-B and SICK-R with SimCSE's "all"
aggregation (Spearman over the concatenation of a year's subsets), in percent, plus the
average of the seven. The best encoder is saved with `save_pretrained` (without the MLP) in
<run>/model, loadable with transformers' AutoModel.

Readings and choices (README "paper vs. code" has them too):
- x_emb1 (Eq. 9) is, in the paper, pass 1's embedding-layer output (after its dropout). Here
  it is pass 1's `inputs_embeds` (the token embeddings before position/type embeddings,
  LayerNorm and dropout), which is what can be perturbed through the transformers API; the
  adversarial pass then draws its own dropout mask. The gradient flows into the embedding
  matrix from all three passes.
- ||g||_2 is the norm of one sentence's whole [length, hidden] gradient (per example, as the
  subscript i of Eq. 9 says). The two dropout passes are run as two forwards, so the gradient
  for delta only traverses pass 1 (cheaper than one concatenated forward; same semantics).
- alpha and epsilon are not given for USCAL: defaults alpha 1.0 (Eq. 10 has no "less than
  one" clause, unlike Eq. 8) and eps 0.3 (the middle of the paper's SCAL grid).
- Pooling: MLP (Linear + tanh, new) on [CLS] in training, [CLS] without the MLP at evaluation
  (Fig. 2: "h_i^emb1 is used as the sentence representation"; SimCSE's cls_before_pooler).
- Optimiser: AdamW with weight decay 0.01 and a linear warm-up (10%, ours) then linear decay
  (the paper's Sec. 4.1 states these for both methods; SimCSE itself used no decay and no
  warm-up). Gradient-norm clipping 1.0 (Hugging Face Trainer's default, which SimCSE used).
- Evaluation sentences are truncated at `--eval-max-length` 128 tokens (SimCSE: none; STS
  sentences are shorter than that).
- CPU-scale protocol (`--preset cpu`): MiniLM-L6 with [CLS] pooling (it was trained for mean
  pooling, so [CLS] leaves training something to learn), trained on unlabelled English
  sentences that are offline: SentEval MR, CR, SUBJ, MPQA and the STS-B train sentences
  (scores dropped), exact duplicates removed, a fixed random subset (see the preset).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from common import text_data
from common import utils
from common.text_models import load_encoder, tiny_encoder
from common.utils import UsageError, arg

TEST_SETS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")


# =========================================================================================
# Arguments (defaults: the paper's BERT-base setting, Sec. 4.1 and SimCSE)
# =========================================================================================
@dataclass
class Args:
    """USCAL (and SimCSE, --alpha 0) for unsupervised sentence embeddings."""

    # -- run
    exp_name: str = arg("", "run directory name (default: method__data__setting__seed__time)")
    seed: int = arg(0, "random seed (initialisation of the MLP, data order, dropout)")
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
    limit_train: int | None = arg(None, "train on a fixed random subset of this many sentences (see --subset-seed)")
    subset_seed: int = arg(0, "seed of the --limit-train subset (fixed across --seed, so seeds share the data)")
    limit_eval: int | None = arg(None, "evaluate on the first N pairs of each STS set / subset (default: all)")
    preset: str | None = arg(None, "named group of settings, applied before the other flags")
    eval_only: bool = arg(False, "no training: evaluate the starting encoder on STS-B dev and the test sets")
    # -- data and model
    train_data: str = arg("wiki1m", "training sentences: wiki1m (SimCSE's) or senteval (MR, CR, SUBJ, MPQA and STS-B "
                          "train sentences, offline)", choices=["wiki1m", "senteval"])
    model: str = arg("bert-base-uncased", "encoder: HF hub name, local directory, minilm-l6 / e5-small (offline "
                     "wheels) or tiny (random 2-layer BERT, for smoke runs only)")
    max_length: int = arg(32, "maximum tokens per training sentence", ge=4)
    eval_max_length: int = arg(128, "maximum tokens per evaluation sentence", ge=4)
    eval_pooling: str = arg("cls_before_pooler", "sentence vector at evaluation: cls_before_pooler ([CLS], no MLP; "
                            "paper), cls ([CLS] through the MLP), avg (mean over tokens)",
                            choices=["cls_before_pooler", "cls", "avg"])
    # -- method
    alpha: float = arg(1.0, "weight of the adversarial term in Eq. 10 (not given in the paper); 0 = SimCSE")
    attack: str = arg("fgm", "perturbation: fgm (Eq. 9, eps * g/||g||_2 per sentence) or fgsm (eps * sign g)",
                      choices=["fgm", "fgsm"])
    epsilon: float = arg(0.3, "perturbation size (not given for USCAL; middle of the paper's SCAL grid)")
    tau: float = arg(0.05, "temperature of the InfoNCE (Eq. 4)", gt=0)
    # -- optimisation
    epochs: int = arg(1, "training epochs (SimCSE: one pass over wiki1m)")
    batch_size: int = arg(64, "batch size (sentences; each gives 2 or 3 passes)")
    lr: float = arg(3e-5, "peak learning rate (AdamW; SimCSE used 1e-5 for RoBERTa-base)", gt=0)
    weight_decay: float = arg(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = arg(0.1, "fraction of the planned steps with linear warm-up, then linear decay to 0", lt=1)
    max_grad_norm: float = arg(1.0, "clip the gradient norm (0: no clipping)")
    eval_every: int = arg(250, "evaluate on STS-B dev every N steps (and at the end)")
    eval_batch_size: int = arg(128, "sentences per batch when encoding for evaluation")
    test_final: bool = arg(False, "also test the last model when it is not the best one (default: best only)")


PRESETS = {
    "roberta-base": {"_doc": "RoBERTa-base (Table 6), lr 1e-5 as SimCSE", "model": "roberta-base", "lr": 1e-5},
    "cpu": {"_doc": "CPU-scale protocol: MiniLM-L6 with [CLS] pooling, 6,400 offline sentences (100 steps of 64), "
                    "STS-B dev every 20 steps",
            "model": "minilm-l6", "source": "local", "train_data": "senteval", "limit_train": 6400,
            "eval_every": 20},
    "smoke": {"_doc": "a tiny random BERT, 96 sentences, 3 steps, 50 pairs per STS set: checks that everything runs",
              "model": "tiny", "source": "local", "train_data": "senteval", "limit_train": 96, "batch_size": 16,
              "max_steps": 3, "eval_every": 2, "limit_eval": 50},
}


def validate(args: Args) -> None:
    """Check the values argparse cannot; each failure is one line naming the flag. check_args (types and
    bounds of every field) also covers a --resume run's args.json and Args built in code."""
    utils.check_args(args)
    if args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: the contrastive loss needs >= 2 (in-batch negatives)")


# =========================================================================================
# Data: training sentences; STS evaluation sets
# =========================================================================================
def load_training_sentences(args: Args, data_dir: Path, record: dict | None = None) -> list[str]:
    """wiki1m (SimCSE's, hub or <data_dir>/simcse/), or the offline English sentences: SentEval
    MR, CR, SUBJ, MPQA and both sides of the STS-B train pairs (scores dropped), exact
    duplicates removed (first occurrence kept). Then the fixed --limit-train subset. `record`,
    when given, receives the subset's indices into the full list (saved as data_subsets.json)."""
    if args.train_data == "wiki1m":
        sentences = text_data.load_wiki1m(data_dir, args.source)
    else:
        sentences = text_data.load_senteval_sentences(("MR", "CR", "SUBJ", "MPQA"), data_dir)
        for ex in text_data.load_text_task("stsb", "train", data_dir, args.source):
            sentences += [ex.text_a, ex.text_b]
        sentences = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))
    if args.limit_train:
        if args.limit_train > len(sentences):
            raise UsageError(f"--limit-train {args.limit_train}: {args.train_data} has only {len(sentences)} sentences")
        keep = np.sort(np.random.default_rng(args.subset_seed).permutation(len(sentences))[: args.limit_train])
        if record is not None:
            record["train"] = {"data": args.train_data, "n_all": len(sentences), "subset_seed": args.subset_seed,
                               "indices": keep.tolist()}
        sentences = [sentences[i] for i in keep]
    elif record is not None:
        record["train"] = {"data": args.train_data, "n_all": len(sentences), "subset_seed": None, "indices": None}
    return sentences


def load_sts_sets(args: Args, data_dir: Path, names: tuple[str, ...], split: str = "test") -> dict:
    """{set name: {subset: [Example(s1, s2, score)]}}; STS-B dev is ("stsb", split="dev")."""
    out = {}
    for name in names:
        subsets = text_data.load_sts(name, split, data_dir, args.source)
        out[name] = {k: (v[: args.limit_eval] if args.limit_eval else v) for k, v in subsets.items()}
    return out


# =========================================================================================
# Model: encoder + MLP pooler on [CLS] (training only)
# =========================================================================================
class SimCSEModel(nn.Module):
    """z = MLP(h_[CLS]) with MLP = Linear + tanh (SimCSE's training pooler, new weights). The
    forward takes input embeddings so the training step can perturb them."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh())
        nn.init.normal_(self.mlp[0].weight, std=getattr(cfg, "initializer_range", 0.02))
        nn.init.zeros_(self.mlp[0].bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.get_input_embeddings()(input_ids)

    def forward(self, embeds: torch.Tensor, batch: dict) -> torch.Tensor:
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        h = self.encoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **extra).last_hidden_state
        return self.mlp(h[:, 0]).float()


def load_model(args: Args, train_sentences: list[str]):
    """(encoder, tokenizer): `tiny` builds a random 2-layer BERT whose WordPiece vocabulary is
    trained on the training sentences; anything else goes through common.text_models."""
    if args.model == "tiny":
        return tiny_encoder(train_sentences, hidden=64, layers=2, heads=2,
                            max_length=max(args.max_length, args.eval_max_length), seed=args.seed)
    return load_encoder(args.model)


def tokenize_batch(tokenizer, sentences: list[str], max_length: int, device) -> dict:
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# =========================================================================================
# The method: InfoNCE (Eq. 4), perturbation (Eq. 9), total (Eq. 10)
# =========================================================================================
def infonce_eq4(z_anchor: torch.Tensor, z_other: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 4: mean_i -log( exp(sim(a_i, o_i)/tau) / sum_k exp(sim(a_i, o_k)/tau) ), cosine
    similarity; the positive of anchor i is o_i, the negatives the other rows of o."""
    # fp32 on purpose, autocast off (it would run the matmul in bf16 even on fp32 inputs): a softmax over
    # cosine similarities divided by tau 0.05 turns bf16's rounding (~4e-3) into ~0.08 in the logits
    with torch.autocast(z_anchor.device.type, enabled=False):
        a, o = F.normalize(z_anchor.float(), dim=-1), F.normalize(z_other.float(), dim=-1)
        logits = a @ o.t() / tau
        return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def fgm_perturbation_eq9(grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 9: delta_i = eps * g_i / ||g_i||_2, the norm over sentence i's whole [length, hidden]
    gradient (zero gradient -> zero perturbation). Detached."""
    g = grad.detach().float()
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
    return (epsilon * g / norm).to(grad.dtype)


def fgsm_perturbation_eq2(grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 2 (FGSM), offered for USCAL too (Sec. 3.1: "leveraged both in our supervised model
    and unsupervised model"): eps * sign(g). Detached."""
    return epsilon * grad.detach().sign()


def uscal_total_eq10(l_ct: torch.Tensor, l_adv: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 10: L_ct(x_emb1, x_emb2) + alpha * L_ct(x_emb1, x_adv)."""
    return l_ct + alpha * l_adv


# =========================================================================================
# Training steps: (model, batch, args) -> (loss, terms). Call inside utils.autocast(...),
# then loss.backward().
# =========================================================================================
def simcse_step(model: SimCSEModel, batch: dict, args: Args):
    """Unsupervised SimCSE: two dropout passes of the same sentences, InfoNCE between them."""
    z1 = model(model.embed(batch["input_ids"]), batch)
    z2 = model(model.embed(batch["input_ids"]), batch)
    l_ct = infonce_eq4(z1, z2, args.tau)
    return l_ct, {"l_ct": l_ct}


def uscal_step(model: SimCSEModel, batch: dict, args: Args):
    """USCAL (Eq. 9-10). With alpha = 0 this is simcse_step, computation for computation."""
    if args.alpha == 0:
        return simcse_step(model, batch, args)
    x1 = model.embed(batch["input_ids"])
    z1 = model(x1, batch)
    z2 = model(model.embed(batch["input_ids"]), batch)
    l_ct = infonce_eq4(z1, z2, args.tau)
    (grad,) = torch.autograd.grad(l_ct, x1, retain_graph=True)  # pass 1 only; no parameter gradient
    perturb = fgm_perturbation_eq9 if args.attack == "fgm" else fgsm_perturbation_eq2
    delta = perturb(grad, args.epsilon)
    z_adv = model(x1 + delta, batch)
    l_adv = infonce_eq4(z1, z_adv, args.tau)
    return uscal_total_eq10(l_ct, l_adv, args.alpha), {"l_ct": l_ct, "l_adv": l_adv}


# =========================================================================================
# Evaluation: cosine similarity vs gold scores, Spearman, SimCSE's "all" aggregation
# =========================================================================================
def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(100.0 * spearmanr(x, y)[0]) if np.std(x) > 0 and np.std(y) > 0 else 0.0


def sts_all_aggregation(pred: dict[str, np.ndarray], gold: dict[str, np.ndarray]) -> float:
    """SimCSE's "all" setting: one Spearman correlation (percent) over the concatenation of
    all subsets of a set (not the mean of per-subset correlations)."""
    keys = sorted(pred)
    return spearman(np.concatenate([pred[k] for k in keys]), np.concatenate([gold[k] for k in keys]))


@torch.no_grad()
def encode(encoder: nn.Module, mlp: nn.Module | None, tokenizer, sentences: list[str], args: Args, device,
           amp_dtype) -> torch.Tensor:
    """Sentence vectors [N, H] (float32), in eval mode, batches sorted by length."""
    encoder.eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.zeros(len(sentences), encoder.config.hidden_size)
    for s in range(0, len(order), args.eval_batch_size):
        idx = order[s: s + args.eval_batch_size]
        batch = tokenize_batch(tokenizer, [sentences[i] for i in idx], args.eval_max_length, device)
        with utils.autocast(device, amp_dtype):
            h = encoder(**batch).last_hidden_state
        if args.eval_pooling == "avg":
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1)
        else:
            v = h[:, 0]
            if args.eval_pooling == "cls":
                v = mlp(v)
        out[idx] = v.float().cpu()
    return out


def evaluate_sts(encoder, mlp, tokenizer, sets: dict, args: Args, device, amp_dtype) -> dict[str, float]:
    """{set name: Spearman x 100} with the "all" aggregation; each distinct sentence is encoded
    once. For several test sets, also "spearman_avg" (Table 6's average of the seven)."""
    sentences = sorted({s for subsets in sets.values() for exs in subsets.values() for e in exs
                        for s in (e.text_a, e.text_b)})
    index = {s: i for i, s in enumerate(sentences)}
    vecs = F.normalize(encode(encoder, mlp, tokenizer, sentences, args, device, amp_dtype), dim=-1)
    out = {}
    for name, subsets in sets.items():
        pred, gold = {}, {}
        for sub, exs in subsets.items():
            a = vecs[[index[e.text_a] for e in exs]]
            b = vecs[[index[e.text_b] for e in exs]]
            pred[sub] = (a * b).sum(-1).numpy()
            gold[sub] = np.array([e.label for e in exs], dtype=np.float64)
        out[name] = sts_all_aggregation(pred, gold)
    if len(sets) > 1:
        out["spearman_avg"] = float(np.mean([out[k] for k in sets]))
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


def epoch_order(sentences: list[str], batch_size: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch, in length-grouped batches (length in characters, a proxy for
    tokens), a function of (seed, epoch) only (resumable)."""
    return text_data.length_grouped_order([len(x) for x in sentences], batch_size,
                                          torch.Generator().manual_seed(seed * 100_003 + epoch))


def method_name(args: Args) -> str:
    return "untrained" if args.eval_only else ("simcse" if args.alpha == 0 else "uscal")


def setting_name(args: Args) -> str:
    s = f"{Path(args.model).name}_{args.eval_pooling}"
    return s if args.alpha == 0 or args.eval_only else s + f"_{args.attack}{args.epsilon:g}_a{args.alpha:g}"


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "step", "history", "best", "wall_s",
                   "train_s", "samples")


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

    # ---- data and model (before the run directory exists: a failure here writes nothing)
    data_record: dict = {"train": None}
    sentences = [] if args.eval_only and args.model != "tiny" else load_training_sentences(args, data_dir, data_record)
    if not args.eval_only and args.batch_size > len(sentences):
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(sentences)} training sentences")
    dev_sets = load_sts_sets(args, data_dir, ("stsb",), split="dev")
    test_sets = load_sts_sets(args, data_dir, TEST_SETS)
    # evaluation: the first --limit-eval pairs of each STS set / subset
    data_record["eval"] = {f"{name}_{split}": {sub: len(v) for sub, v in sets[name].items()}
                           for sets, split in ((dev_sets, "dev"), (test_sets, "test")) for name in sets}
    data_record["limit_eval"] = args.limit_eval
    encoder, tokenizer = load_model(args, sentences)
    model = SimCSEModel(encoder).to(device).train()

    steps_per_epoch = len(sentences) // args.batch_size  # drop_last: every batch has its negatives
    total_steps = 0 if args.eval_only else args.epochs * steps_per_epoch
    opt, sched = make_optimizer(model, args, max(total_steps, 1))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    step_fn = uscal_step  # = simcse_step when alpha is 0

    if args.resume:
        run_dir = Path(args.resume)
    else:
        data_name = "sts" if args.eval_only else args.train_data
        run_dir = utils.make_run_dir(args.out_dir, utils.run_name(method_name(args), data_name, setting_name(args),
                                                                  args.seed, args.exp_name))
        utils.atomic_write_json(run_dir / "args.json", dataclasses.asdict(args))
    step, history, best, wall_before, train_time, samples = 0, [], None, 0.0, 0.0, 0
    sums: dict[str, float] = {}  # training-loss sums since the last evaluation
    skipped = 0  # --skip-nonfinite: steps left out
    if resume is not None:
        with utils.restoring(run_dir):
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            utils.set_rng_state(resume["rng"])
        step, history, best = resume["step"], resume["history"], resume["best"]
        wall_before, train_time, samples = resume["wall_s"], resume["train_s"], resume["samples"]
        sums, skipped = dict(resume.get("sums", {})), resume.get("skipped_nonfinite", 0)
    else:  # a new run, or one that stopped before its first checkpoint (it starts over)
        utils.atomic_write_json(run_dir / "data_subsets.json", data_record)
    metrics = utils.MetricsWriter(run_dir, args.track)
    if args.resume:
        metrics.resume(resume, step)
        print(f"resuming {run_dir} at step {step}" if resume is not None else
              f"resuming {run_dir}: it stopped before its first checkpoint, so it starts over")
    print(f"run: {run_dir}  |  {method_name(args)} on {len(sentences)} {args.train_data} sentences  |  "
          f"model {args.model}  |  device {device}, precision {amp_dtype or 'fp32'}")

    t_start = time.time()

    def checkpoint() -> None:
        utils.save_checkpoint(run_dir, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng": utils.rng_state(), "step": step, "history": history,
            "best": best, "wall_s": wall_before + time.time() - t_start, "train_s": train_time, "samples": samples,
            "sums": sums, "skipped_nonfinite": skipped, "metrics_lines": metrics.lines})

    def evaluate_and_checkpoint() -> None:
        """STS-B dev, log, keep the best encoder weights, checkpoint."""
        nonlocal best, sums
        res = {"stsb_dev": evaluate_sts(model.encoder, model.mlp, tokenizer, dev_sets, args, device,
                                        amp_dtype)["stsb"]}
        model.train()
        train_log = {k: v / sums["n"] for k, v in sums.items() if k != "n"} if sums.get("n") else {}
        sums = {}
        rec = {"step": step, **res}
        history.append(rec)
        if best is None or res["stsb_dev"] > best["stsb_dev"]:
            best = dict(rec)
            utils.atomic_torch_save(model.state_dict(), run_dir / "best_model.pt")
        if args.skip_nonfinite:
            train_log["skipped_nonfinite"] = skipped
        metrics.write(step, "stsb_dev", epoch=step / max(steps_per_epoch, 1), **res, lr=sched.get_last_lr()[0],
                      **train_log)
        tqdm.write(f"step {step:6d}  STS-B dev {res['stsb_dev']:6.2f}  best {best['stsb_dev']:6.2f} (step "
                   f"{best['step']})" + "".join(f"  {k} {v:.4f}" for k, v in train_log.items()))
        checkpoint()

    stop = utils.StopFlag()
    last_eval_step = history[-1]["step"] if history else -1
    with stop:
        for epoch in range(step // max(steps_per_epoch, 1), args.epochs if not args.eval_only else 0):
            order = epoch_order(sentences, args.batch_size, args.seed, epoch)
            first = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       dynamic_ncols=True, disable=None)
            for b in bar:
                t0 = time.time()
                idx = order[b * args.batch_size: (b + 1) * args.batch_size]
                batch = tokenize_batch(tokenizer, [sentences[i] for i in idx], args.max_length, device)
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
                if step % args.eval_every == 0:  # also when interrupted: it is due at this step
                    last_eval_step = step
                    evaluate_and_checkpoint()
                if stop or (args.max_steps and step >= args.max_steps):
                    break
            if stop:  # checkpoint this step (the data order is a function of the epoch: it resumes mid-epoch)
                checkpoint()
                print(f"\ninterrupted at step {step}; checkpoint saved. "
                      f"Resume with: python uscal.py --resume {run_dir}", flush=True)
                sys.exit(utils.EXIT_INTERRUPTED)
            if args.max_steps and step >= args.max_steps:
                break
        if step != last_eval_step:  # the end of training (or, with --eval-only, the start)
            evaluate_and_checkpoint()
    metrics.close()

    # ---- the best checkpoint: export it (save_pretrained, no MLP), reload it, test it
    model.load_state_dict(torch.load(run_dir / "best_model.pt", map_location=device, weights_only=True))
    export = run_dir / "model"
    model.encoder.save_pretrained(export)
    tokenizer.save_pretrained(export)
    best_encoder, best_tok = load_encoder(str(export))  # what others will load
    test = evaluate_sts(best_encoder.to(device), model.mlp, best_tok, test_sets, args, device, amp_dtype)
    final = {"step": history[-1]["step"], "stsb_dev": history[-1]["stsb_dev"]}
    if args.test_final and history[-1]["step"] != best["step"]:
        model.load_state_dict(utils.load_checkpoint(run_dir)["model"])
        final |= evaluate_sts(model.encoder, model.mlp, tokenizer, test_sets, args, device, amp_dtype)
    elif history[-1]["step"] == best["step"]:
        final |= test

    wall = wall_before + time.time() - t_start
    summary = {
        "script": "uscal.py", "method": method_name(args), "dataset": "sts", "train_data": args.train_data,
        "setting": setting_name(args), "seed": args.seed, "model": args.model, "primary_metric": "spearman_avg",
        "final": final, "best": {**best, **test}, "n_train": len(sentences), "steps": step,
        "evaluations": len(history), "wall_s": round(wall, 2),
        "samples_per_s": round(samples / max(train_time, 1e-9), 2) if samples else None,
        "skipped_nonfinite_steps": skipped,
    }
    utils.write_summary(run_dir, summary)
    print("test (best checkpoint, step %d): " % best["step"]
          + "  ".join(f"{k} {test[k]:.2f}" for k in (*TEST_SETS, "spearman_avg")) + f"  ->  {run_dir}/summary.json")
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
