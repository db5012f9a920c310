"""SCAL: Supervised Contrastive Adversarial Learning for fine-tuning a text encoder.

Docs: docs/scal.md
Paper: "Simple Contrastive Representation Adversarial Learning for NLP Tasks", Sec. 3.3
(../shared/papers/scal_uscal.txt). One file, top to bottom: arguments, data, model, the method's
losses (plain functions named after their equations), one function per training step (method and
baselines), evaluation (clean and under attack), the training loop.

    python scal.py --task rte                               # BERT-base, GLUE RTE, SCAL (Table 3)
    python scal.py --task mrpc --method ft                  # the fine-tuning baseline row
    python scal.py --task cola --method adv                 # ablation "+AT" (Table 4); --method cl is "+CL"
    python scal.py --task trec                              # Table 5 (TREC error rate)
    python scal.py --preset anli-roberta-large              # Table 7 (trained on MNLI + SNLI, tested on ANLI)
    python scal.py --preset roberta-base --task sst2        # RoBERTa-base, batch 16
    python scal.py --preset cpu --task trec --seed 0        # CPU-scale protocol (MiniLM-L6; CoLA, SST-2, TREC)
    python scal.py --preset cpu-pairs --task rte --seed 0   # the same for the pair tasks (RTE, MRPC)
    python scal.py --model tiny --task rte --max-steps 3    # a tiny random model for a few steps

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

Readings of the paper and the choices it leaves open: docs/scal.md ("Paper vs. code"); each
is one line in the function or flag it concerns. Data, padding and metrics: common/text_tasks.py;
the run directory, checkpoints, resume and Ctrl-C: common/run.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import text_data
from common.diagnostics import loss_term_grad_ratios, mean_grad_ratios
from common import utils
from common.run import Run, RunArgs
from common.text_models import load_encoder, make_optimizer, tiny_encoder
from common.text_tasks import (PRIMARY_METRIC, SELECT_METRIC, EvalSet, check_train_tasks, collate,  # noqa: F401
                               encode_examples, epoch_order, load_encoded_task, task_metrics)  # (speed.py: scal.*)
from common.utils import UsageError, arg

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli", "stsb")
TASK_CHOICES = GLUE_TASKS + ("ag_news", "trec", "anli", "snli")
METHODS = ("scal", "ft", "adv", "cl")


# =========================================================================================
# Arguments (defaults: the paper's BERT-base GLUE setting, Sec. 4.1)
# =========================================================================================
@dataclass
class Args(RunArgs):
    """SCAL (and its ft / +AT / +CL baselines) for sentence(-pair) classification."""

    # -- run (and the flags every script shares: common.run.RunArgs)
    data_dir: str = arg("", "folder of the offline text data (default: $LIS_SHARED_DATA, ./data, ../shared/data)")
    source: str = arg("auto", "where data comes from: local files, the HF hub, or auto (local when present)",
                      choices=list(text_data.SOURCES))
    limit_train: int | None = arg(None, "train on a fixed random subset of this many examples (see --subset-seed)")
    subset_seed: int = arg(0, "seed of the --limit-train subset (fixed across --seed, so seeds share the data)")
    val_from_train: int | None = arg(None, "hold out this many training rows (fixed seed, never trained on; "
                                     "--limit-train draws from the rest) to choose the checkpoint and stop early "
                                     "on (metrics *_val); default: both on the evaluation set, an oracle")
    # -- task and model
    task: str = arg("rte", "task: GLUE, ag_news, trec (coarse, error rate), anli (rounds A1-A3), snli",
                    choices=list(TASK_CHOICES))
    train_tasks: list[str] = arg([], "train on the union of these tasks' train splits (same labels; default: --task; "
                                 "Table 8: mnli snli anli, without FeverNLI, which has no loader here)")
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
    warmup_ratio: float = arg(0.1, "fraction of the planned steps with linear warm-up, then linear decay to 0 "
                              "(ours: the paper says 'warm up learning rate scheduler')", lt=1)
    max_grad_norm: float = arg(1.0, "clip the gradient norm (HF Trainer's default; the paper says nothing; 0: none)")
    patience: int = arg(3, "stop after this many evaluations without improvement on the selection split "
                        "(--val-from-train's, else the evaluation set) (ours; 0: never stop early)", ge=0)
    eval_every: int = arg(0, "evaluate every N steps (0: at the end of every epoch)", ge=0)
    eval_batch_size: int = arg(64, "batch size for evaluation")
    grad_ratio_every: int = arg(50, "every N steps, ||grad|| of each weighted loss term / ||grad|| of the clean CE "
                                "on the model's parameters (gradratio_* in metrics.jsonl and summary.json; 0: off)",
                                ge=0)
    # -- robustness evaluation
    robust_eval: bool = arg(True, "also evaluate under a white-box attack on the input embeddings (adv_ metrics)")
    robust_attack: str = arg("same", "attack of the robustness evaluation: same (as --attack), fgm or fgsm",
                             choices=["same", "fgm", "fgsm"])
    robust_epsilon: float | None = arg(None, "epsilon of the robustness evaluation (default: --epsilon)")


PRESETS = {
    "roberta-base": {"_doc": "RoBERTa-base, batch 16 (Sec. 4.1)", "model": "roberta-base", "batch_size": 16},
    "anli-bert-large": {"_doc": "Table 7: BERT-large trained on MNLI + SNLI, tested on ANLI, batch 32, 3 epochs (ours)",
                        "model": "bert-large-uncased", "task": "anli", "train_tasks": ["mnli", "snli"],
                        "batch_size": 32, "epochs": 3},
    "anli-roberta-large": {"_doc": "Table 7: RoBERTa-large on MNLI + SNLI, tested on ANLI, batch 32, 3 epochs (ours)",
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
}


def validate(args: Args) -> None:
    """Check the values argparse cannot; each failure is one line naming the flag. check_args (types and
    bounds of every field) also covers a --resume run's args.json and Args built in code."""
    utils.check_args(args)
    if args.method in ("scal", "cl") and args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: the contrastive term needs >= 2 (in-batch negatives)")
    check_train_tasks(args, TASK_CHOICES)


