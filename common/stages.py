"""The plumbing of a run in stages (conlst.py): what a checkpoint holds besides the weights
(`Progress`), the training step, evaluation records, the hand-off of a stage's best model to the
next stage, and the per-language summary. Each function takes the `common.run.Run`, the `Net`
(model and its run-time settings) and the `Progress`; none draws random numbers.

    prog = Progress(**checkpoint_fields(ckpt)) if ckpt else Progress()
    loss = train_step(run, net, prog, opt, sched, step_fn, batch, n_samples)  # forward, check, backward, update
    record(run, net, prog, evaluate(...), stage, lang, epoch)                 # metrics line, history, best
    save(run, prog, opt, sched); check_stop(run, prog, opt, sched)            # checkpoint; Ctrl-C
    best = finish_stage(run, net, prog, path, con_dim=...)                    # hand on the best weights
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common import utils
from common.diagnostics import analysis_only_confidence_bins
from common.run import Run
from common.text_data import Example, XnliData, load_pool_gold_labels_for_analysis_only, tokenize_pairs
from common.text_models import load_trainable, save_trainable
from common.utils import MissingError, UsageError

HANDOFF = "a stage hand-off file of this run"


@dataclass
class Progress:
    """What a checkpoint holds besides the weights and random generators (run.save adds those):
    the position in the plan, the running stage's own state, the counters and the evaluations."""

    plan_pos: int = 0
    item: dict = field(default_factory=dict)  # the running stage's epoch, batch, pseudo-labels, best record, ...
    step: int = 0
    samples: int = 0
    train_s: float = 0.0  # seconds inside training steps (forward, backward, update)
    history: list = field(default_factory=list)  # one record per evaluation
    results: dict = field(default_factory=dict)  # per language: bins, stage-2 statistics


CHECKPOINT_KEYS = ("model", "scaler", "rng", "step", "plan_pos", "item", "history", "results", "samples", "train_s",
                   "wall_s")  # what a checkpoint must hold for --resume


def checkpoint_fields(ckpt: dict) -> dict:
    """The Progress fields of a checkpoint."""
    return {f.name: ckpt[f.name] for f in fields(Progress)}


@dataclass
class Net:
    """The model and what the batch builders, the steps and the predictions need around it."""

    model: nn.Module
    tok: Any
    prefix: str  # before each premise ("query: " for e5-small)
    max_length: int
    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: Any = None  # torch.amp.GradScaler


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def to_device(enc: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in enc.items()}


@torch.no_grad()
def predict(net: Net, pairs: list[tuple[str, str]], batch_size: int, dropout: bool = False) -> torch.Tensor:
    """Class probabilities [N, C] (eval mode, or train mode with `dropout`; batches sorted by length), on the CPU."""
    model = net.model
    was_training = model.training
    model.train(dropout)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = torch.zeros(len(pairs), model.classifier.out_features)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = to_device(tokenize_pairs(net.tok, [pairs[i] for i in idx], net.prefix, net.max_length), net.device)
        with utils.autocast(net.device, net.amp_dtype):
            logits = model(enc)
        out[idx] = logits.float().softmax(1).cpu()
    model.train(was_training)
    return out


