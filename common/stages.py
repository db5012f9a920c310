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
def predict(net: Net, pairs: list[tuple[str, str]], batch_size: int) -> torch.Tensor:
    """Class probabilities [N, C] (eval mode, batches sorted by length), on the CPU."""
    model = net.model
    was_training = model.training
    model.eval()
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
