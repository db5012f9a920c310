"""LaCoL: Latent Contrastive Learning for learning with noisy labels.

Paper: "Noise Is Also Useful: Negative Correlation-Steered Latent Contrastive Learning"
(../shared/papers/lacol.txt).

    python lacol.py --preset demo                 # Fashion-MNIST, sym40, a few minutes on CPU
    python lacol.py --preset cpu --method ce      # the CPU-scale reproduction's CE baseline
    python lacol.py --preset cpu-mem --method ce --holdout 2000   # the regime where CE memorises (issue 28)
    python lacol.py --noise sym40                 # the paper's CIFAR-10 setting (GPU, downloads CIFAR)
    python lacol.py --preset cifar100 --noise asym40 --wo-ms   # one ablation row (Table 4)

Per step (after a plain-CE warm-up, Algorithm 1 line 1), for a batch of samples x_i with
given (possibly wrong) labels y_i, the network (encoder g, classifier h, projection f) sees
three views: weak A_w (crop + flip, or none: --weak-aug) and two strong A_s, A_s' (A_w + RandAugment):

  Selection (Eq. 3)   high-confidence set: samples whose weak-view prediction equals y_i
                      (recomputed once per epoch over the whole training set, as PES does)
  L_LS (Eq. 4)        class-weighted CE on the strong view of the selected samples
  L_MS (Eq. 1-2)      InfoNCE: anchor f(g(A_w x_i)), positive f(g(A_s x_i)), and K negatives
                      f(g(A_s x_j)) drawn from the batch among samples whose *given* label differs
  L_SC (Eq. 5-7)      cross-entropy between the label-space similarity of the weak-view
                      probabilities and the metric-space similarity of the two strong views
  total (Eq. 8)       L_LS + lambda_MS * L_MS + lambda_SC * L_SC

Each reading of the paper is written once, in the function it concerns; docs/lacol.md lists them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from common import data as image_data
from common import noise as label_noise
from common import utils
from common.diagnostics import batch_selection_log, selection_log
from common.models import BACKBONES, build_backbone, channels_last, predict_logits, to_input
from common.run import Run, RunArgs, epoch_history_summary
from common.utils import UsageError, arg


# ==== Arguments (defaults: the paper's CIFAR-10 setting) ==========================================
@dataclass
class Args(RunArgs):
    """LaCoL (and its CE baseline) for image classification with noisy labels."""

    # -- run (and the flags every script shares: common.run.RunArgs)
    data_dir: str = arg("data", "where data sets live / are downloaded to")
    resume: str = arg("", "run directory to continue from its last checkpoint; its own"
                      " arguments are used, except --max-steps and --num-workers when given")
    num_workers: int = arg(2, "DataLoader worker processes producing the augmented views", ge=0)
    # -- data and noise
    dataset: str = arg("cifar10", "data set", choices=list(image_data.IMAGE_DATASETS))
    noise: str = arg("sym40", "label noise: " + label_noise.NOISE_CHOICES)
    noise_file: str = arg("", "read the noisy labels from this file instead (.npy, .csv, .txt; e.g. CIFAR-N)")
    noise_column: str = arg("", "column of a CSV --noise-file (CIFAR-N: worse_label, aggre_label, noisy_label...)")
    sym_include_true: bool = arg(True, "symmetric noise may draw the true class (DivideMix convention)")
    inst_pixels: str = arg("raw", "inst*: raw 0-255 pixel values (PES/CDR code) or unit: /255", choices=["raw", "unit"])
    cifar100_asym: str = arg("superclass", "CIFAR-100 asym*: next class in its semantic superclass, or block5: next "
                             "label in its block of 5 consecutive labels (ELR code)", choices=["superclass", "block5"])
    holdout: int = arg(0, "hold out this many training samples with their *noisy* labels; accuracy on them is "
                       "logged every epoch (holdout_noisy_acc), to choose the warm-up or stop on", ge=0)
    # -- model
    method: str = arg("lacol", "lacol, or ce: plain cross-entropy on the weak view (baseline)", choices=["lacol", "ce"])
    backbone: str = arg("resnet34", "encoder g", choices=list(BACKBONES))
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
    warmup_epochs: int = arg(25, "epochs of plain CE on the weak view before the LaCoL losses (Alg. 1, line 1)", ge=0)
    # -- LaCoL
    tau: float = arg(0.2, "temperature of L_MS and W^m", gt=0)
    rho: float = arg(0.8, "threshold on label-space similarity in W^l (Eq. 5)", le=1)
    lambda_ms: float = arg(1.0, "weight of L_MS")
    lambda_sc: float = arg(0.5, "weight of L_SC")
    k_neg: int = arg(15, "negatives per anchor (Eq. 1)")
    selection: str = arg("epoch", "recompute the high-confidence set once per epoch over the training set, or per "
                         "batch", choices=["epoch", "batch"])
    class_weight: str = arg("inverse", "Eq. 4 weights: inverse (PES: mean(eps)/eps_k), proportional (literal), none",
                            choices=["inverse", "proportional", "none"])
    label_sim: str = arg("cosine", "similarity of probability vectors in Eq. 5: cosine (paper) or dot (CoMatch)",
                         choices=["cosine", "dot"])
    sc_stopgrad: bool = arg(False, "detach W^l in L_SC (CoMatch); default lets L_SC train the classifier too")
    wo_ms: bool = arg(False, "ablation: without L_MS (Table 4)")
    wo_sc: bool = arg(False, "ablation: without L_SC (Table 4)")
    wo_diversity: bool = arg(False, "ablation: select and train L_LS on the same weak view (Table 4)")
    weak_aug: str = arg("crop_flip", "weak view A_w (and the CE baseline's only view): pad-crop + flip, or none "
                        "(identity; the strong views are then RandAugment alone)", choices=["crop_flip", "none"])
    randaug_ops: int = arg(2, "RandAugment: operations per strong view (N; not given in the paper)", ge=0)
    randaug_magnitude: int = arg(9, "RandAugment: magnitude (M, of 31 bins; not given in the paper)", ge=0, le=30)


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
    "cpu-mem": {"_doc": "where CE memorises noise (issue 28; cpu does not): no augmentation or weight decay, an FC "
                        "head, 12,000 images (10,000 after --holdout 2000), lr 0.05 to epoch 30 (a decay at 15 stopped "
                        "memorising); warmup_epochs 10: where CE's held-out noisy accuracy peaks (docs/lacol.md)",
                "dataset": "fashion_mnist", "backbone": "cnn_fc", "weak_aug": "none", "weight_decay": 0.0,
                "limit_train": 12000, "epochs": 40, "milestones": [30, 35], "lr": 0.05, "warmup_epochs": 10,
                "num_workers": 1},
    "demo": {"_doc": "a few minutes on 2 CPU cores: the cpu preset on 5,000 samples for 4 epochs",
             "dataset": "fashion_mnist", "backbone": "small_cnn", "epochs": 4, "milestones": [3],
             "warmup_epochs": 1, "lr": 0.05, "weight_decay": 5e-4, "limit_train": 5000, "limit_eval": 2000,
             "num_workers": 1},
}


def validate(args: Args) -> None:
    """check_args (every field's type and bounds, also for a --resume run's args.json), then what it cannot."""
    utils.check_args(args)
    if args.noise_file == "":
        label_noise.parse_noise(args.noise)
    if args.method == "lacol" and not args.wo_ms and args.k_neg > args.batch_size - 1:
        raise UsageError(f"--k-neg {args.k_neg}: the negatives of an anchor come from its batch, so at most "
                         f"--batch-size - 1 = {args.batch_size - 1} are possible")
    if args.method == "lacol" and args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs}: must be < --epochs {args.epochs}")
    if args.backbone in ("small_cnn", "cnn_fc") and args.dataset not in ("fashion_mnist",):
        raise UsageError(f"--backbone {args.backbone}: is for 28x28 inputs (fashion_mnist), not {args.dataset}")


# ==== Data: uint8 images and noisy labels (common/data.py), the three views made in DataLoader workers
def make_views(dataset: str, size: int, randaug_ops: int, randaug_magnitude: int, weak_aug: str = "crop_flip"):
    """weak = pad-crop + flip (none: the test view); strong = weak + RandAugment; test = identity (uint8 in/out)."""
    if dataset == "clothing1m":  # decoded JPEGs of varying size: resize, then crop 224
        base = [v2.Resize(256, antialias=True)]
        weak = v2.Compose(base + [v2.RandomCrop(224), v2.RandomHorizontalFlip()])
        test = v2.Compose(base + [v2.CenterCrop(224)])
    else:
        weak = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])
        test = v2.Identity()
    weak = test if weak_aug == "none" else weak
    strong = v2.Compose([weak, v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude)])
    return weak, strong, test


def make_datasets(args: Args, d: image_data.NoisyData):
    """The training set (weak, strong, strong' views), the selection set (weak view only) and the evaluation
    sets: {"acc": the clean test set, "holdout_noisy_acc": the held-out samples with their noisy labels}."""
    if args.batch_size > len(d.noisy_y):
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(d.noisy_y)} training samples")
    size = 224 if args.dataset == "clothing1m" else d.train_x.shape[-1]
    return d.datasets(*make_views(args.dataset, size, args.randaug_ops, args.randaug_magnitude, args.weak_aug))


# ==== Model: encoder g, classification head h, projection head f ==================================
class LaCoLNet(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, proj_dim: int):
        super().__init__()
        d = backbone.out_dim
        self.g = backbone
        self.h = nn.Linear(d, num_classes)
        self.f = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x: torch.Tensor, with_embedding: bool = True):
        """(logits h(g(x)), L2-normalised embedding f(g(x)) or None)."""
        feat = self.g(x)
        return self.h(feat), F.normalize(self.f(feat), dim=1) if with_embedding else None


def build_model(args: Args, num_classes: int, device, amp_dtype) -> LaCoLNet:
    in_ch = 1 if args.dataset == "fashion_mnist" else 3
    backbone = build_backbone(args.backbone, in_ch, image_data.MEAN_STD[args.dataset], args.pretrained,
                              args.cnn_width)
    model = LaCoLNet(backbone, num_classes, args.proj_dim).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last(device, amp_dtype) else model


# ==== The method: selection (Eq. 3), L_LS (Eq. 4), negatives (Eq. 1), L_MS (Eq. 2), L_SC (Eq. 5-7)
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


# ==== Training and evaluation =====================================================================
def evaluate(model: nn.Module, loader: DataLoader, device, amp_dtype) -> dict:
    logits, y, _ = predict_logits(lambda x: model(x, with_embedding=False)[0], model, loader, device, amp_dtype)
    return {"acc": 100.0 * (logits.argmax(1) == y).sum().item() / max(len(y), 1)}


def epoch_selection(model: nn.Module, loader: DataLoader, given: torch.Tensor, clean: torch.Tensor | None,
                    device, amp_dtype) -> tuple[torch.Tensor, dict]:
    """Algorithm 1, line 4: predictions on weak views of the whole training set -> the high-confidence
    mask (Eq. 3), indexed by sample; and its log: the share selected, (when the clean labels are known)
    the share of selected given labels that are right, and per class (common/diagnostics.py)."""
    logits, y, idx = predict_logits(lambda x: model(x, with_embedding=False)[0], model, loader, device, amp_dtype)
    selected = torch.zeros(len(given), dtype=torch.bool)
    selected[idx] = select_high_confidence_eq3(logits.softmax(1), y)
    return selected, selection_log(selected, given, clean, logits.shape[1])


def summarize(args: Args, history: list[float], noise_info: dict, n_train: int, steps: int, samples_per_s: float):
    """summary.json: test accuracy of the last epoch, the best one (an oracle: picked on test), the last 10's mean."""
    method = args.method + "".join(f"_{k}" for k in ("wo_ms", "wo_sc", "wo_diversity") if getattr(args, k))
    return {"method": method, "script": "lacol.py", "primary_metric": "acc", "dataset": args.dataset,
            "setting": noise_info["spec"], "seed": args.seed, "noise": noise_info, "n_train": n_train, "steps": steps,
            **epoch_history_summary(history, "acc"), "samples_per_s": round(samples_per_s, 1)}


def main(args: Args) -> dict:
    # on --resume only the step limit and the worker count may change (the worker count changes the augmentations)
    run = Run("lacol.py", Args, args, validate, may_change=("max_steps", "num_workers"), keys=("epoch", "step"))
    args = run.args
    device = utils.resolve_device(args.device)
    amp_dtype, use_scaler = utils.resolve_precision(args.precision, device)
    utils.seed_everything(args.seed, args.deterministic)
    torch.set_float32_matmul_precision("high")

    # ---- data (before the run directory exists: a failure here writes nothing)
    d = image_data.load_noisy_data(args.dataset, args.data_dir, args.seed, args.noise, args.limit_train,
                                   args.limit_eval, args.noise_file, args.noise_column, args.sym_include_true,
                                   args.inst_pixels, args.cifar100_asym, args.holdout)
    clean_y, noisy_y, noise_info, n_train = d.clean_y, d.noisy_y, d.noise_info, len(d.noisy_y)
    train_ds, select_ds, eval_sets = make_datasets(args, d)
    known_clean = noise_info.get("realized_rate") is not None  # else (Clothing1M) no selection precision

    # ---- model and optimiser
    model = build_model(args, d.data.num_classes, device, amp_dtype)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.milestones, gamma=args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # ---- the run directory (labels.npz: the training subset, its clean and given labels, the test samples)
    state = run.restore(model=model, optimizer=opt, scheduler=sched, scaler=scaler)  # {} for a new run
    setting = Path(args.noise_file).stem if args.noise_file else args.noise
    run.open(utils.run_name(args.method, args.dataset, setting, args.seed, args.exp_name),
             files={"labels.npz": d.label_arrays()},
             resumed_at=f"at epoch {state['epoch']} (step {state['step']})" if state else "")
    start_epoch, step, history = state.get("epoch", 0), state.get("step", 0), state.get("history", [])
    print(f"run: {run.dir}  |  {args.method} on {args.dataset} ({n_train} train, {len(d.test_y)} test), "
          f"noise {noise_info['spec']} realized {noise_info['realized_rate']}  |  device {device}, "
          f"precision {amp_dtype or 'fp32'}")

    samples_seen, t_start = 0, time.time()
    with run:
        if not state:  # the starting point: a kill or Ctrl-C in the first epoch leaves a checkpoint too
            run.save(epoch=0, step=step, history=history)
        for epoch in range(start_epoch, args.epochs):
            torch.manual_seed(args.seed * 100_003 + epoch)  # negatives sampled this epoch: same after a resume
            lacol_phase = args.method == "lacol" and epoch >= args.warmup_epochs
            log: dict = {}
            # ---- Algorithm 1, line 4: the high-confidence set of this epoch
            if lacol_phase and args.selection == "epoch":
                loader = image_data.epoch_loader(select_ds, args.batch_size, False, args.seed, epoch, args.num_workers,
                                                 device)
                sel, log = epoch_selection(model, loader, noisy_y, clean_y if known_clean else None, device, amp_dtype)
                weights = class_weights_eq4(noisy_y[sel], d.data.num_classes, args.class_weight).to(device)
                log["class_weight"] = weights.tolist()
            drawn = torch.full((n_train,), -1, dtype=torch.int8)  # --selection batch: 1 selected, 0 not, -1 not drawn
            train_ds.n_views = 3 if lacol_phase else 1  # CE and the warm-up use the weak view only: build no other
            loader = image_data.epoch_loader(train_ds, args.batch_size, True, args.seed, epoch, args.num_workers,
                                             device)
            warm = " (warm-up)" if args.method == "lacol" and not lacol_phase else ""
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}{warm}", leave=False, dynamic_ncols=True,
                       disable=None)
            for *views, y, idx in bar:
                y = y.to(device, non_blocking=True)
                x = to_input(torch.cat(views if lacol_phase else views[:1]), device, amp_dtype)  # [3B or B, C, H, W]
                if not lacol_phase:  # CE baseline, and LaCoL's warm-up: plain CE on the weak view
                    loss, terms = ce_step(model, x, y, device, amp_dtype)
                else:
                    given_sel = (sel[idx].to(device), weights) if args.selection == "epoch" else (None, None)
                    loss, terms, selected = lacol_step(model, x, y, args, device, amp_dtype, *given_sel)
                    drawn[idx] = selected.to("cpu", torch.int8)
                if run.finite(loss, step, terms):  # else (--skip-nonfinite): no backward pass, no update
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    run.add(terms)
                step += 1
                samples_seen += y.shape[0]
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if run.stopped or (args.max_steps and step >= args.max_steps):
                    break
            if run.stopped:  # checkpoints are taken at epoch ends (data order and augmentations are per epoch)
                run.interrupt(f"in epoch {epoch + 1} (step {step})", "the checkpoint of the start of this epoch is "
                              "kept, and the run continues from there")
            sched.step()
            # ---- evaluation every epoch: the clean test set, and (--holdout) the held-out samples' noisy labels
            res = {k: evaluate(model, DataLoader(ds, batch_size=512, num_workers=0), device, amp_dtype)["acc"]
                   for k, ds in eval_sets.items()}
            train_log = run.means()
            if lacol_phase and args.selection == "batch":  # the batch-wise selections of this epoch
                log = batch_selection_log(drawn, noisy_y, clean_y if known_clean else None, d.data.num_classes)
            history.append(res["acc"])
            run.log(step, "test", epoch=epoch + 1, **res, lr=opt.param_groups[0]["lr"], **train_log, **log)
            tqdm.write(f"epoch {epoch + 1:3d}  test acc {res['acc']:6.2f}  best {max(history):6.2f}  " + "  ".join(
                f"{k} {v:.4f}" for k, v in {**res, **train_log, **log}.items() if k != "acc" and type(v) is not list))
            run.save(epoch=epoch + 1, step=step, history=history)
            if args.max_steps and step >= args.max_steps:
                break

    summary = run.finish(summarize(args, history, noise_info, n_train, step, samples_seen / (time.time() - t_start)))
    print(f"done: last {summary['final']['acc']:.2f}  best {summary['best']['acc']:.2f} "
          f"(epoch {summary['best']['epoch']})  "
          f"mean of last 10 {summary['last10_mean']['acc']:.2f}  ->  {run.dir}/summary.json")
    return summary


if __name__ == "__main__":
    with utils.cli_errors():
        main(utils.parse_args(Args, presets=PRESETS))
