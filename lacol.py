"""LaCoL: Latent Contrastive Learning for learning with noisy labels.

Docs: docs/lacol.md
Paper: "Noise Is Also Useful: Negative Correlation-Steered Latent Contrastive Learning"
(../shared/papers/lacol.txt). One file, top to bottom: arguments, data and label noise,
views, model, the method's losses (each a plain function named after its equation), the
training loop, evaluation.

    python lacol.py --preset demo                 # Fashion-MNIST, sym40, a few minutes on CPU
    python lacol.py --preset cpu --method ce      # the CPU-scale reproduction's CE baseline
    python lacol.py --noise sym40                 # the paper's CIFAR-10 setting (GPU, downloads CIFAR)
    python lacol.py --preset cifar100 --noise asym40 --wo-ms   # one ablation row (Table 4)

Per step (after a plain-CE warm-up, Algorithm 1 line 1), for a batch of samples x_i with
given (possibly wrong) labels y_i, the network (encoder g, classifier h, projection f) sees
three views: weak A_w (crop + flip) and two strong A_s, A_s' (crop + flip + RandAugment):

  Selection (Eq. 3)   high-confidence set: samples whose weak-view prediction equals y_i
                      (recomputed once per epoch over the whole training set, as PES does)
  L_LS (Eq. 4)        class-weighted CE on the strong view of the selected samples
  L_MS (Eq. 1-2)      InfoNCE: anchor f(g(A_w x_i)), positive f(g(A_s x_i)), and K negatives
                      f(g(A_s x_j)) drawn from the batch among samples whose *given* label differs
  L_SC (Eq. 5-7)      cross-entropy between the label-space similarity of the weak-view
                      probabilities and the metric-space similarity of the two strong views
  total (Eq. 8)       L_LS + lambda_MS * L_MS + lambda_SC * L_SC

Readings of the paper (README "paper vs. code" has the full list):
- Embedding = f o g (the paper writes f o h; both are heads on g). f: 2-layer MLP -> 64-d (CoMatch).
- Eq. 2's garbled denominator is read as the standard InfoNCE with the positive included.
- Eq. 4's weights: default PES's inverse frequency, mean(eps)/eps_k (`--class-weight inverse`);
  the literal eps_k / sum(eps) is `--class-weight proportional`. Both as a weighted mean.
- Eq. 5 compares probability vectors by cosine (the paper's <.,.>); CoMatch's dot product is
  `--label-sim dot`. Gradient flows through W^l (Fig. 3 caption); `--sc-stopgrad` detaches it.
- Eq. 2, 4 and 7 are reduced by their mean over samples (the paper mixes sums and means).
- Selection once per epoch over the training set on weak views (`--selection epoch`), or per
  batch (`--selection batch`). When fewer than K valid negatives exist in the batch, all valid
  ones are used (a mask, never a duplicate); an anchor with none has only its positive.
- Warm-up length is not given: `--warmup-epochs` (PES: 25 of 200 epochs on CIFAR-10).
- Symmetric noise may keep the true class (DivideMix); `--no-sym-include-true` flips always.
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
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from common import data as image_data
from common import noise as label_noise
from common import utils
from common.models import build_backbone
from common.utils import UsageError, arg


# =========================================================================================
# Arguments (defaults: the paper's CIFAR-10 setting)
# =========================================================================================
@dataclass
class Args:
    """LaCoL (and its CE baseline) for image classification with noisy labels."""

    # -- run
    exp_name: str = arg("", "run directory name (default: method__dataset__noise__seed__time)")
    seed: int = arg(0, "random seed (noise, subsets, initialisation, data order)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    precision: str = arg("auto", "auto (bf16 on CUDA if supported, fp16 on older GPUs; on CPU bf16 if it has "
                         "native bf16, else fp32), fp32, bf16, fp16",
                         choices=["auto", "fp32", "bf16", "fp16"])
    deterministic: bool = arg(False, "deterministic kernels (CUDA: slower) and one CPU thread: bit-identical reruns")
    data_dir: str = arg("data", "where data sets live / are downloaded to")
    out_dir: str = arg("runs", "parent of the run directory")
    track: bool = arg(False, "also write TensorBoard events to <run>/tb")
    resume: str = arg("", "run directory to continue from its last checkpoint; its own"
                      " arguments are used, except --max-steps and --num-workers when given")
    max_steps: int | None = arg(None, "stop after this many optimizer steps (for smoke tests; default: no limit)")
    skip_nonfinite: bool = arg(False, "skip a step whose loss is NaN or infinite (no update; counted in metrics.jsonl "
                               "and summary.json) instead of stopping the run with exit code 4")
    limit_train: int | None = arg(None, "use a fixed random subset of this many training samples (default: all)")
    limit_eval: int | None = arg(None, "evaluate on the first N test samples (default: all)")
    num_workers: int = arg(2, "DataLoader worker processes producing the augmented views", ge=0)
    preset: str | None = arg(None, "named group of settings, applied before the other flags")
    # -- data and noise
    dataset: str = arg("cifar10", "data set", choices=list(image_data.IMAGE_DATASETS))
    noise: str = arg("sym40", "label noise: " + label_noise.NOISE_CHOICES)
    noise_file: str = arg("", "read the noisy labels from this file instead (.npy, .csv, .txt; e.g. CIFAR-N)")
    noise_column: str = arg("", "column of a CSV --noise-file (CIFAR-N: worse_label, aggre_label, noisy_label...)")
    sym_include_true: bool = arg(True, "symmetric noise may draw the true class (DivideMix convention)")
    # -- model
    method: str = arg("lacol", "lacol, or ce: plain cross-entropy on the weak view (baseline)", choices=["lacol", "ce"])
    backbone: str = arg("resnet34", "encoder g", choices=["resnet18", "resnet34", "preact_resnet18", "resnet50", "small_cnn"])
    pretrained: bool = arg(False, "ImageNet weights for resnet50 (Clothing1M)")
    cnn_width: int = arg(16, "small_cnn only: channels of the first block (then x2, x4)")
    proj_dim: int = arg(64, "output size of the projection head f (2-layer MLP)")
    # -- optimisation
    epochs: int = arg(200, "training epochs (warm-up included)")
    batch_size: int = arg(128, "batch size (not given in the paper; PES's)")
    lr: float = arg(0.1, "initial learning rate (SGD)", gt=0)
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(1e-4, "weight decay")
    milestones: list[int] = arg([100, 150], "epochs at which the learning rate is multiplied by --lr-gamma")
    lr_gamma: float = arg(0.1, "learning-rate decay factor at each milestone", gt=0)
    warmup_epochs: int = arg(25, "epochs of plain CE on the weak view before the LaCoL losses (Alg. 1, line 1)",
                              ge=0)
    # -- LaCoL
    tau: float = arg(0.2, "temperature of L_MS and W^m", gt=0)
    rho: float = arg(0.8, "threshold on label-space similarity in W^l (Eq. 5)", le=1)
    lambda_ms: float = arg(1.0, "weight of L_MS")
    lambda_sc: float = arg(0.5, "weight of L_SC")
    k_neg: int = arg(15, "negatives per anchor (Eq. 1)")
    selection: str = arg("epoch", "recompute the high-confidence set once per epoch over the training set, or per batch",
                         choices=["epoch", "batch"])
    class_weight: str = arg("inverse", "Eq. 4 weights: inverse (PES: mean(eps)/eps_k), proportional (literal), none",
                            choices=["inverse", "proportional", "none"])
    label_sim: str = arg("cosine", "similarity of probability vectors in Eq. 5: cosine (paper) or dot (CoMatch)",
                         choices=["cosine", "dot"])
    sc_stopgrad: bool = arg(False, "detach W^l in L_SC (CoMatch); default lets L_SC train the classifier too")
    wo_ms: bool = arg(False, "ablation: without L_MS (Table 4)")
    wo_sc: bool = arg(False, "ablation: without L_SC (Table 4)")
    wo_diversity: bool = arg(False, "ablation: select and train L_LS on the same weak view (Table 4)")
    randaug_ops: int = arg(2, "RandAugment: operations per strong view (N; not given in the paper)", ge=0)
    randaug_magnitude: int = arg(9, "RandAugment: magnitude (M, of 31 bins; not given in the paper)",
                                 ge=0, le=30)


PRESETS = {
    "cifar100": {"_doc": "paper CIFAR-100 (ResNet-34, 30 warm-up epochs as PES)", "dataset": "cifar100",
                 "warmup_epochs": 30},
    "clothing1m": {"_doc": "paper Clothing1M (ImageNet ResNet-50, 6 epochs, lr 5e-3 /10 at 3 and 4, wd 1e-3)",
                   "dataset": "clothing1m", "noise": "clean", "backbone": "resnet50", "pretrained": True,
                   "epochs": 6, "lr": 5e-3, "milestones": [3, 4], "weight_decay": 1e-3, "batch_size": 64,
                   "warmup_epochs": 1, "num_workers": 8},
    "cpu": {"_doc": "CPU-scale reproduction: Fashion-MNIST (4,000-sample subset), small CNN, 20 epochs, ~5 min "
                    "in fp32, 1.7x less in bf16 (benchmarks/results/parity)",
            "dataset": "fashion_mnist", "backbone": "small_cnn", "epochs": 20, "milestones": [12, 17],
            "warmup_epochs": 4, "lr": 0.05, "weight_decay": 5e-4, "limit_train": 4000, "num_workers": 1},
    "demo": {"_doc": "a few minutes on 2 CPU cores: the cpu preset on 5,000 samples for 4 epochs",
             "dataset": "fashion_mnist", "backbone": "small_cnn", "epochs": 4, "milestones": [3],
             "warmup_epochs": 1, "lr": 0.05, "weight_decay": 5e-4, "limit_train": 5000, "limit_eval": 2000,
             "num_workers": 1},
}


def validate(args: Args) -> None:
    """Check the values argparse cannot; each failure is one line naming the flag. check_args (types and
    bounds of every field) also covers a --resume run's args.json and Args built in code."""
    utils.check_args(args)
    if args.noise_file == "":
        label_noise.parse_noise(args.noise)
    if args.method == "lacol" and not args.wo_ms and args.k_neg > args.batch_size - 1:
        raise UsageError(f"--k-neg {args.k_neg}: the negatives of an anchor come from its batch, so at most "
                         f"--batch-size - 1 = {args.batch_size - 1} are possible")
    if args.method == "lacol" and args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs}: must be < --epochs {args.epochs}")
    if args.backbone == "small_cnn" and args.dataset not in ("fashion_mnist",):
        raise UsageError(f"--backbone small_cnn: is for 28x28 inputs (fashion_mnist), not {args.dataset}")