def prior_corrected(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """p_ic * w_c / sum_k p_ik * w_k: class probabilities under another class prior (weights: the ratio
    of the new prior to the old one)."""
    scaled = probs * weights
    return scaled / scaled.sum(1, keepdim=True)


def balanced_prior_weights(probs: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Ours, not a paper's (conlst.py --prior-correction): class weights w (summing to 1) with which the
    corrected probabilities (prior_corrected) average to the uniform distribution over `probs`' rows
    (unlabeled target samples; a known balanced target prior, as XNLI's), by fixed-point iteration
    w_c <- w_c / (C * mean_i p'_ic). Reads no label."""
    c = probs.shape[1]
    w = torch.full((c,), 1.0 / c)
    for _ in range(iters):
        w = w / (c * prior_corrected(probs, w).mean(0))
        w = w / w.sum()
    return w


def class_fractions(probs: torch.Tensor) -> list[float]:
    """The fraction of rows predicted as each class (argmax)."""
    return (torch.bincount(probs.argmax(1), minlength=probs.shape[1]).float() / max(len(probs), 1)).tolist()


def accuracy(probs: torch.Tensor, examples: list[Example]) -> float:
    gold = torch.tensor([e.label for e in examples])
    return 100.0 * (probs.argmax(1) == gold).float().mean().item()


def save(run: Run, prog: Progress, opt=None, sched=None) -> None:
    """checkpoint.pt: everything to continue from this point (the running stage's optimizer and schedule too)."""
    run.save(optimizer=opt.state_dict() if opt else None, scheduler=sched.state_dict() if sched else None, **vars(prog))


def check_stop(run: Run, prog: Progress, opt=None, sched=None) -> None:
    """After each step: on Ctrl-C / SIGTERM, checkpoint here (prog.item says which batch comes
    next), say how to continue, exit 130."""
    if run.stopped:
        save(run, prog, opt, sched)
        run.interrupt(f"at step {prog.step}")


def train_step(run: Run, net: Net, prog: Progress, opt, sched, step_fn: Callable, batch: dict, n_samples: int) -> float:
    """Forward (autocast), loss check, backward, clip, optimizer step; returns the loss."""
    t0 = time.time()
    with utils.autocast(net.device, net.amp_dtype):
        loss, terms = step_fn(net.model, batch, run.args)
    finite = run.finite(loss, prog.step, terms)  # --skip-nonfinite: no backward, no update (the schedule moves on)
    if finite:
        opt.zero_grad(set_to_none=True)
        net.scaler.scale(loss).backward()
        if run.args.max_grad_norm > 0:
            net.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trainable(net.model), run.args.max_grad_norm)
        net.scaler.step(opt)
        net.scaler.update()
    if sched is not None:
        sched.step()
    prog.step += 1
    prog.samples += n_samples
    prog.train_s += time.time() - t0
    value = loss.item()
    if finite:
        run.add({**terms, "loss": value})
    return value


def record(run: Run, net: Net, prog: Progress, evaluated: tuple[dict, Any], stage: int, lang: str | None,
           epoch: float, extra: dict | None = None, keep: bool = True):
    """Write one metrics line of an evaluation's (metrics, probs), append it to the history and (keep)
    track the stage's best English-dev evaluation (ties: the later one) and its weights; returns
    (record, probs)."""
    res, probs = evaluated
    rec = {"step": prog.step, "stage": stage, "lang": lang, "epoch": epoch, **res, **run.means(), **(extra or {})}
    run.log(prog.step, "eval", epoch=epoch, **{k: v for k, v in rec.items() if k not in ("step", "epoch")})
    prog.history.append(rec)
    tqdm.write(f"[stage {stage}{' ' + lang if lang else ''}] step {prog.step}  "
               + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                           if k not in ("step", "stage", "lang")))
    item, best = prog.item, prog.item.get("best")
    if keep and (run.args.handoff == "last" or best is None or rec["en_dev_acc"] >= best["en_dev_acc"]):
        item["best"], item["best_probs"] = rec, probs
        if run.args.handoff == "best":
            save_trainable(run.dir / "best_in_stage.pt", net.model, {"record": rec})
    return rec, probs


def finish_stage(run: Run, net: Net, prog: Progress, path: Path | None, **meta: Any) -> dict:
    """Every stage hands on its best-English-dev weights (--handoff last: its last ones): put them
    in the model and, unless None, in `path` (with the model, pooling, prefix, seed and `meta`)."""
    args, best = run.args, prog.item.get("best")
    if args.handoff == "best" and best is not None and best["step"] != prog.step:
        load_trainable(run.dir / "best_in_stage.pt", net.model, HANDOFF)
    if path is not None:
        save_trainable(path, net.model, {"record": best, "model": args.model, "pooling": net.model.pooling,
                                         "prefix": net.prefix, "seed": args.seed, **meta})
    return best or {}


def diagnose(run: Run, net: Net, data: XnliData, prog: Progress, lang: str, point: str,
             eval_probs: torch.Tensor | None) -> None:
    """Confidence bins of the current model at `point`: on the pool when its gold labels exist,
    else on the evaluation set (whose probabilities the last evaluation computed)."""
    res, target = prog.results.setdefault(lang, {}), data.targets[lang]
    gold = load_pool_gold_labels_for_analysis_only(run.args, lang)
    if gold is not None:
        probs, on = predict(net, target.pool, run.args.eval_batch_size), "pool"
    else:
        probs = eval_probs if eval_probs is not None else predict(net, [(e.text_a, e.text_b) for e in target.eval],
                                                                  run.args.eval_batch_size)
        gold, on = torch.tensor([e.label for e in target.eval]), "eval"
    res.setdefault("bins", {})[point] = analysis_only_confidence_bins(probs, gold)
    res["bins_on"] = on


def handoff_file(flag: str, given: str, name: str, seed: int, **expected: Any) -> Path:
    """A hand-off file to reuse (`flag` = `given`: a run directory holding `name`, or the file), checked
    against the `expected` meta values; a different seed is only noted."""
    path = Path(given)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise MissingError(f"{flag} {given}: no {name} there (train that stage once with this script; its run "
                           f"directory holds {name})")
    meta = torch.load(path, map_location="cpu", weights_only=False).get("meta", {})
    for key, mine in expected.items():
        if meta.get(key) != mine:
            raise UsageError(f"{flag} {given}: trained with {key} {meta.get(key)}, this run uses {mine}")
    if meta.get("seed") != seed:
        print(f"note: {flag} was trained with seed {meta.get('seed')}, this run uses seed {seed}")
    return path


# ---- evaluation on XNLI: English dev (model selection) and a target language's evaluation set --------------
def evaluate(net: Net, data: XnliData, args: Any, lang: str | None,
             en_dev_acc: float | None = None) -> tuple[dict, torch.Tensor | None]:
    """English-dev accuracy (model selection; `en_dev_acc` when already known) and, for a
    language, its evaluation accuracy. Returns (metrics, the evaluation set's probabilities or None)."""
    out: dict[str, float] = {} if en_dev_acc is None else {"en_dev_acc": en_dev_acc}
    probs = None
    if lang is not None:
        target = data.targets[lang]
        probs = predict(net, [(e.text_a, e.text_b) for e in target.eval], args.eval_batch_size)
        out["acc"] = accuracy(probs, target.eval)
    if "en_dev_acc" not in out:
        out["en_dev_acc"] = accuracy(predict(net, [(e.text_a, e.text_b) for e in data.select], args.eval_batch_size),
                                     data.select)
    return out, probs


def record_eval(run: Run, net: Net, data: XnliData, prog: Progress, stage: int, lang: str | None, epoch: float,
                extra: dict | None = None, en_dev_acc: float | None = None, keep: bool = True):
    """Evaluate and record it (record: metrics line, history, the stage's best); (record, probs)."""
    evaluated = evaluate(net, data, run.args, lang, en_dev_acc)
    return record(run, net, prog, evaluated, stage, lang, epoch, extra, keep)


def prior_correction_record(net: Net, target: Any, eval_probs: torch.Tensor, batch_size: int) -> dict:
    """Ours (conlst.py --prior-correction): the weights of balanced_prior_weights from the model's
    predictions on the unlabeled pool, and the evaluation set's accuracy and class fractions under them."""
    w = balanced_prior_weights(predict(net, target.pool, batch_size))
    fixed = prior_corrected(eval_probs, w)
    return {"weights": w.tolist(), "acc_prior": accuracy(fixed, target.eval), "pred_frac": class_fractions(fixed)}


# ---- bookkeeping of conlst.py's stages 1 and 2 ---------------------------------------------------------------
def distance_scale(run: Run) -> dict:
    """d2_neg for the next stage-1 evaluation record: the mean squared anchor-negative distance over
    the valid pairs of the steps since the last record (conlst.conl_step logs their sum and count)."""
    n = run.sums.get("n_neg", 0.0)
    return {"d2_neg": run.sums["d2_neg_sum"] / n} if n else {}


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def flexmatch_record(memory: torch.Tensor, thresholds: torch.Tensor, num_classes: int,
                     labels: torch.Tensor | None = None) -> dict:
    """conlst.py's FlexMatch state: the thresholds, the memory's classes and the samples never confident,
    and (`labels`) a step's selected pseudo-labels per class; what metrics.jsonl and summary.json record."""
    out = {"thresholds": [round(x, 4) for x in thresholds.tolist()],
           "memory_per_class": class_counts(memory[memory >= 0], num_classes), "memory_unused": int((memory < 0).sum())}
    return out if labels is None else {**out, "selected_per_class": class_counts(labels, num_classes)}


def confident_pool_record(where: str, n_pool: int, labels: torch.Tensor, num_classes: int, gamma: float,
                          warn: bool = True) -> dict:
    """conlst.py's stage-1 high-confidence pool (the pseudo-labels `labels` of the pool samples with max q
    >= gamma): its size and classes; with `warn`, a line on stderr when it holds fewer than two classes
    (then most anchors have no negative of their complementary class and L_CL is 0 for them)."""
    out = {"pool": n_pool, "high_conf": len(labels), "high_conf_per_class": class_counts(labels, num_classes),
           "high_conf_classes": len(labels.unique())}
    if warn and out["high_conf_classes"] < 2:
        print(f"warning: {where}: the confident pool (max q >= gamma {gamma}) has {out['high_conf_classes']} "
              f"class(es), {out['high_conf_per_class']}: anchors whose complementary label is another class get no "
              "negative (no_neg_frac), where L_CL is 0", file=sys.stderr)
    return out


def tally_step(tally: dict | None, target: Any, n_seen: int, rows: list[int], labels: torch.Tensor, kinds: list[str],
               num_classes: int) -> dict:
    """Add one stage-2 step (`n_seen` pool pairs, the selected `rows` with pseudo-labels `labels` and
    view kinds `kinds`) to its iteration's counts (summary.json's stage2_iterations)."""
    from common.back_translate import bt_pair

    t = tally or {"n_seen": 0, "n_selected": 0, "selected_per_class": [0] * num_classes,
                  "views": {"bt": 0, "mask": 0, "mixup": 0}, "bt_available": 0}
    t["n_seen"] += n_seen
    t["n_selected"] += len(rows)
    t["selected_per_class"] = [a + b for a, b in zip(t["selected_per_class"], class_counts(labels, num_classes))]
    for k in kinds:
        t["views"][k] += 1
    t["bt_available"] += sum(bt_pair(target.bt, target.pool[i]) is not None for i in rows) if target.bt else 0
    return t


# ---- the summary: per language, and the average over the languages -----------------------------------------
def language_summary(handoff: str, prog: Progress, lang: str) -> dict:
    """Per language: the zero-shot (stage-0) result, each stage's hand-off evaluation, the final
    (last) evaluation, and 'best' = the best-English-dev evaluation of the last stage run."""
    recs = [r for r in prog.history if r["lang"] == lang]
    if not recs:
        return {}
    keep = ("acc", "en_dev_acc", "step")
    out: dict[str, Any] = {"stage0": {k: recs[0][k] for k in keep}}
    last_stage = max(r["stage"] for r in recs)
    for s in (1, 2):
        in_stage = [r for r in recs if r["stage"] == s]
        if in_stage:
            pick = max(in_stage, key=lambda r: (r["en_dev_acc"], r["step"])) if handoff == "best" else in_stage[-1]
            out[f"stage{s}"] = {k: pick[k] for k in keep}
    final_stage = [r for r in recs if r["stage"] == last_stage]
    out["final"] = {k: recs[-1][k] for k in keep}
    out["best"] = {k: max(final_stage, key=lambda r: (r["en_dev_acc"], r["step"]))[k] for k in keep}
    out.update(prog.results.get(lang, {}))
    return out


def staged_summary(head: dict, handoff: str, prog: Progress, langs: list[str], stage0_path: Path) -> dict:
    """summary.json of a staged run: `head` (script, method, setting, protocol, ...), then the
    averages over the languages (of the final, best and per-stage evaluations) and each language's."""
    per_lang = {lang: language_summary(handoff, prog, lang) for lang in langs}
    done = [lang for lang in langs if per_lang[lang]]

    def mean_of(key: str, metric: str = "acc") -> float | None:
        vals = [per_lang[lang][key][metric] for lang in done if key in per_lang[lang]]
        return float(np.mean(vals)) if vals and len(vals) == len(done) else None

    s0 = [r for r in prog.history if r["stage"] == 0 and r["lang"] is None]
    return {
        **head,
        "final": {"acc": mean_of("final"), "en_dev_acc": mean_of("final", "en_dev_acc"), "step": prog.step},
        "best": {"acc": mean_of("best"), "en_dev_acc": mean_of("best", "en_dev_acc"),
                 "step": per_lang[done[-1]]["best"]["step"] if done else None,
                 "steps": {lang: per_lang[lang]["best"]["step"] for lang in done}},
        "avg": {k: mean_of(k) for k in ("stage0", "stage1", "stage2", "final", "best")},
        "per_lang": per_lang,
        "stage0": {"path": str(stage0_path), "evals": [{k: r[k] for k in ("step", "epoch", "en_dev_acc")} for r in s0]},
        "steps": prog.step, "samples_per_s": round(prog.samples / max(prog.train_s, 1e-9), 2),
    }  # run.finish / run.write_summary add wall_s and skipped_nonfinite_steps


def print_table(summary: dict, stages: list[int], run_dir: Path) -> None:
    """The end-of-run table: per language the zero-shot, each stage's and the best accuracy."""
    print("lang   zero-shot  " + "  ".join(f"stage{s}" for s in stages) + "   best(en-dev sel.)")
    for lang in summary["langs"]:
        r = summary["per_lang"][lang]
        cols = "  ".join(f"{r[f'stage{s}']['acc']:6.2f}" for s in stages)
        print(f"{lang:5s}  {r['stage0']['acc']:8.2f}  {cols}   {r['best']['acc']:6.2f}")
    print(f"done: average best {summary['best']['acc']:.2f}  ->  {run_dir}/summary.json")