# =========================================================================================
# Model: encoder, classifier on [CLS], pooler on [CLS] for the contrastive term
# =========================================================================================
class SCALModel(nn.Module):
    """h = encoder(x_emb)[CLS]; logits = Linear(dropout(h)); z = tanh(Linear(h)): a new pooler (Sec. 4.1),
    not the pretrained NSP one. The forward takes x_emb = embed(input_ids), the token embeddings before
    position embeddings, LayerNorm and dropout (Eq. 6's "word embeddings"), so that a step can perturb them."""

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
    """delta for `embeds` (this batch's, per example, never the shared embedding matrix) from the gradient
    of `loss` with respect to them, in the clean CE's own pass (training mode: its dropout). The graph is
    kept for the backward pass of the total loss; no parameter gradient is computed here."""
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


def weighted_terms(terms: dict[str, torch.Tensor], args: Args) -> dict[str, torch.Tensor]:
    """Each loss term times its weight in the method's total (Eq. 8; +AT 0.5/0.5; +CL CE + alpha * L_ct),
    for the gradient-norm ratios (--grad-ratio-every)."""
    weight = {"ce": 0.5 if args.method in ("scal", "adv") else 1.0, "ce_adv": 0.5, "l_ct": args.alpha}
    return {k: weight[k] * v for k, v in terms.items()}


def record_grad_ratios(ratios: list, step: int, terms: dict, model: nn.Module, args: Args) -> float:
    """Every --grad-ratio-every steps from the first: append {"step", term: ||grad term|| / ||grad CE||} of
    the weighted terms on the model's parameters to `ratios`. Returns the seconds it took (not training)."""
    if not args.grad_ratio_every or step % args.grad_ratio_every or len(terms) < 2:
        return 0.0
    t = time.time()
    params = [p for p in model.parameters() if p.requires_grad]
    ratios.append({"step": step + 1, **loss_term_grad_ratios(weighted_terms(terms, args), "ce", params)})
    return time.time() - t