# =========================================================================================
# Data: images as uint8 tensors, noisy labels, and the three views made in DataLoader workers
# =========================================================================================
def make_views(dataset: str, size: int, randaug_ops: int, randaug_magnitude: int):
    """weak = pad-crop + flip; strong = weak + RandAugment; test = identity (uint8 in, uint8 out)."""
    if dataset == "clothing1m":  # decoded JPEGs of varying size: resize, then crop 224
        base = [v2.Resize(256, antialias=True)]
        weak = v2.Compose(base + [v2.RandomCrop(224), v2.RandomHorizontalFlip()])
        test = v2.Compose(base + [v2.CenterCrop(224)])
    else:
        weak = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])
        test = v2.Identity()
    strong = v2.Compose([weak, v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude)])
    return weak, strong, test


class NoisyImages(Dataset):
    """Item i -> (weak view, strong view, strong view', given label, index) for training, or
    (image, label, index) for evaluation. Images are uint8 tensors or (Clothing1M) paths."""

    def __init__(self, images, labels: torch.Tensor, views: tuple | None = None, test_view=None, n_views: int = 3):
        self.images, self.labels, self.views, self.test_view, self.n_views = images, labels, views, test_view, n_views

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, i: int) -> torch.Tensor:
        x = self.images[i]
        if isinstance(x, str):
            from torchvision.io import ImageReadMode, decode_image

            x = decode_image(x, mode=ImageReadMode.RGB)
        return x

    def __getitem__(self, i: int):
        x = self._image(i)
        if self.views is None:
            return self.test_view(x), self.labels[i], i
        weak, strong = self.views
        out = [weak(x)] + [strong(x) for _ in range(self.n_views - 1)]
        return (*out, self.labels[i], i)


