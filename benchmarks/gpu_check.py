"""GPU check: every script's paper-scale training path on CUDA under bf16 autocast, on fake data.

No line of the CUDA / AMP paths had run before this check (issue 24). For each method it builds
the paper's architecture with random weights (transformers from configs written here: no download;
the GPU machine has no network), wraps it with the script's own model class, and runs the script's
own step functions for --steps optimizer steps on fake data of the paper's batch shape:

  lacol   ResNet-34 (CIFAR stem) + heads (lacol.LaCoLNet); batch 128 of 32x32 uint8 images, three
          views; lacol.epoch_selection (Eq. 3 over a fake training set), then lacol.ce_step (the
          warm-up, step 0) and lacol.lacol_step (Eq. 8); SGD, channels-last on CUDA as lacol.main
  scal    bert-base-uncased sizes, scal.SCALModel, scal.scal_step; batch 32 x 128 tokens (pairs)
  uscal   bert-base-uncased sizes, uscal.SimCSEModel, uscal.uscal_step; batch 64 x 32 tokens
  conlst  mBERT sizes, conlst.CoNLSTModel (pooler); the first half of the steps stage 1
          (conlst.conl_step: 32 anchors, K=8 negatives each, 32 source pairs), the second half
          stage 2 (conlst.st_step: 32 masked / mixup views + 32 source pairs); common.stages.train_step
  msmo    mBERT sizes, msmo.Tagger + msmo.Critic, msmo.msmo_step with the two-step schedule (the
          first half adversarial with 10 / 5 critic updates per step, the second half aspect-level
          consistency with 16 aligned pairs); batch 16 x <= 128 tokens

`--text-model NAME` swaps the text encoder (bert-base-uncased, bert-large-uncased,
bert-base-multilingual-cased, roberta-base, roberta-large, xlm-roberta-base, xlm-roberta-large; the
scripts' presets), e.g. `--only msmo conlst --text-model xlm-roberta-base`.

Per method it checks:
  finite_loss       every loss is finite (the scripts' utils.check_finite runs in every step)
  autocast_dtype    every nn.Linear / nn.Conv2d output during training has the autocast dtype
                    (forward hooks): no silent fp32 fallback. The dtypes of functional matmuls
                    (matmul, einsum, bmm, attention, ...) in one step are recorded too, for
                    information only (some are fp32 on purpose, outside autocast)
  params_fp32       the weights stay fp32 (autocast, not a model cast)
  channels_last     lacol on CUDA: every input batch, the first conv weight and every conv output
                    are channels-last (as lacol.main sets it up); None (not applicable) elsewhere
  resume_state      a checkpoint saved on the device (utils.save_checkpoint: model, optimizers,
                    schedulers, scaler, RNG) and loaded into a fresh model and optimizers
                    (utils.load_checkpoint maps to the CPU, as the scripts do) gives state tensors
                    equal to the original ones and on the same device
  resume_loss       two more steps from the restored RNG state give the same losses on the resumed
                    copy as on the original (relative tolerance 1e-3)
and prints samples per second (after --steps // 2, at most 3, warm-up steps) and the peak CUDA memory
of the training loop ('n/a' on CPU). The last line is PASS or FAIL; the exit code is 0 only if every
method passed. A JSON summary (device, versions, per-method results) goes to --out.

On a GPU machine (nothing is downloaded; all five should take one to three minutes on one H200, an
estimate: this script has not run on a GPU yet):

    python -m benchmarks.gpu_check                          # bf16, 30 steps each, all five methods
    python -m benchmarks.gpu_check --only lacol scal --steps 50
    python -m benchmarks.gpu_check --precision fp16         # fp16 + GradScaler (older GPUs)

On a CPU (tiny configs: 2-layer BERT / XLM-R with hidden 32, ResNet-34 on 8x8 images, batch 4,
2 steps; the channels-last check does not apply, as the scripts use it on CUDA only):

    python -m benchmarks.gpu_check --tiny                   # bf16 autocast on the CPU
    python -m benchmarks.gpu_check --tiny --precision fp32
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from common import utils

METHODS = ("lacol", "scal", "uscal", "conlst", "msmo")
DEFAULT_OUT = "benchmarks/results/gpu/gpu_check.json"
DEFAULT_OUT_TINY = "runs/gpu_check/gpu_check_tiny.json"  # a CPU smoke run does not overwrite the GPU results
RESUME_RTOL = 1e-3


@dataclass
class Cfg:
    device: torch.device
    amp_dtype: torch.dtype | None
    use_scaler: bool
    steps: int
    tiny: bool
    seed: int
    text_model: str | None


# ------------------------------------------------------------------------------------------
# Text encoders from configs (random weights) and fake token batches
# ------------------------------------------------------------------------------------------
#: name -> (family, vocabulary size, size). Family bert: [CLS]=101 [SEP]=102 [PAD]=0 [MASK]=103 and
#: token types; roberta / xlmr: <s>=0 </s>=2 <pad>=1, <mask> the last id, no token types.
ENCODERS = {
    "bert-base-uncased": ("bert", 30522, "base"),
    "bert-large-uncased": ("bert", 30522, "large"),
    "bert-base-multilingual-cased": ("bert", 119547, "base"),
    "roberta-base": ("roberta", 50265, "base"),
    "roberta-large": ("roberta", 50265, "large"),
    "xlm-roberta-base": ("xlmr", 250002, "base"),
    "xlm-roberta-large": ("xlmr", 250002, "large"),
}
SIZES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
         "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
         "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)}
TINY_VOCAB = 1000


def make_encoder(name: str, tiny: bool) -> nn.Module:
    """The bare encoder AutoModel.from_pretrained(name) would give (BertModel with its pooler,
    RobertaModel, XLMRobertaModel), with random weights; --tiny: the same family, 2 layers, hidden 32."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

    if name not in ENCODERS:
        raise utils.UsageError(f"--text-model {name}: allowed are {', '.join(ENCODERS)} (built from a config, "
                               "random weights)")
    family, vocab, size = ENCODERS[name]
    kw = dict(SIZES["tiny" if tiny else size], vocab_size=TINY_VOCAB if tiny else vocab)
    if family == "bert":
        return BertModel(BertConfig(max_position_embeddings=64 if tiny else 512, **kw))
    kw.update(max_position_embeddings=(64 if tiny else 512) + 2, type_vocab_size=1, layer_norm_eps=1e-5,
              pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "roberta":
        return RobertaModel(RobertaConfig(**kw))
    return XLMRobertaModel(XLMRobertaConfig(**kw))


def special_ids(name: str, tiny: bool) -> dict[str, int]:
    family, vocab, _ = ENCODERS[name]
    vocab = TINY_VOCAB if tiny else vocab
    if family == "bert":
        return {"cls": 101, "sep": 102, "pad": 0, "mask": 103, "vocab": vocab}
    return {"cls": 0, "sep": 2, "pad": 1, "mask": vocab - 1, "vocab": vocab}


def fake_rows(n: int, max_len: int, ids: dict[str, int], gen: torch.Generator) -> list[list[int]]:
    """n token-id rows `[CLS] w ... w [SEP]` of lengths spread between max_len / 2 and max_len (the
    longest is max_len, so batches are padded as the scripts pad them)."""
    lengths = torch.linspace(max(4, max_len // 2), max_len, n).round().long()[torch.randperm(n, generator=gen)]
    lengths[0] = max_len
    return [[ids["cls"]] + torch.randint(200, ids["vocab"] - 1, (int(t) - 2,), generator=gen).tolist() + [ids["sep"]]
            for t in lengths]


def fake_text_batch(name: str, tiny: bool, n: int, max_len: int, gen: torch.Generator, pairs: bool) -> dict:
    """A padded batch like the scripts' tokenizers give: input_ids, attention_mask and, for BERT,
    token_type_ids (1 on the second half of each row when `pairs`). On the CPU."""
    ids = special_ids(name, tiny)
    rows = fake_rows(n, max_len, ids, gen)
    t = max(len(r) for r in rows)
    input_ids = torch.full((n, t), ids["pad"], dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    types = torch.zeros((n, t), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        if pairs:
            types[i, len(r) // 2: len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if ENCODERS[name][0] == "bert":
        batch["token_type_ids"] = types
    return batch


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def optimizer_step(parts: dict, loss: torch.Tensor, max_grad_norm: float, params: list | None = None) -> None:
    """Backward and update as the scripts' loops do: GradScaler (a no-op in bf16), unscale, clip,
    step, update, scheduler step."""
    opt, scaler = parts["optimizer"], parts["scaler"]
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if max_grad_norm > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params if params is not None else parts["model"].parameters(), max_grad_norm)
    scaler.step(opt)
    scaler.update()
    if parts.get("scheduler") is not None:
        parts["scheduler"].step()


# ------------------------------------------------------------------------------------------
# The harness: train, record dtypes and layout, time, checkpoint and resume
# ------------------------------------------------------------------------------------------
class FunctionalDtypes(TorchFunctionMode):
    """Counts the output dtype of the matmul-like torch functions called (forward only)."""

    NAMES = {"linear", "conv2d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum",
             "scaled_dot_product_attention"}

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in self.NAMES and isinstance(out, torch.Tensor):
            self.counts[name][dtype_name(out.dtype)] += 1
        return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def state_mismatches(a: Any, b: Any, path: str) -> list[str]:
    """Where two (nested) state dicts differ: a tensor's device, dtype, shape or values, or a value."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return [f"{path}: tensor vs {type(b).__name__}"]
        if a.device != b.device:
            return [f"{path}: device {a.device} vs {b.device}"]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return [f"{path}: values differ"]
        return []
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{path}: keys differ"]
        return [m for k in a for m in state_mismatches(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [m for i, (x, y) in enumerate(zip(a, b)) for m in state_mismatches(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exercise(cfg: Cfg, build: Callable[[], dict], step: Callable[[dict, int], tuple], first: dict | None = None,
             layout: Callable[[dict], dict] | None = None) -> dict:
    """Run `step(parts, i) -> (loss, kind, samples)` for cfg.steps steps on `first` (or build()), with
    dtype hooks on every Linear / Conv2d, then checkpoint, resume into a fresh build() and compare.
    `parts` maps names to the model(s), optimizers, schedulers and scaler (everything with a
    state_dict goes into the checkpoint). `layout(parts)` returns extra boolean checks (channels-last)."""
    dev = cfg.device
    parts = first if first is not None else build()
    modules = [p for p in parts.values() if isinstance(p, nn.Module)]
    out_dtypes: Counter = Counter()
    conv_cl: Counter = Counter()

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            out_dtypes[dtype_name(out.dtype)] += 1
            if isinstance(mod, nn.Conv2d) and out.dim() == 4:
                conv_cl[out.is_contiguous(memory_format=torch.channels_last)] += 1

    handles = [m.register_forward_hook(hook) for p in modules for m in p.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    warm, probe_at = min(3, cfg.steps // 2), min(1, cfg.steps - 1)
    losses, timed = [], defaultdict(lambda: [0.0, 0])  # kind -> [seconds, samples]
    functional = FunctionalDtypes()
    for i in range(cfg.steps):
        sync(dev)
        t0 = time.perf_counter()
        if i == probe_at:
            with functional:
                loss, kind, n = step(parts, i)
        else:
            loss, kind, n = step(parts, i)
        losses.append(float(loss))
        sync(dev)
        if i >= warm:
            timed[kind][0] += time.perf_counter() - t0
            timed[kind][1] += n
    for h in handles:
        h.remove()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    seconds, samples = sum(v[0] for v in timed.values()), sum(v[1] for v in timed.values())

    expected = dtype_name(cfg.amp_dtype or torch.float32)
    checks: dict[str, bool | None] = {
        "finite_loss": all(math.isfinite(x) for x in losses),
        "autocast_dtype": bool(out_dtypes) and set(out_dtypes) == {expected},
        "params_fp32": all(p.dtype == torch.float32 for m in modules for p in m.parameters()),
        "channels_last": None,
    }
    if layout is not None:
        found = layout(parts)
        if found:
            checks["channels_last"] = all(found.values()) and conv_cl[False] == 0 and conv_cl[True] > 0

    # ---- checkpoint on the device, resume into fresh objects, compare states and the next two losses
    with tempfile.TemporaryDirectory() as tmp:
        saved = {k: v.state_dict() for k, v in parts.items() if hasattr(v, "state_dict")}
        utils.save_checkpoint(Path(tmp), {**saved, "rng": utils.rng_state()})
        ckpt = utils.load_checkpoint(tmp)
    del saved
    fresh = build()
    for k in ckpt:
        if k != "rng":
            fresh[k].load_state_dict(ckpt[k])
    mismatches = [m for k in ckpt if k != "rng"
                  for m in state_mismatches(parts[k].state_dict(), fresh[k].state_dict(), k)]
    mismatches += [f"{n}: on {p.device}" for m in fresh.values() if isinstance(m, nn.Module)
                   for n, p in m.named_parameters() if p.device.type != dev.type]
    if layout is not None and layout(fresh) and not all(layout(fresh).values()):
        mismatches.append("the resumed model is not channels-last")
    utils.set_rng_state(ckpt["rng"])
    continued = [float(step(parts, cfg.steps + j)[0]) for j in range(2)]
    utils.set_rng_state(ckpt["rng"])
    resumed = [float(step(fresh, cfg.steps + j)[0]) for j in range(2)]
    diff = max(abs(a - b) for a, b in zip(continued, resumed))
    checks["resume_state"] = not mismatches
    checks["resume_loss"] = all(abs(a - b) <= RESUME_RTOL * max(1.0, abs(a)) for a, b in zip(continued, resumed))
    del fresh, ckpt
    return {
        "checks": checks, "losses": losses, "first_loss": losses[0], "final_loss": losses[-1],
        "samples_per_s": samples / seconds if seconds > 0 else None,
        "samples_per_s_by_step": {k: v[1] / v[0] for k, v in timed.items() if v[0] > 0},
        "timed_steps": cfg.steps - warm, "peak_memory_bytes": peak,
        "layer_output_dtypes": dict(out_dtypes), "conv_outputs_channels_last": {str(k): v for k, v in conv_cl.items()},
        "functional_op_dtypes": {k: dict(v) for k, v in functional.counts.items()},
        "resume": {"continued": continued, "resumed": resumed, "max_abs_diff": diff,
                   "state_mismatches": mismatches[:5]},
    }


# ------------------------------------------------------------------------------------------
# One function per method: model, fake data, the script's step
# ------------------------------------------------------------------------------------------
def check_lacol(cfg: Cfg) -> dict:
    """ResNet-34 LaCoL (CIFAR-10 defaults of lacol.Args): epoch selection, CE warm-up step, LaCoL steps."""
    import lacol
    from common import data as image_data
    from common.models import build_backbone

    dev, amp, cuda = cfg.device, cfg.amp_dtype, cfg.device.type == "cuda"
    a = lacol.Args(num_workers=0)
    size, b = (8, 4) if cfg.tiny else (32, a.batch_size)
    a.k_neg = min(a.k_neg, b - 1)
    n, num_classes = 4 * b, 10
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    noisy = torch.randint(0, num_classes, (n,), generator=gen)
    # three views per sample (weak, strong, strong'): random pixels, on the device (the augmentation
    # pipeline is not what is checked here; benchmarks/speed.py times it)
    views = torch.randint(0, 256, (3, n, 3, size, size), dtype=torch.uint8, generator=gen).to(dev)
    noisy_dev = noisy.to(dev)
    inputs_cl: list[bool] = []

    def build() -> dict:
        backbone = build_backbone(a.backbone, 3, image_data.MEAN_STD[a.dataset], a.pretrained, a.cnn_width)
        model = lacol.LaCoLNet(backbone, num_classes, a.proj_dim).to(dev)
        if cuda:  # as lacol.main
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
        return {"model": model, "optimizer": opt,
                "scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, milestones=a.milestones, gamma=a.lr_gamma),
                "scaler": torch.amp.GradScaler(dev.type, enabled=cfg.use_scaler)}

    parts = build()
    # Algorithm 1, line 4 (the default --selection epoch) and the test-set evaluation, on the fake images
    weak, strong, test_view = lacol.make_views(a.dataset, size, a.randaug_ops, a.randaug_magnitude)
    select_ds = image_data.NoisyImages(images, noisy, (weak, strong), n_views=1)
    loader = image_data.epoch_loader(select_ds, a.batch_size, False, a.seed, 0, a.num_workers, dev)
    sel, _ = lacol.epoch_selection(parts["model"], loader, noisy, None, dev, amp)
    weights = lacol.class_weights_eq4(noisy[sel], num_classes, a.class_weight).to(dev)
    eval_ds = image_data.NoisyImages(images, noisy, test_view=test_view)
    acc = lacol.evaluate(parts["model"], torch.utils.data.DataLoader(eval_ds, batch_size=512), dev, amp)["acc"]
    sel_dev = sel.to(dev)

    def step(p: dict, i: int):
        idx = torch.arange((i % 4) * b, (i % 4 + 1) * b, device=dev)
        y = noisy_dev[idx]
        warmup = i == 0  # LaCoL's warm-up (plain CE on the weak view) at step 0, the LaCoL objective after
        x = views[0, idx] if warmup else torch.cat([views[0, idx], views[1, idx], views[2, idx]])
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            inputs_cl.append(x.is_contiguous(memory_format=torch.channels_last))
        if warmup:
            loss, terms = lacol.ce_step(p["model"], x, y, dev, amp)
        else:
            loss, terms, _ = lacol.lacol_step(p["model"], x, y, a, dev, amp, sel_dev[idx], weights)
        utils.check_finite(loss, i, terms)
        optimizer_step(p, loss, 0.0)
        return loss.detach(), "ce_step" if warmup else "lacol_step", b

    def layout(p: dict) -> dict:
        if not cuda:
            return {}  # lacol.py uses channels-last on CUDA only
        conv = next(m for m in p["model"].modules() if isinstance(m, nn.Conv2d))
        return {"inputs": bool(inputs_cl) and all(inputs_cl),
                "first_conv_weight": conv.weight.is_contiguous(memory_format=torch.channels_last)}

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as lacol.main
    try:
        res = exercise(cfg, build, step, parts, layout)
    finally:
        torch.set_float32_matmul_precision(previous)
    res["config"] = {"backbone": a.backbone, "batch_size": b, "image_size": size, "views": 3, "k_neg": a.k_neg,
                     "optimizer": f"SGD lr {a.lr} momentum {a.momentum}", "selected_frac": float(sel.float().mean()),
                     "eval_acc_untrained": acc}
    return res


def check_scal(cfg: Cfg) -> dict:
    """SCAL on BERT-base (scal.Args: RTE pairs, batch 32, 128 tokens), scal.scal_step, AdamW + warm-up."""
    import scal

    dev, amp = cfg.device, cfg.amp_dtype
    a = scal.Args()
    name = a.model = cfg.text_model or a.model
    b, t = (4, 16) if cfg.tiny else (a.batch_size, a.max_length)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = fake_text_batch(name, cfg.tiny, b, t, gen, pairs=True)
    batch["labels"] = torch.randint(0, 2, (b,), generator=gen)
    batch = to(batch, dev)

    def build() -> dict:
        model = scal.SCALModel(make_encoder(name, cfg.tiny), num_labels=2).to(dev).train()
        opt, sched = scal.make_optimizer(model, a, cfg.steps + 2)
        return {"model": model, "optimizer": opt, "scheduler": sched,
                "scaler": torch.amp.GradScaler(dev.type, enabled=cfg.use_scaler)}

    def step(p: dict, i: int):
        with utils.autocast(dev, amp):
            loss, terms = scal.scal_step(p["model"], batch, a)
        utils.check_finite(loss, i, terms)
        optimizer_step(p, loss, a.max_grad_norm)
        return loss.detach(), "scal_step", b

    res = exercise(cfg, build, step)
    res["config"] = {"model": name, "batch_size": b, "max_length": t, "attack": a.attack, "epsilon": a.epsilon}
    return res


def check_uscal(cfg: Cfg) -> dict:
    """USCAL on BERT-base (uscal.Args: batch 64, 32 tokens), uscal.uscal_step (three passes)."""
    import uscal

    dev, amp = cfg.device, cfg.amp_dtype
    a = uscal.Args()
    name = a.model = cfg.text_model or a.model
    b, t = (4, 16) if cfg.tiny else (a.batch_size, a.max_length)
    batch = to(fake_text_batch(name, cfg.tiny, b, t, torch.Generator().manual_seed(cfg.seed), pairs=False), dev)

    def build() -> dict:
        model = uscal.SimCSEModel(make_encoder(name, cfg.tiny)).to(dev).train()
        opt, sched = uscal.make_optimizer(model, a, cfg.steps + 2)
        return {"model": model, "optimizer": opt, "scheduler": sched,
                "scaler": torch.amp.GradScaler(dev.type, enabled=cfg.use_scaler)}

    def step(p: dict, i: int):
        with utils.autocast(dev, amp):
            loss, terms = uscal.uscal_step(p["model"], batch, a)
        utils.check_finite(loss, i, terms)
        optimizer_step(p, loss, a.max_grad_norm)
        return loss.detach(), "uscal_step", b

    res = exercise(cfg, build, step)
    res["config"] = {"model": name, "batch_size": b, "max_length": t, "alpha": a.alpha}
    return res


def check_conlst(cfg: Cfg) -> dict:
    """CoNLST on mBERT (conlst.Args): stage 1 (conl_step) for the first half of the steps, stage 2
    (st_step) for the second half, each through common.stages.train_step with its own Adam, as the stages do.
    The model is conlst.CoNLSTModel around an encoder built here (conlst.build_model loads from the
    hub; its pooling choice, common.text_models.resolve_pooling, is called the same way)."""
    import conlst
    from common import stages

    dev, amp = cfg.device, cfg.amp_dtype
    a = conlst.Args()
    name = a.model = cfg.text_model or a.model
    tiny = cfg.tiny
    t = 16 if tiny else a.max_length
    b1, b1s, b2, b2s = (4, 4, 4, 4) if tiny else (a.s1_batch_size, a.s1_source_batch_size, a.s2_batch_size,
                                                   a.s2_source_batch_size)
    k = min(a.k_neg, 2) if tiny else a.k_neg
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = special_ids(name, tiny)
    c = conlst.NUM_CLASSES

    # stage 1: anchors from a fake pool whose samples are all confident (classes round-robin), so every
    # anchor gets K real negatives (the costliest case, as benchmarks.speed.conlst_steps); anchors and unique
    # negatives in one padded batch, as make_conl_batch builds it
    pool_size = max(4 * b1, b1 * k + b1)
    pool = fake_text_batch(name, tiny, pool_size, t, gen, pairs=True)
    hc_idx = torch.arange(pool_size)
    probs = torch.nn.functional.one_hot(torch.arange(b1) % c, c).float()
    comp = conlst.complementary_labels_eq4(probs, a.gamma, a.comp_label)
    neg_idx, neg_valid = conlst.sample_negatives_eq5(comp, hc_idx, hc_idx % c, k, a.neg_sharing)
    uniq = torch.unique(neg_idx[neg_valid])
    neg_pos = torch.searchsorted(uniq, neg_idx).clamp(max=max(len(uniq) - 1, 0))
    rows = torch.cat([torch.arange(b1), uniq])
    src1 = fake_text_batch(name, tiny, b1s, t, gen, pairs=True)
    batch1 = {"tgt": to({kk: v[rows] for kk, v in pool.items()}, dev), "n_anchor": b1, "neg_pos": neg_pos.to(dev),
              "neg_valid": neg_valid.to(dev), "comp_mask": comp.to(dev), "src": to(src1, dev),
              "src_labels": torch.randint(0, c, (b1s,), generator=gen).to(dev)}
    # stage 2: half random-masked views, half mixup views (no back-translation), as make_st_batch builds them
    tgt2 = fake_text_batch(name, tiny, b2, t, gen, pairs=True)
    maskable = (tgt2["attention_mask"] == 1) & (tgt2["input_ids"] != ids["cls"]) & (tgt2["input_ids"] != ids["sep"])
    is_mask = torch.arange(b2) % 2 == 0
    tgt2["input_ids"] = conlst.random_token_masking(tgt2["input_ids"], maskable & is_mask[:, None], a.mask_ratio,
                                                    ids["mask"])
    src2 = fake_text_batch(name, tiny, b2s, t, gen, pairs=True)
    batch2 = {"tgt": to(tgt2, dev), "tgt_labels": torch.randint(0, c, (b2,), generator=gen).to(dev),
              "is_mixup": (~is_mask).to(dev), "partner": ((torch.arange(b2) + 1) % b2).to(dev),
              "lam": conlst.sample_mixup_lambda_eq11(b2, a.mixup_alpha).to(dev), "src": to(src2, dev),
              "src_labels": torch.randint(0, c, (b2s,), generator=gen).to(dev)}

    def build() -> dict:
        from common.text_models import resolve_pooling

        encoder = make_encoder(name, tiny)
        model = conlst.CoNLSTModel(encoder, resolve_pooling(encoder, a.pooling, name), a.con_dim, a.classifier_dropout)
        if a.freeze_embeddings:
            model.encoder.get_input_embeddings().weight.requires_grad_(False)
        model.to(dev).train()
        scaler = torch.amp.GradScaler(dev.type, enabled=cfg.use_scaler)
        # what stages.train_step reads of the run (the loss check; no bookkeeping) and of the run's progress
        run = SimpleNamespace(args=a, finite=lambda loss, step, terms: utils.check_finite(loss, step, terms),
                              add=lambda terms: None)
        net = stages.Net(model, None, "", t, dev, amp, scaler)
        return {"model": model, "scaler": scaler, "run": run, "net": net, "prog": stages.Progress(),
                "optimizer_stage1": torch.optim.Adam(stages.trainable(model), lr=a.s1_lr),
                "optimizer_stage2": torch.optim.Adam(stages.trainable(model), lr=a.s2_lr)}

    def step(p: dict, i: int):
        p["prog"].step = i
        if i < cfg.steps // 2:
            loss = stages.train_step(p["run"], p["net"], p["prog"], p["optimizer_stage1"], None, conlst.conl_step,
                                     batch1, b1 + b1s)
            return loss, "conl_step", b1 + b1s
        loss = stages.train_step(p["run"], p["net"], p["prog"], p["optimizer_stage2"], None, conlst.st_step, batch2,
                                 b2 + b2s)
        return loss, "st_step", b2 + b2s

    res = exercise(cfg, build, step)
    res["config"] = {"model": name, "max_length": t, "stage1": f"{b1} anchors x K={k} negatives ({len(uniq)} unique) "
                     f"+ {b1s} source", "stage2": f"{b2} target views + {b2s} source"}
    return res


def check_msmo(cfg: Cfg) -> dict:
    """MSMO on mBERT (msmo.Args: batch 16, 128 sub-tokens, 16 consistency pairs), msmo.msmo_step with
    the Wasserstein critic, two-step schedule over --steps. The optimizer set-up of msmo.make_stage
    (Adam with a head group, linear decay) is repeated here."""
    import msmo
    from common.text_data import AlignedPair

    dev, amp = cfg.device, cfg.amp_dtype
    a = msmo.Args()
    name = a.model = cfg.text_model or a.model
    tiny = cfg.tiny
    a.steps = cfg.steps  # phase_at: adversarial for the first half, consistency for the second
    if tiny:
        a.critic_steps, a.critic_steps_warm = 1, 2
    b, n_pairs, t = (4, 2, 16) if tiny else (a.batch_size, a.cons_batch, a.max_len)
    num_tags = len(msmo.tag_list(a.tagging))
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = special_ids(name, tiny)

    def sentence(row: list[int]) -> Any:  # a word starts at ~2 of 3 sub-tokens; tags at word starts only
        first = [j for j in range(1, len(row) - 1) if j == 1 or torch.rand((), generator=gen) < 0.67]
        labels = [-100] * len(row)
        for j in first:
            labels[j] = int(torch.randint(0, num_tags, (), generator=gen)) if torch.rand((), generator=gen) < 0.2 else 0
        return msmo.EncodedSentence(row, first, labels)

    items = [sentence(r) for r in fake_rows(b, t, ids, gen)]
    sides = [j % 2 for j in range(b)]  # English-context and target-context sentences, for the critic
    pairs = []
    for ra, rb in zip(fake_rows(n_pairs, t, ids, gen), fake_rows(n_pairs, t, ids, gen)):
        sa, sb = sentence(ra), sentence(rb)
        n_asp = min(3, len(sa.first) // 2, len(sb.first) // 2)
        aspects = [(sa.first[2 * q: 2 * q + 1 + q % 2], sb.first[2 * q: 2 * q + 1 + q % 2]) for q in range(n_asp)]
        pairs.append(AlignedPair(sa, sb, aspects))
    batch_adv = msmo.tagging_batch(items, ids["pad"], dev, sides)
    batch_cons = msmo.tagging_batch(items, ids["pad"], dev, sides, pairs)

    def build() -> dict:
        model = msmo.Tagger(make_encoder(name, tiny), num_tags)
        if a.freeze_embeddings:
            msmo.freeze_word_embeddings(model)
        model.to(dev).train()
        head = list(model.classifier.parameters())
        body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
        opt = torch.optim.Adam([{"params": body, "lr": a.lr}, {"params": head, "lr": a.head_lr or a.lr}], eps=1e-8)
        from transformers import get_linear_schedule_with_warmup

        hidden = model.encoder.config.hidden_size
        critic = msmo.Critic(hidden, model.encoder.config.hidden_dropout_prob,
                             a.critic_clip if a.adversary == "wgan" else None).to(dev)
        critic.requires_grad_(a.adversary == "grl")
        return {"model": model, "optimizer": opt, "scheduler": get_linear_schedule_with_warmup(opt, 0, cfg.steps + 2),
                "scaler": torch.amp.GradScaler(dev.type, enabled=cfg.use_scaler), "critic": critic,
                "critic_opt": torch.optim.Adam(critic.parameters(), lr=a.critic_lr or a.lr), "params": body + head}

    def step(p: dict, i: int):
        phase = msmo.phase_at(i, a)
        batch = batch_cons if phase == "cons" else batch_adv
        loss, terms = msmo.msmo_step(p["model"], p["critic"], p["critic_opt"], batch, a, phase,
                                     msmo.critic_steps_at(i, a), amp)
        utils.check_finite(loss, i, terms)
        optimizer_step(p, loss, a.max_grad_norm, p["params"])
        rows = batch["input_ids"].shape[0] + (batch["pairs"]["input_ids"].shape[0] if batch["pairs"] else 0)
        return loss.detach(), f"msmo_step[{phase}]", rows

    res = exercise(cfg, build, step)
    res["config"] = {"model": name, "batch_size": b, "max_len": t, "cons_pairs": n_pairs,
                     "aspects": sum(len(p.aspects) for p in pairs), "adversary": a.adversary,
                     "critic_steps": [a.critic_steps_warm, a.critic_steps], "schedule": a.schedule}
    return res


CHECKS = {"lacol": check_lacol, "scal": check_scal, "uscal": check_uscal, "conlst": check_conlst, "msmo": check_msmo}


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------
def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def report_line(name: str, res: dict) -> str:
    if res.get("error"):
        return f"{name:7s} FAIL  {res['error']}"
    ck = res["checks"]
    failed = [k for k, v in ck.items() if v is False]
    sps = res["samples_per_s"]
    by = ", ".join(f"{k} {v:.1f}/s" for k, v in res["samples_per_s_by_step"].items())
    dt = "/".join(f"{k} {v}" for k, v in res["layer_output_dtypes"].items())
    cl = {None: "n/a", True: "yes", False: "NO"}[ck["channels_last"]]
    return (f"{name:7s} {res['status']}  loss {res['first_loss']:.4f} -> {res['final_loss']:.4f}  "
            f"{'n/a' if sps is None else f'{sps:.1f}'} samples/s ({by})  peak {fmt_bytes(res['peak_memory_bytes'])}  "
            f"outputs {dt}  channels-last {cl}  resume diff {res['resume']['max_abs_diff']:.2e}"
            + (f"  FAILED: {', '.join(failed)}" if failed else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                    help=f"methods to check ({', '.join(METHODS)}; default: all)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 30; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="small configs for a CPU smoke run (2-layer hidden-32 "
                    "encoders, ResNet-34 on 8x8 images, batch 4)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="bf16", choices=["auto", "bf16", "fp16", "fp32"],
                    help="autocast dtype (utils.resolve_precision); fp16 adds the GradScaler")
    ap.add_argument("--text-model", default=None, choices=list(ENCODERS),
                    help="encoder sizes for the text methods (default: each script's paper default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help=f"JSON summary (default {DEFAULT_OUT}; --tiny: {DEFAULT_OUT_TINY})")
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 30)
    if steps < 1:
        ap.error(f"--steps {steps}: must be >= 1")
    with utils.cli_errors():
        device = utils.resolve_device(args.device)
        amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
        if device.type != "cuda" and not args.tiny:
            print("warning: paper-scale models on the CPU are very slow; use --tiny for a CPU smoke run",
                  file=sys.stderr)
        cfg = Cfg(device, amp_dtype, use_scaler, steps, args.tiny, args.seed, args.text_model)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else utils.cpu_description()
        print(f"gpu_check: {device_name}, torch {torch.__version__}, precision {dtype_name(amp_dtype or torch.float32)}"
              f"{' + GradScaler' if use_scaler else ''}, {steps} steps, {'tiny' if args.tiny else 'paper'} sizes",
              flush=True)
        results: dict[str, dict] = {}
        for name in args.only:
            utils.seed_everything(args.seed)
            t0 = time.time()
            try:
                res = CHECKS[name](cfg)
                res["status"] = "PASS" if all(v is not False for v in res["checks"].values()) else "FAIL"
            except Exception as e:  # noqa: BLE001 - report and go on with the next method
                traceback.print_exc()
                first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                res = {"status": "FAIL", "error": f"{type(e).__name__}: {first_line}"}
            res["wall_s"] = round(time.time() - t0, 2)
            results[name] = res
            print(report_line(name, res), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ok = all(r["status"] == "PASS" for r in results.values())
        summary = {
            "status": "PASS" if ok else "FAIL", "device": device_name, "device_type": device.type,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "versions": utils.library_versions(), "git_commit": utils.git_commit(),
            "machine": f"{platform.machine()}, {utils.cpu_description()}",
            "precision": dtype_name(amp_dtype or torch.float32), "grad_scaler": use_scaler, "steps": steps,
            "tiny": args.tiny, "text_model": args.text_model, "seed": args.seed, "methods": results,
        }
        out = Path(args.out or (DEFAULT_OUT_TINY if args.tiny else DEFAULT_OUT))
        utils.atomic_write_json(out, summary)
        failed = [k for k, r in results.items() if r["status"] != "PASS"]
        print(f"{'PASS' if ok else 'FAIL'}: {len(results) - len(failed)}/{len(results)} methods passed"
              + (f" (failed: {', '.join(failed)})" if failed else "") + f"  ->  {out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