# =========================================================================================
# One training step per method: (model, batch, args) -> (loss, terms), inside utils.autocast
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
        for prefix, attack, eps in (runs[:1] if ev.name == "val" else runs):  # --val-from-train: clean only
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
def setting_name(args: Args) -> str:
    model = Path(args.model).name
    if args.method == "ft":
        return model
    s = f"{model}_{args.attack}{args.epsilon:g}"
    return s + (f"_a{args.alpha:g}" if args.method in ("scal", "cl") else "")


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "step", "history", "best", "stopped_early",
                   "wall_s", "train_s", "samples")  # and grad_ratios (absent from older checkpoints)


def main(args: Args) -> dict:
    run = Run("scal.py", Args, args, validate, keys=CHECKPOINT_KEYS)  # on --resume only --max-steps may change
    args = run.args
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)
    data_dir = utils.resolve_text_data_dir(args.data_dir)
    regression = args.task in text_data.REGRESSION_TASKS

    # ---- data (common/text_tasks.py) and model, before the run directory exists: a failure writes nothing
    encoder, tokenizer, train_enc, eval_sets, test_sets, data_record = load_encoded_task(args, data_dir, load_model)
    model = SCALModel(encoder, 1 if regression else len(text_data.label_names(args.task))).to(device).train()
    steps_per_epoch = len(train_enc) // args.batch_size  # drop_last: every batch has negatives
    total_steps = args.epochs * steps_per_epoch
    opt, sched = make_optimizer(model, args, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    primary = PRIMARY_METRIC.get(args.task, "acc")
    select = SELECT_METRIC.get(args.task, primary)
    sel = select + ("_val" if args.val_from_train else "")  # chooses the checkpoint, stops early

    # ---- the run directory (data_subsets.json: the training subset, the evaluation examples used)
    state = run.restore(model=model, optimizer=opt, scheduler=sched, scaler=scaler)  # {} for a new run
    run.open(utils.run_name(args.method, args.task, setting_name(args), args.seed, args.exp_name),
             files={"data_subsets.json": data_record}, resumed_at=f"at step {state['step']}" if state else "")
    step, history, best = state.get("step", 0), state.get("history", []), state.get("best")
    train_time, samples = state.get("train_s", 0.0), state.get("samples", 0)
    stopped_early = bool(state.get("stopped_early"))  # a finished run resumes to its summary
    ratios = state.get("grad_ratios", [])  # {"step", term: ratio} every --grad-ratio-every steps
    print(f"run: {run.dir}  |  {args.method} on {args.task} ({len(train_enc)} train, "
          f"{', '.join(f'{e.name} {len(e.gold)}' for e in eval_sets)})  |  model {args.model}  |  device {device}, "
          f"precision {amp_dtype or 'fp32'}")

    lengths, order = [len(e["input_ids"]) for e in train_enc], []
    bar = tqdm(total=total_steps, initial=step, desc="steps", leave=False, dynamic_ncols=True, disable=None)
    with run:
        while step < total_steps and not stopped_early:
            epoch, b = divmod(step, steps_per_epoch)
            if b == 0 or not order:  # the data order of this epoch (a function of seed and epoch: same on resume)
                order = epoch_order(lengths, args.batch_size, args.seed, epoch)
            t0 = time.time()  # throughput: training steps only, without evaluation
            idx = order[b * args.batch_size: (b + 1) * args.batch_size]
            batch = collate([train_enc[i] for i in idx], tokenizer, device, regression)
            with utils.autocast(device, amp_dtype):
                loss, terms = STEPS[args.method](model, batch, args)
            if run.finite(loss, step, terms):  # else (--skip-nonfinite): no backward pass, no update
                t0 += record_grad_ratios(ratios, step, terms, model, args)  # a diagnostic: not training time
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if args.max_grad_norm > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                run.add({"loss": loss, **terms})
            sched.step()  # the schedule moves on with the data, over a skipped step too
            step += 1
            samples += len(idx)
            train_time += time.time() - t0
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            at_limit = bool(args.max_steps and step >= args.max_steps)
            # ---- evaluate every --eval-every steps (0: every epoch) and at the last step; keep the best
            due = step % (args.eval_every or steps_per_epoch) == 0 or at_limit or step == total_steps
            if due:
                res = evaluate(model, eval_sets, args, device, amp_dtype, tokenizer)
                history.append({"step": step, "epoch": step / steps_per_epoch, **res})
                best = max(history, key=lambda r: r[select])  # the first of the best on the evaluation set (oracle)
                chosen = max(history, key=lambda r: r[sel])  # = best without --val-from-train
                if chosen is history[-1] and test_sets:  # the chosen weights, for the test evaluation at the end
                    utils.atomic_torch_save(model.state_dict(), run.dir / "best_model.pt")
                stopped_early = 0 < args.patience <= len(history) - 1 - history.index(chosen)  # evaluations after it
                prev = history[-2]["step"] if len(history) > 1 else 0
                train_log = run.means() | mean_grad_ratios([r for r in ratios if r["step"] > prev])
                run.log(step, eval_sets[0].name, epoch=step / steps_per_epoch, **res, lr=sched.get_last_lr()[0],
                        **train_log)
                tqdm.write(f"step {step:6d}  {select} {res[select]:6.2f}  best {best[select]:6.2f}"
                           + (f"  adv_{select} {res['adv_' + select]:6.2f}" if "adv_" + select in res else "")
                           + "".join(f"  {k} {v:.4f}" for k, v in train_log.items()))
            if due or run.stopped:  # checkpoint at every evaluation, and on Ctrl-C / SIGTERM (mid-epoch too)
                run.save(step=step, history=history, best=best, stopped_early=stopped_early, train_s=train_time,
                         samples=samples, grad_ratios=ratios)
                if run.stopped:
                    run.interrupt(f"at step {step}")
            if at_limit:
                break
    bar.close()
    # ---- the paper's test numbers (ANLI: the chosen checkpoint on the test split) and summary.json
    test = None
    if test_sets and best is not None:
        model.load_state_dict(torch.load(run.dir / "best_model.pt", map_location=device, weights_only=True))
        test = evaluate(model, test_sets, args, device, amp_dtype, tokenizer)
    return finish(run, args, history, sel, ratios, test, {
        "n_train": len(train_enc), "steps": step, "evaluations": len(history), "stopped_early": stopped_early,
        "samples_per_s": round(samples / max(train_time, 1e-9), 2)})


def finish(run: Run, args: Args, history: list[dict], sel: str, ratios: list[dict], test: dict | None,
           counts: dict) -> dict:
    """summary.json: the last evaluation (final), the best one on the evaluation set itself (best: an oracle),
    the one chosen by `sel` (selected: on --val-from-train's split; = best without it), the test numbers of
    the chosen checkpoint (ANLI), the mean gradient-norm ratios, and `counts`."""
    primary = PRIMARY_METRIC.get(args.task, "acc")
    select = SELECT_METRIC.get(args.task, primary)
    last, best, chosen = history[-1], max(history, key=lambda r: r[select]), max(history, key=lambda r: r[sel])
    test = test | {"step": chosen["step"]} if test else None
    summary = run.finish({
        "script": "scal.py", "method": args.method, "dataset": args.task, "setting": setting_name(args),
        "seed": args.seed, "model": args.model, "primary_metric": primary, "select_metric": select,
        "final": {k: v for k, v in last.items() if k != "epoch"},
        "best": {k: v for k, v in best.items() if k != "epoch"},
        "selected": {k: v for k, v in chosen.items() if k != "epoch"}, "selected_by": sel,
        "n_val": args.val_from_train or 0, "test": test,
        "grad_ratios": {"every": args.grad_ratio_every, "samples": len(ratios), **mean_grad_ratios(ratios)}, **counts})
    print(f"done: {primary} last {last[primary]:.2f}  best {best[primary]:.2f} (step {best['step']})  selected by "
          f"{sel} {chosen[primary]:.2f} (step {chosen['step']})"
          + (f"  test {test[primary]:.2f}" if test else "") + f"  ->  {run.dir}/summary.json")
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