def load_data(args: Args):
    """Load the data set, take the --limit-train subset and make the noisy labels (saved
    with the run as labels.npz by the caller)."""
    data = image_data.load_image_dataset(args.dataset, args.data_dir)
    n_all = len(data.train_y)
    if args.limit_train:
        if args.limit_train > n_all:
            raise UsageError(f"--limit-train {args.limit_train}: the training set has only {n_all} samples")
        subset = np.sort(np.random.default_rng(args.seed).permutation(n_all)[: args.limit_train])
    else:
        subset = np.arange(n_all)
    train_x = data.train_x[subset] if isinstance(data.train_x, torch.Tensor) else [data.train_x[i] for i in subset]
    clean_y = data.train_y[subset].numpy()
    if args.noise_file:
        noisy_all = label_noise.load_noise_file(args.noise_file, n_all, data.num_classes, args.noise_column or None)
        noisy = noisy_all[subset]
        info = {"spec": f"file:{Path(args.noise_file).name}:{args.noise_column}",
                "realized_rate": float((noisy != clean_y).mean())}
    else:
        images = train_x.numpy() if args.noise.startswith("inst") else None
        noisy, info = label_noise.make_noisy_labels(args.noise, clean_y, data.num_classes, args.seed, args.dataset,
                                                    images=images, include_true=args.sym_include_true)
    if data.notes.get("train_labels_are_noisy"):
        info["realized_rate"] = None  # Clothing1M: the true labels of the training set are unknown
    test_n = args.limit_eval or len(data.test_y)
    return (data, subset, train_x, torch.from_numpy(clean_y), torch.from_numpy(noisy).long(),
            data.test_x[:test_n], data.test_y[:test_n], info)


