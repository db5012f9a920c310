"""USCAL: Unsupervised Contrastive Adversarial Learning of sentence embeddings.

Paper: "Simple Contrastive Representation Adversarial Learning for NLP Tasks", Sec. 3.4 and 4.5
(../shared/papers/scal_uscal.txt): unsupervised SimCSE plus an adversarial positive.
Docs: docs/scal.md#uscalpy (each reading of the paper, the CPU protocol, the results).

    python uscal.py                                    # BERT-base on wiki1m (Table 6), USCAL
    python uscal.py --alpha 0                          # the same run without the adversarial term = SimCSE
    python uscal.py --preset roberta-base              # RoBERTa-base (lr 1e-5, SimCSE's)
    python uscal.py --preset cpu --seed 0              # CPU-scale protocol (MiniLM-L6 [CLS], offline sentences)
    python uscal.py --preset cpu --eval-only           # the untrained starting point of the CPU protocol
    python uscal.py --preset cpu-native                # reference row: untrained MiniLM, its own mean pooling
    python uscal.py --preset cpu --epsilon 0           # control: a third dropout view, no adversarial direction
    python -m benchmarks.run --suite smoke --only uscal_   # a tiny random model for a few steps

Per step, for a batch of sentences x (Sec. 3.4):

  SimCSE (Eq. 4)      two passes with different dropout masks -> z1, z2 (MLP on [CLS]);
                      L_ct(z1, z2) = InfoNCE, positive z2_i, negatives z2_k, cosine, tau = 0.05
  perturbation (Eq. 9) delta = eps * g / ||g||_2 per sentence, g = dL_ct(z1, z2)/dx_emb1,
                      detached (FGM; `--attack fgsm`: eps * sign(g))
  adversarial view    z_adv from x_emb1 + delta (a third pass)
  total (Eq. 10)      L_ct(z1, z2) + alpha * L_ct(z1, z_adv), whose negatives are the other
                      adversarial vectors of the batch (as in Eq. 4)

`--alpha 0` skips the adversarial pass: the step is then exactly unsupervised SimCSE (the baseline).
The best checkpoint on STS-B dev (a development set, not a test set; `--patience` stops training when
it stops improving) is tested on the seven STS sets and saved in <run>/model (no MLP). Training
sentences that occur in an evaluation set are dropped from the pool (`--keep-eval-sentences`: not).
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
from common import utils
from common.run import Run, RunArgs
from common.text_models import (SENTENCE_POOLINGS, encode_sentences, load_encoder, make_optimizer, mean_pool,
                                 tiny_encoder, tokenize_batch)
from common.text_tasks import epoch_order, sts_spearman
from common.utils import UsageError, arg

TEST_SETS = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")


# =========================================================================================
# Arguments (defaults: the paper's BERT-base setting, Sec. 4.1 and SimCSE)
# =========================================================================================
@dataclass
class Args(RunArgs):
    """USCAL (and SimCSE, --alpha 0) for unsupervised sentence embeddings."""

    # -- run (and the flags every script shares: common.run.RunArgs)
    data_dir: str = arg("", "folder of the offline text data (default: $LIS_SHARED_DATA, ./data, ../shared/data)")
    source: str = arg("auto", "where data comes from: local files, the HF hub, or auto (local when present)",
                      choices=list(text_data.SOURCES))
    limit_train: int | None = arg(None, "train on a fixed random subset of this many sentences (see --subset-seed)")
    subset_seed: int = arg(0, "seed of the --limit-train subset (fixed across --seed, so seeds share the data)")
    limit_eval: int | None = arg(None, "evaluate on the first N pairs of each STS set / subset (default: all)")
    eval_only: bool = arg(False, "no training: evaluate the starting encoder on STS-B dev and the test sets")
    keep_eval_sentences: bool = arg(False, "keep training sentences that occur in an evaluation set (STS12-16, "
                                    "STS-B dev/test, SICK-R); default: dropped, the number in summary.json")
    # -- data and model
    train_data: str = arg("wiki1m", "training sentences: wiki1m (SimCSE's) or senteval (MR, CR, SUBJ, MPQA and STS-B "
                          "train sentences, offline)", choices=list(text_data.UNLABELLED_SENTENCES))
    model: str = arg("bert-base-uncased", "encoder: HF hub name, local directory, minilm-l6 / e5-small (offline "
                     "wheels) or tiny (random 2-layer BERT, for smoke runs only)")
    max_length: int = arg(32, "maximum tokens per training sentence", ge=4)
    eval_max_length: int = arg(128, "maximum tokens per evaluation sentence", ge=4)
    eval_pooling: str = arg("cls_before_pooler", "sentence vector at evaluation: cls_before_pooler ([CLS], no MLP; "
                            "paper), cls ([CLS] through the MLP), avg (mean over tokens); training pools by "
                            "--train-pooling whatever this says", choices=list(SENTENCE_POOLINGS))
    train_pooling: str = arg("cls", "sentence vector of the training loss: cls (MLP on [CLS], SimCSE unsup; paper) "
                             "or avg (mean over tokens, no MLP: how all-MiniLM-L6-v2 was trained)",
                             choices=["cls", "avg"])
    # -- method
    alpha: float = arg(1.0, "weight of the adversarial term in Eq. 10 (not given in the paper); 0 = SimCSE")
    attack: str = arg("fgm", "perturbation: fgm (Eq. 9, eps * g/||g||_2 per sentence) or fgsm (eps * sign g)",
                      choices=["fgm", "fgsm"])
    epsilon: float = arg(0.3, "perturbation size (not given for USCAL; middle of the paper's SCAL grid); 0: the "
                         "control, a third dropout view of the same input (same passes, no adversarial direction)")
    tau: float = arg(0.05, "temperature of the InfoNCE (Eq. 4)", gt=0)
    # -- optimisation
    epochs: int = arg(1, "training epochs (SimCSE: one pass over wiki1m)")
    batch_size: int = arg(64, "batch size (sentences; each gives 2 or 3 passes)")
    lr: float = arg(3e-5, "peak learning rate (AdamW; SimCSE used 1e-5 for RoBERTa-base)", gt=0)
    weight_decay: float = arg(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = arg(0.1, "fraction of the planned steps with linear warm-up, then linear decay to 0", lt=1)
    max_grad_norm: float = arg(1.0, "clip the gradient norm (0: no clipping)")
    eval_every: int = arg(250, "evaluate on STS-B dev every N steps (and at the end)")
    patience: int = arg(0, "stop after this many STS-B dev evaluations without improvement (0: never); the tested "
                        "model is the best on STS-B dev either way", ge=0)
    eval_batch_size: int = arg(128, "sentences per batch when encoding for evaluation")
    test_final: bool = arg(False, "also test the last model when it is not the best one (default: best only)")


PRESETS = {
    "roberta-base": {"_doc": "RoBERTa-base (Table 6), lr 1e-5 as SimCSE", "model": "roberta-base", "lr": 1e-5},
    "cpu": {"_doc": "CPU-scale protocol: MiniLM-L6 with [CLS] pooling, 6,400 offline sentences (100 steps of 64), "
                    "STS-B dev every 20 steps",
            "model": "minilm-l6", "source": "local", "train_data": "senteval", "limit_train": 6400,
            "eval_every": 20},
    "cpu-native": {"_doc": "reference row: the untrained MiniLM-L6 with its native mean pooling on the seven STS sets",
                   "model": "minilm-l6", "source": "local", "eval_only": True, "eval_pooling": "avg"},
}


def validate(args: Args) -> None:
    """check_args (every field's type and bounds; also for a --resume run's args.json), then what it cannot."""
    utils.check_args(args)
    if args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: the contrastive loss needs >= 2 (in-batch negatives)")


# =========================================================================================
# Data: training sentences; STS evaluation sets
# =========================================================================================
def load_data(args: Args, data_dir: Path) -> tuple[list[str], dict, dict, dict]:
    """The training sentences (wiki1m or offline ones, less any sentence of an evaluation set; the --limit-train
    subset), STS-B dev and the seven test sets (the first --limit-eval pairs of each subset), and their record.
    --eval-only loads no training sentences, except for `tiny`, whose vocabulary is trained on them."""
    sentences, record = [], {"train": None}
    if not args.eval_only or args.model == "tiny":
        exclude = None if args.keep_eval_sentences else lambda: text_data.sts_sentences(  # all, whatever --limit-eval
            [(("stsb",), "dev"), (TEST_SETS, "test")], data_dir, args.source)
        sentences, record["train"] = text_data.load_unlabelled_sentences(
            args.train_data, data_dir, args.source, args.limit_train, args.subset_seed, exclude)
    if not args.eval_only and args.batch_size > len(sentences):
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(sentences)} training sentences")
    dev_sets = text_data.load_sts_sets(("stsb",), "dev", data_dir, args.source, args.limit_eval)
    test_sets = text_data.load_sts_sets(TEST_SETS, "test", data_dir, args.source, args.limit_eval)
    record["eval"] = {f"{name}_{split}": {sub: len(v) for sub, v in sets[name].items()}
                      for sets, split in ((dev_sets, "dev"), (test_sets, "test")) for name in sets}
    record["limit_eval"] = args.limit_eval
    return sentences, dev_sets, test_sets, record


# =========================================================================================
# Model: encoder + MLP pooler on [CLS] (training only)
# =========================================================================================
class SimCSEModel(nn.Module):
    """z = MLP(h_[CLS]) with MLP = Linear + tanh (SimCSE's training pooler, new weights), or with
    pooling "avg" the mean of the token vectors (no MLP). The forward takes input embeddings so the
    training step can perturb them."""

    def __init__(self, encoder: nn.Module, pooling: str = "cls"):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.pooling = pooling
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh())
        nn.init.normal_(self.mlp[0].weight, std=getattr(cfg, "initializer_range", 0.02))
        nn.init.zeros_(self.mlp[0].bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.get_input_embeddings()(input_ids)

    def forward(self, embeds: torch.Tensor, batch: dict) -> torch.Tensor:
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        h = self.encoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **extra).last_hidden_state
        if self.pooling == "avg":  # SimCSE's and sentence-transformers' mean pooling: no MLP
            return mean_pool(h, batch["attention_mask"]).float()
        return self.mlp(h[:, 0]).float()


def load_model(args: Args, train_sentences: list[str]):
    """(encoder, tokenizer): `tiny` builds a random 2-layer BERT whose WordPiece vocabulary is
    trained on the training sentences; anything else goes through common.text_models."""
    if args.model == "tiny":
        return tiny_encoder(train_sentences, hidden=64, layers=2, heads=2,
                            max_length=max(args.max_length, args.eval_max_length), seed=args.seed)
    return load_encoder(args.model)


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
# Training steps: (model, batch, args) -> (loss, terms); call inside utils.autocast(...)
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
    x1 = model.embed(batch["input_ids"])  # x_emb1 of Eq. 9, read as pass 1's inputs_embeds (docs/scal.md)
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
def evaluate_sts(encoder, mlp, tokenizer, sets: dict, args: Args, device, amp_dtype) -> dict[str, float]:
    """{set: Spearman x 100} of the cosine similarities, "all" aggregation, and "spearman_avg" (Table 6) for several
    sets; the sentence vector is [CLS] without the MLP by default (Fig. 2; SimCSE's cls_before_pooler)."""
    out = sts_spearman(sets, lambda s: encode_sentences(encoder, tokenizer, s, device, amp_dtype, args.eval_pooling,
                                                        mlp, args.eval_batch_size, args.eval_max_length))
    if len(sets) > 1:
        out["spearman_avg"] = float(np.mean([out[k] for k in sets]))
    return out


def export_and_test(model: SimCSEModel, tokenizer, run_dir: Path, test_sets: dict, history: list, best: dict,
                    args: Args, device, amp_dtype) -> tuple[dict, dict]:
    """(test, final): the best checkpoint saved (save_pretrained, no MLP) in <run>/model, reloaded and tested;
    the last evaluation, also tested when it is the best or with --test-final."""
    model.load_state_dict(torch.load(run_dir / "best_model.pt", map_location=device, weights_only=True))
    model.encoder.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    best_encoder, best_tok = load_encoder(str(run_dir / "model"))  # as others will load it
    test = evaluate_sts(best_encoder.to(device), model.mlp, best_tok, test_sets, args, device, amp_dtype)
    final = {"step": history[-1]["step"], "stsb_dev": history[-1]["stsb_dev"]}
    if args.test_final and history[-1]["step"] != best["step"]:
        model.load_state_dict(utils.load_checkpoint(run_dir)["model"])
        final |= evaluate_sts(model.encoder, model.mlp, tokenizer, test_sets, args, device, amp_dtype)
    elif history[-1]["step"] == best["step"]:
        final |= test
    return test, final


# =========================================================================================
# Training
# =========================================================================================
def method_name(args: Args) -> str:
    return "untrained" if args.eval_only else ("simcse" if args.alpha == 0 else "uscal")


def setting_name(args: Args) -> str:
    s = f"{Path(args.model).name}_{args.eval_pooling}" + ("_trainavg" if args.train_pooling == "avg" else "")
    return s if args.alpha == 0 or args.eval_only else s + f"_{args.attack}{args.epsilon:g}_a{args.alpha:g}"


SELECTED_ON = ("STS-B dev (a development set, not a test set: legitimate model selection; the seven test sets are "
               "scored once, on that checkpoint)")
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "step", "history", "best", "wall_s",
                   "train_s", "samples")  # and stopped_early (absent from older checkpoints)


def main(args: Args) -> dict:
    run = Run("uscal.py", Args, args, validate, keys=CHECKPOINT_KEYS)  # only --max-steps may change on --resume
    args = run.args
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)

    # ---- data and model (before the run directory exists: a failure here writes nothing)
    sentences, dev_sets, test_sets, data_record = load_data(args, utils.resolve_text_data_dir(args.data_dir))
    encoder, tokenizer = load_model(args, sentences)
    model = SimCSEModel(encoder, args.train_pooling).to(device).train()
    steps_per_epoch = len(sentences) // args.batch_size  # drop_last: every batch has its negatives
    total_steps = 0 if args.eval_only else args.epochs * steps_per_epoch
    # AdamW without decay on biases/LayerNorm, linear warm-up then decay (Sec. 4.1; SimCSE used neither)
    opt, sched = make_optimizer(model, args, max(total_steps, 1))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # ---- the run directory (data_subsets.json: the training subset, the evaluation pairs)
    state = run.restore(model=model, optimizer=opt, scheduler=sched, scaler=scaler)  # {} for a new run
    run.open(utils.run_name(method_name(args), "sts" if args.eval_only else args.train_data, setting_name(args),
                            args.seed, args.exp_name),
             files={"data_subsets.json": data_record}, resumed_at=f"at step {state['step']}" if state else "")
    step, history, best = state.get("step", 0), state.get("history", []), state.get("best")
    train_time, samples = state.get("train_s", 0.0), state.get("samples", 0)
    stopped_early = bool(state.get("stopped_early"))  # a run stopped early resumes to its summary
    print(f"run: {run.dir}  |  {method_name(args)} on {len(sentences)} {args.train_data} sentences  |  "
          f"model {args.model}  |  device {device}, precision {amp_dtype or 'fp32'}")

    def evaluate_and_checkpoint() -> None:
        """STS-B dev, log, keep the best encoder weights, stop after --patience evaluations without a better one,
        checkpoint."""
        nonlocal best, stopped_early
        res = {"stsb_dev": evaluate_sts(model.encoder, model.mlp, tokenizer, dev_sets, args, device, amp_dtype)["stsb"]}
        model.train()
        train_log = run.means()
        history.append({"step": step, **res})
        if best is None or res["stsb_dev"] > best["stsb_dev"]:
            best = dict(history[-1])
            utils.atomic_torch_save(model.state_dict(), run.dir / "best_model.pt")
        stopped_early = 0 < args.patience <= sum(r["step"] > best["step"] for r in history)
        run.log(step, "stsb_dev", epoch=step / max(steps_per_epoch, 1), **res, lr=sched.get_last_lr()[0], **train_log)
        tqdm.write(f"step {step:6d}  STS-B dev {res['stsb_dev']:6.2f}  best {best['stsb_dev']:6.2f} (step "
                   f"{best['step']})" + "".join(f"  {k} {v:.4f}" for k, v in train_log.items()))
        run.save(step=step, history=history, best=best, train_s=train_time, samples=samples,
                 stopped_early=stopped_early)

    with run:
        for epoch in range(step // max(steps_per_epoch, 1), 0 if args.eval_only or stopped_early else args.epochs):
            order = epoch_order([len(x) for x in sentences], args.batch_size, args.seed, epoch)  # characters
            first = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       dynamic_ncols=True, disable=None)
            for b in bar:
                t0 = time.time()
                idx = order[b * args.batch_size: (b + 1) * args.batch_size]
                batch = tokenize_batch(tokenizer, [sentences[i] for i in idx], args.max_length, device)
                with utils.autocast(device, amp_dtype):
                    loss, terms = uscal_step(model, batch, args)  # = simcse_step when alpha is 0
                finite = run.finite(loss, step, terms)  # else (--skip-nonfinite): no backward pass, no update
                if finite:
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if args.max_grad_norm > 0:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    scaler.step(opt)
                    scaler.update()
                sched.step()  # also after a skipped step: the schedule moves on with the data
                step += 1
                samples += len(idx)
                train_time += time.time() - t0
                if finite:
                    run.add({k: v.item() for k, v in {"loss": loss, **terms}.items()})
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % args.eval_every == 0:  # also when interrupted: it is due at this step
                    evaluate_and_checkpoint()
                if run.stopped or stopped_early or (args.max_steps and step >= args.max_steps):
                    break
            if run.stopped:  # checkpoint this step (the data order is a function of the epoch: it resumes mid-epoch)
                run.save(step=step, history=history, best=best, train_s=train_time, samples=samples,
                         stopped_early=stopped_early)
                run.interrupt(f"at step {step}")
            if stopped_early or (args.max_steps and step >= args.max_steps):
                break
        if not history or history[-1]["step"] != step:  # the end of training (or, with --eval-only, the start)
            evaluate_and_checkpoint()

    # ---- the best checkpoint (selected on STS-B dev): export it, reload it, test it
    test, final = export_and_test(model, tokenizer, run.dir, test_sets, history, best, args, device, amp_dtype)
    summary = run.finish({
        "script": "uscal.py", "method": method_name(args), "dataset": "sts", "train_data": args.train_data,
        "setting": setting_name(args), "seed": args.seed, "model": args.model, "primary_metric": "spearman_avg",
        "final": final, "best": {**best, **test}, "n_train": len(sentences), "steps": step,
        "evaluations": len(history), "samples_per_s": round(samples / max(train_time, 1e-9), 2) if samples else None,
        "stopped_early": stopped_early, "selected_on": SELECTED_ON,
        "n_excluded_eval_sentences": (data_record["train"] or {}).get("n_excluded")})
    print("test (best checkpoint, step %d): " % best["step"]
          + "  ".join(f"{k} {test[k]:.2f}" for k in (*TEST_SETS, "spearman_avg")) + f"  ->  {run.dir}/summary.json")
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