# =========================================================================================
# Model: encoder g, classification head h, projection head f
# =========================================================================================
class LaCoLNet(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, proj_dim: int):
        super().__init__()
        d = backbone.out_dim
        self.g = backbone
        self.h = nn.Linear(d, num_classes)
        self.f = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x: torch.Tensor, with_embedding: bool = True):
        feat = self.g(x)
        logits = self.h(feat)
        if not with_embedding:
            return logits, None
        return logits, F.normalize(self.f(feat), dim=1)


# =========================================================================================
# The method: selection (Eq. 3), L_LS (Eq. 4), negatives (Eq. 1), L_MS (Eq. 2), L_SC (Eq. 5-7)
# =========================================================================================
def select_high_confidence_eq3(probs_weak: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Eq. 3: a sample is high-confidence when its weak-view prediction (Sharpen = argmax)
    equals its given label. Returns a bool mask."""
    return probs_weak.argmax(dim=1) == given


def class_weights_eq4(selected_labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """Per-class weights mu_k from eps_k = number of selected samples of class k.

    inverse (PES): mean_j(eps_j) / eps_k; proportional (Eq. 4 literally): eps_k / sum_j eps_j;
    none: 1. A class with no selected sample gets weight 0 (it has no term anyway)."""
    eps = torch.bincount(selected_labels, minlength=num_classes).float()
    if mode == "none":
        return torch.ones(num_classes, device=eps.device)
    if mode == "proportional":
        return eps / eps.sum().clamp_min(1)
    return torch.where(eps > 0, eps.mean() / eps.clamp_min(1), torch.zeros_like(eps))


def weighted_ce_eq4(logits_strong: torch.Tensor, given: torch.Tensor, selected: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """L_LS: class-weighted CE over the selected samples, reduced as a weighted mean
    (sum_i mu_{y_i} CE_i / sum_i mu_{y_i}). Zero when nothing is selected."""
    if not selected.any():
        return logits_strong.sum() * 0.0
    return F.cross_entropy(logits_strong[selected].float(), given[selected], weight=weights)


def sample_negatives_eq1(given: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """Eq. 1: for each anchor i, K batch indices j with y_j != y_i, uniformly without
    replacement. Returns (idx [B, K], valid [B, K]); where fewer than K candidates exist,
    the missing slots are marked invalid (valid=False) and must be masked out."""
    b = given.shape[0]
    allowed = given[None, :] != given[:, None]  # [B, B], diagonal is False
    scores = torch.rand(b, b, generator=generator, device="cpu").to(given.device)
    scores = scores.masked_fill(~allowed, -1.0)  # disallowed sort last
    kk = min(k, b)
    top, idx = scores.topk(kk, dim=1)
    valid = top >= 0
    if kk < k:  # pad to K columns so the shape does not depend on the batch
        pad = k - kk
        idx = torch.cat([idx, idx.new_zeros(b, pad)], 1)
        valid = torch.cat([valid, valid.new_zeros(b, pad)], 1)
    return idx, valid


def latent_contrastive_loss_eq2(z_anchor: torch.Tensor, z_pos: torch.Tensor, neg_idx: torch.Tensor,
                                neg_valid: torch.Tensor, tau: float) -> torch.Tensor:
    """L_MS = mean_i -log( e^{s(a_i,p_i)/tau} / (e^{s(a_i,p_i)/tau} + sum_{j in N_i} e^{s(a_i,p_j)/tau}) ).

    z_* are L2-normalised, so s = dot product = cosine. Negatives are the *strong-view*
    embeddings of the sampled indices (z_pos[neg_idx])."""
    pos = (z_anchor * z_pos).sum(1, keepdim=True) / tau  # [B, 1]
    neg = torch.einsum("bd,bkd->bk", z_anchor, z_pos[neg_idx]) / tau  # [B, K]
    neg = neg.masked_fill(~neg_valid, float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos.squeeze(1)).mean()


def label_similarity_eq5(probs_weak: torch.Tensor, rho: float, sim: str = "cosine") -> torch.Tensor:
    """W^l: 1 on the diagonal; off it, the similarity of the two probability vectors when it is
    >= rho, else 0; then each row normalised to sum 1."""
    if sim == "cosine":
        p = F.normalize(probs_weak, dim=1)
        w = p @ p.t()
    else:
        w = probs_weak @ probs_weak.t()
    w = w * (w >= rho).float()
    w.fill_diagonal_(1.0)
    return w / w.sum(dim=1, keepdim=True)


def metric_log_similarity_eq6(z_s: torch.Tensor, z_s2: torch.Tensor, tau: float) -> torch.Tensor:
    """log of the row-normalised W^m: off-diagonal exp(<z_i, z_j>/tau) between first strong
    views, diagonal exp(<z_i, z'_i>/tau) between the two strong views of sample i."""
    s = z_s @ z_s.t()
    diag = (z_s * z_s2).sum(1)
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    s = torch.where(eye, diag[:, None].expand_as(s), s)
    return F.log_softmax(s / tau, dim=1)


def similarity_consistency_eq7(w_label: torch.Tensor, log_w_metric: torch.Tensor) -> torch.Tensor:
    """L_SC = mean_i CE(W^l_i, W^m_i) = mean_i -sum_j W^l_ij log W^m_ij."""
    return -(w_label * log_w_metric).sum(1).mean()


def ce_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, amp_dtype):
    """Plain cross-entropy on the weak view: the CE baseline, and LaCoL's warm-up."""
    with utils.autocast(device, amp_dtype):
        logits, _ = model(x, with_embedding=False)
    loss = F.cross_entropy(logits.float(), y)
    return loss, {"l_ce": loss}


def lacol_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: Args, device, amp_dtype,
               selected: torch.Tensor | None = None, weights: torch.Tensor | None = None):
    """The LaCoL objective (Eq. 8) on one batch. `x` stacks the weak, strong and strong'
    views ([3B, C, H, W]), all three through one forward pass. `selected`/`weights`: this
    batch's part of the epoch's high-confidence set and the epoch's class weights; None
    selects within the batch (`--selection batch`). Returns (loss, terms, selected)."""
    b = y.shape[0]
    with utils.autocast(device, amp_dtype):  # bf16/fp16 convolutions; BatchNorm keeps fp32 statistics
        logits, z = model(x)
    # every loss below (softmaxes, similarity matrices, log-similarities) is computed in fp32 on purpose:
    # in bf16 (8 bits of mantissa) Eq. 6's log-softmax over the batch loses the small differences it learns from
    logits, z = logits.float(), z.float()
    lw, ls1 = logits[:b], logits[b: 2 * b]
    zw, zs1, zs2 = z[:b], z[b: 2 * b], z[2 * b:]
    pw = lw.softmax(1)
    if selected is None:
        selected = select_high_confidence_eq3(pw.detach(), y)
        weights = class_weights_eq4(y[selected], logits.shape[1], args.class_weight)
    ls_logits = lw if args.wo_diversity else ls1  # w/o diversity: train on the view that selected
    terms = {"l_ls": weighted_ce_eq4(ls_logits, y, selected, weights)}
    loss = terms["l_ls"]
    if not args.wo_ms:
        neg_idx, neg_valid = sample_negatives_eq1(y, args.k_neg)
        terms["l_ms"] = latent_contrastive_loss_eq2(zw, zs1, neg_idx, neg_valid, args.tau)
        loss = loss + args.lambda_ms * terms["l_ms"]
    if not args.wo_sc:
        w_l = label_similarity_eq5(pw.detach() if args.sc_stopgrad else pw, args.rho, args.label_sim)
        terms["l_sc"] = similarity_consistency_eq7(w_l, metric_log_similarity_eq6(zs1, zs2, args.tau))
        loss = loss + args.lambda_sc * terms["l_sc"]
    return loss, terms, selected


# =========================================================================================
# Training and evaluation
# =========================================================================================
def channels_last(device, amp_dtype) -> bool:
    """Channels-last memory where it is faster: on CUDA, and under bf16 autocast on a CPU (oneDNN's
    bf16 convolutions; a CE step of the small CNN at batch 384 was 1.33x faster). fp32 on a CPU
    keeps the default layout, and its numbers."""
    return device.type == "cuda" or amp_dtype is not None


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device, amp_dtype) -> dict:
    model.eval()
    correct = total = 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last(device, amp_dtype):
            x = x.contiguous(memory_format=torch.channels_last)
        with utils.autocast(device, amp_dtype):
            logits, _ = model(x, with_embedding=False)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    model.train()
    return {"acc": 100.0 * correct / max(total, 1)}


@torch.no_grad()
def epoch_selection(model: nn.Module, loader: DataLoader, n: int, device, amp_dtype) -> torch.Tensor:
    """Algorithm 1, line 4: predictions on weak views of the whole training set -> the
    high-confidence mask (Eq. 3), indexed by sample."""
    model.eval()
    selected = torch.zeros(n, dtype=torch.bool)
    for xw, *_rest, y, idx in loader:
        xw = xw.to(device)
        if channels_last(device, amp_dtype):
            xw = xw.contiguous(memory_format=torch.channels_last)
        with utils.autocast(device, amp_dtype):
            logits, _ = model(xw, with_embedding=False)
        selected[idx] = select_high_confidence_eq3(logits.float().softmax(1), y.to(device)).cpu()
    model.train()
    return selected


def make_loader(ds: Dataset, args: Args, shuffle: bool, epoch: int, device) -> DataLoader:
    """A fresh loader per epoch with a generator seeded by (seed, epoch): the data order and
    the augmentations of epoch e are the same in an interrupted-and-resumed run."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    return DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, drop_last=shuffle and len(ds) >= args.batch_size,
                      num_workers=args.num_workers, generator=g, pin_memory=device.type == "cuda",
                      persistent_workers=False)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "history", "wall_s")


def main(args: Args) -> dict:
    validate(args)
    resume = None
    if args.resume:  # continue a run: its own arguments, its directory, its last checkpoint (None: start over)
        # the run's own arguments; only the step limit and the worker count may change, when given with --resume
        # (the worker count changes the augmentations: the run then differs from an uninterrupted one)
        given = {k: getattr(args, k) for k in ("max_steps", "num_workers") if k in utils.flags_given(args)}
        args, resume = utils.resume_run(Args, args.resume, {"resume": args.resume, **given})
        validate(args)
        if resume is not None:
            utils.require_keys(resume, CHECKPOINT_KEYS, args.resume)
    else:
        utils.check_out_dir(args.out_dir)
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)
    torch.set_float32_matmul_precision("high")

    # ---- data (before the run directory exists: a failure here writes nothing)
    data, subset, train_x, clean_y, noisy_y, test_x, test_y, noise_info = load_data(args)
    n_train, num_classes = len(noisy_y), data.num_classes
    if args.batch_size > n_train:
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {n_train} training samples")
    if args.resume:
        run_dir = Path(args.resume)
    else:
        name = utils.run_name(args.method, args.dataset, Path(args.noise_file).stem if args.noise_file else args.noise,
                              args.seed, args.exp_name)
        run_dir = utils.make_run_dir(args.out_dir, name)
        utils.atomic_write_json(run_dir / "args.json", dataclasses.asdict(args))
    size = 224 if args.dataset == "clothing1m" else train_x.shape[-1]
    weak, strong, test_view = make_views(args.dataset, size, args.randaug_ops, args.randaug_magnitude)
    train_ds = NoisyImages(train_x, noisy_y, (weak, strong))
    test_ds = NoisyImages(test_x, test_y, test_view=test_view)
    select_ds = NoisyImages(train_x, noisy_y, (weak, strong), n_views=1)
    known_clean = noise_info.get("realized_rate") is not None

    # ---- model and optimiser
    in_ch = 1 if args.dataset == "fashion_mnist" else 3
    model = LaCoLNet(build_backbone(args.backbone, in_ch, image_data.MEAN_STD[args.dataset], args.pretrained,
                                    args.cnn_width),
                     num_classes, args.proj_dim).to(device)
    if channels_last(device, amp_dtype):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestones, gamma=args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start_epoch, step, history, wall_before, skipped = 0, 0, [], 0.0, 0
    if resume is not None:
        with utils.restoring(run_dir):
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            utils.set_rng_state(resume["rng"])
        start_epoch, step, history, wall_before = resume["epoch"], resume["step"], resume["history"], resume["wall_s"]
        skipped = resume.get("skipped_nonfinite", 0)
    if resume is None:  # a new run, or one that stopped before its first checkpoint (it starts over)
        # what defines the run's data: the training subset, its clean and given (noisy) labels, the test samples
        utils.atomic_savez(run_dir / "labels.npz", subset=subset, clean=clean_y.numpy(), noisy=noisy_y.numpy(),
                           test_indices=np.arange(len(test_y)))
    metrics = utils.MetricsWriter(run_dir, args.track)
    if args.resume:
        metrics.resume(resume, step)
        print(f"resuming {run_dir} at epoch {start_epoch} (step {step})" if resume is not None else
              f"resuming {run_dir}: it stopped before its first checkpoint, so it starts over")

    def checkpoint(epoch: int) -> None:
        utils.save_checkpoint(run_dir, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng": utils.rng_state(), "epoch": epoch, "step": step,
            "history": history, "wall_s": wall_before + time.time() - t_start, "skipped_nonfinite": skipped,
            "metrics_lines": metrics.lines})

    print(f"run: {run_dir}  |  {args.method} on {args.dataset} ({n_train} train, {len(test_y)} test), "
          f"noise {noise_info['spec']} realized {noise_info['realized_rate']}  |  device {device}, "
          f"precision {amp_dtype or 'fp32'}")

    t_start, samples_seen = time.time(), 0
    stop = utils.StopFlag()
    with stop:
        if resume is None:  # the starting point: a kill or Ctrl-C in the first epoch leaves a checkpoint too
            checkpoint(0)
        for epoch in range(start_epoch, args.epochs):
            torch.manual_seed(args.seed * 100_003 + epoch)  # negatives sampled this epoch: same after a resume
            lacol_phase = args.method == "lacol" and epoch >= args.warmup_epochs
            log: dict[str, float] = {}
            # ---- Algorithm 1, line 4: the high-confidence set of this epoch
            if lacol_phase and args.selection == "epoch":
                sel = epoch_selection(model, make_loader(select_ds, args, False, epoch, device), n_train, device, amp_dtype)
                weights = class_weights_eq4(noisy_y[sel], num_classes, args.class_weight).to(device)
                log["selected_frac"] = sel.float().mean().item()
                if known_clean:
                    log["selected_precision"] = (noisy_y[sel] == clean_y[sel]).float().mean().item() if sel.any() else 0.0
            sums: dict[str, float] = {}
            sel_count = sel_clean = 0
            train_ds.n_views = 3 if lacol_phase else 1  # CE and the warm-up use the weak view only: build no other
            loader = make_loader(train_ds, args, True, epoch, device)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}" + (" (warm-up)" if args.method == "lacol" and not lacol_phase else ""),
                       leave=False, dynamic_ncols=True, disable=None)
            for batch in bar:
                *views, y, idx = batch
                y = y.to(device, non_blocking=True)
                b = y.shape[0]
                x = torch.cat(views if lacol_phase else views[:1]).to(device, non_blocking=True)  # [3B or B, C, H, W]
                if channels_last(device, amp_dtype):
                    x = x.contiguous(memory_format=torch.channels_last)
                if not lacol_phase:  # CE baseline, and LaCoL's warm-up: plain CE on the weak view
                    loss, terms = ce_step(model, x, y, device, amp_dtype)
                else:
                    if args.selection == "epoch":
                        loss, terms, selected = lacol_step(model, x, y, args, device, amp_dtype, sel[idx].to(device), weights)
                    else:
                        loss, terms, selected = lacol_step(model, x, y, args, device, amp_dtype)
                    sel_count += int(selected.sum())
                    if known_clean:
                        sel_clean += int((selected & (y == clean_y[idx].to(device))).sum())
                finite = utils.check_finite(loss, step, terms, args.skip_nonfinite)
                if finite:
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:  # --skip-nonfinite: no backward pass, no update
                    skipped += 1
                step += 1
                samples_seen += b
                if finite:
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v.item()
                    sums["n"] = sums.get("n", 0) + 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if stop or (args.max_steps and step >= args.max_steps):
                    break
            if stop:  # checkpoints are taken at epoch ends (data order and augmentations are per epoch)
                print(f"\ninterrupted in epoch {epoch + 1} (step {step}); the checkpoint of the start of this epoch "
                      f"is kept, and the run continues from there. Resume with: python lacol.py --resume {run_dir}",
                      flush=True)
                sys.exit(utils.EXIT_INTERRUPTED)
            sched.step()
            # ---- evaluation on the clean test set, every epoch
            res = evaluate(model, DataLoader(test_ds, batch_size=512, num_workers=0), device, amp_dtype)
            train_log = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
            if lacol_phase and args.selection == "batch" and sel_count:
                log["selected_frac"] = sel_count / max(sums["n"] * args.batch_size, 1)
                if known_clean:
                    log["selected_precision"] = sel_clean / sel_count
            history.append(res["acc"])
            if args.skip_nonfinite:
                log["skipped_nonfinite"] = skipped
            metrics.write(step, "test", epoch=epoch + 1, acc=res["acc"], lr=opt.param_groups[0]["lr"], **train_log, **log)
            tqdm.write(f"epoch {epoch + 1:3d}  test acc {res['acc']:6.2f}  best {max(history):6.2f}  "
                       + "  ".join(f"{k} {v:.4f}" for k, v in {**train_log, **log}.items()))
            checkpoint(epoch + 1)
            if args.max_steps and step >= args.max_steps:
                break
    metrics.close()

    wall = wall_before + time.time() - t_start
    best = int(np.argmax(history)) if history else -1
    summary = {
        "method": args.method + ("_wo_ms" if args.wo_ms else "") + ("_wo_sc" if args.wo_sc else "")
        + ("_wo_diversity" if args.wo_diversity else ""),
        "script": "lacol.py", "primary_metric": "acc", "dataset": args.dataset, "setting": noise_info["spec"], "seed": args.seed,
        "noise": noise_info, "n_train": n_train, "epochs_done": len(history), "steps": step,
        "final": {"acc": history[-1] if history else None, "epoch": len(history)},
        "best": {"acc": history[best] if history else None, "epoch": best + 1},
        "last10_mean": {"acc": float(np.mean(history[-10:])) if history else None},
        "wall_s": round(wall, 2), "samples_per_s": round(samples_seen / max(time.time() - t_start, 1e-9), 1),
        "skipped_nonfinite_steps": skipped,
    }
    utils.write_summary(run_dir, summary)
    print(f"done: last {summary['final']['acc']:.2f}  best {summary['best']['acc']:.2f} (epoch {best + 1})  "
          f"mean of last 10 {summary['last10_mean']['acc']:.2f}  ->  {run_dir}/summary.json")
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
