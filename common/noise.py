"""Label-noise generators for the noisy-label experiments (lacol.py).

Every generator is deterministic given its seed and returns the noisy labels; the realized
noise rate is `mean(noisy != clean)`. `make_noisy_labels` parses a spec such as `sym40`,
`asym20`, `inst40` or `clean` and returns the labels plus a small info dict that the run
saves beside its results.

Conventions (see docs/lacol.md, "Paper vs. code"):
- `symNN` (default, as DivideMix/ELR): NN% of the samples, chosen at random, get a label
  drawn uniformly from *all* classes, so it can equal the true one; the realized rate is
  about NN% * (C-1)/C. `include_true=False` gives the Co-teaching transition matrix: each
  sample flips with probability NN% to one of the *other* C-1 classes (realized ~NN%).
- `asymNN`: within each source class of the mapping, exactly round(NN% * n_c) samples,
  chosen at random, move to the mapped class. CIFAR-100 has two mappings (`cifar100_asym`):
  the next class within its semantic superclass (default), or the next label within its block
  of 5 consecutive labels (ELR's code: labels 5b..5b+4, cyclic).
- `instNN`: the part-dependent generator of Xia et al. (2020), as used by CDR and PES, on raw
  0-255 pixel values as their code does (`inst_pixels="raw"`); `"unit"` divides them by 255.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from common.utils import MissingError, UsageError

# CIFAR-10 classes: 0 airplane 1 automobile 2 bird 3 cat 4 deer 5 dog 6 frog 7 horse 8 ship 9 truck
# "labels are only changed to similar classes" (LaCoL Sec. 4.1; Patrini et al. 2017's pairs).
ASYM_CIFAR10 = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog

# Fashion-MNIST classes: 0 T-shirt/top 1 Trouser 2 Pullover 3 Dress 4 Coat 5 Sandal 6 Shirt
# 7 Sneaker 8 Bag 9 Ankle boot. Our mapping (no paper uses Fashion-MNIST), built like CIFAR-10's:
# similar-looking pairs, one swap and three one-way flips. Trouser, Dress and Bag are kept.
ASYM_FASHION_MNIST = {0: 6, 2: 4, 4: 2, 5: 7, 9: 7}  # T-shirt->Shirt, Pullover<->Coat, Sandal->Sneaker, Boot->Sneaker

# CIFAR-100 fine label -> superclass (coarse label), in torchvision's class order.
CIFAR100_COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
])


def cifar100_asym_map() -> dict[int, int]:
    """Within each of the 20 superclasses (5 fine classes each, in increasing fine-label
    order), class -> the next class, cyclically."""
    mapping = {}
    for sc in range(20):
        members = np.flatnonzero(CIFAR100_COARSE == sc).tolist()
        for i, c in enumerate(members):
            mapping[c] = members[(i + 1) % len(members)]
    return mapping


def cifar100_block5_map() -> dict[int, int]:
    """ELR's code (data_loader/cifar100.py): the 100 labels in 20 blocks of 5 consecutive labels
    (5b, ..., 5b+4), each label -> the next label of its block, cyclically (5b+4 -> 5b). The labels
    are in alphabetical order, so a block is not a semantic superclass."""
    return {c: 5 * (c // 5) + (c + 1) % 5 for c in range(100)}


CIFAR100_ASYM = {"superclass": cifar100_asym_map, "block5": cifar100_block5_map}


def asym_map(dataset: str, cifar100: str = "superclass") -> dict[int, int]:
    """The class -> class map of `asymNN`; `cifar100` chooses CIFAR-100's (CIFAR100_ASYM)."""
    maps = {"cifar10": ASYM_CIFAR10, "fashion_mnist": ASYM_FASHION_MNIST}
    if dataset == "cifar100":
        if cifar100 not in CIFAR100_ASYM:
            raise UsageError(f"--cifar100-asym {cifar100}: allowed are {', '.join(CIFAR100_ASYM)}")
        return CIFAR100_ASYM[cifar100]()
    if dataset not in maps:
        raise UsageError(f"--noise asym*: no asymmetric mapping for dataset {dataset}; "
                         "allowed for cifar10, cifar100, fashion_mnist")
    return maps[dataset]


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int,
                    include_true: bool = True) -> np.ndarray:
    """Symmetric noise. include_true=True: round(rate*N) random samples get a uniform label
    over all classes (may equal the true one). include_true=False: each sample flips with
    probability `rate` to a uniform label among the other classes."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    noisy = labels.copy()
    n = len(labels)
    if include_true:
        idx = rng.permutation(n)[: int(round(rate * n))]
        noisy[idx] = rng.integers(0, num_classes, size=len(idx))
    else:
        flip = rng.random(n) < rate
        offset = rng.integers(1, num_classes, size=n)  # 1..C-1: never the true class
        noisy[flip] = (labels[flip] + offset[flip]) % num_classes
    return noisy


def asymmetric_noise(labels: np.ndarray, rate: float, mapping: dict[int, int], seed: int) -> np.ndarray:
    """Class-conditional noise: for each source class s in `mapping`, exactly round(rate*n_s)
    of its samples (chosen at random) get label mapping[s]. Swaps (a->b, b->a) use the true
    labels, so a flipped sample is never flipped back."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    noisy = labels.copy()
    for src in sorted(mapping):
        idx = np.flatnonzero(labels == src)
        chosen = rng.permutation(idx)[: int(round(rate * len(idx)))]
        noisy[chosen] = mapping[src]
    return noisy


INST_PIXELS = {"raw": 1.0, "unit": 255.0}  # instance noise: pixel values as they are (PES/CDR), or / 255


def instance_flip_targets(labels: np.ndarray, images: np.ndarray, w: np.ndarray, pixels: str = "raw") -> np.ndarray:
    """Xia et al.'s flip-target distribution [N, C] (float32): for sample i of class y, the softmax
    over the classes other than y of x_i^T W_y, with x_i the flattened image (raw 0-255 values, or
    divided by 255 with `pixels="unit"`); 0 at y. Rows sum to 1."""
    labels = np.asarray(labels, dtype=np.int64)
    n, num_classes = len(labels), w.shape[0]
    x = np.asarray(images, dtype=np.float32).reshape(n, -1)
    if INST_PIXELS[pixels] != 1.0:
        x = x / INST_PIXELS[pixels]
    out = np.zeros((n, num_classes), dtype=np.float32)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        scores = x[idx] @ w[c]  # [n_c, C]
        scores[:, c] = -np.inf
        scores -= scores.max(axis=1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=1, keepdims=True)
        out[idx] = p
    return out


def instance_noise(labels: np.ndarray, images: np.ndarray, rate: float, num_classes: int, seed: int,
                   sd: float = 0.1, pixels: str = "raw") -> np.ndarray:
    """Instance-dependent noise of Xia et al. (2020) ("part-dependent", PTD).

    Per sample: a flip rate q_i from a normal N(rate, sd) truncated to [0, 1]; W a random
    C x D x C Gaussian projection; the flip target drawn from `instance_flip_targets` (scaled by
    q_i), the true class kept with probability 1 - q_i. Realized rate ~ rate.

    `pixels`: "raw" (default) feeds the 0-255 pixel values, as PES's and CDR's code do
    (get_instance_noisy_label: the uint8 images cast to float); "unit" divides them by 255 (this
    code before issue 28). The scores scale with the pixels, so raw values give a sharper softmax:
    on Fashion-MNIST nearly every sample's flip target is then its top-scoring class.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    d = int(np.prod(np.shape(images)[1:]))
    q = rng.normal(rate, sd, size=n)
    bad = (q < 0) | (q > 1)
    while bad.any():  # truncation by resampling
        q[bad] = rng.normal(rate, sd, size=int(bad.sum()))
        bad = (q < 0) | (q > 1)
    w = rng.standard_normal((num_classes, d, num_classes)).astype(np.float32)
    targets = instance_flip_targets(labels, images, w, pixels)
    noisy = labels.copy()
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        p = targets[idx]  # a float32 copy
        p *= q[idx, None]
        p[:, c] = 1.0 - q[idx]
        cum = np.cumsum(p, axis=1)
        u = rng.random(len(idx))[:, None] * cum[:, -1:]
        noisy[idx] = np.minimum((u > cum).sum(axis=1), num_classes - 1)
    return noisy


def load_noise_file(path: str | Path, num_samples: int, num_classes: int, column: str | None = None) -> np.ndarray:
    """Read noisy labels from a file, in the order of the training set.

    Formats: `.npy` (an integer array), `.csv` with a header (e.g. CIFAR-N's
    `CIFAR-10_human.labels.csv`: pick the label set with `column`, e.g. `worse`, `aggre`,
    `random1`, `noisy`), or plain text with one integer label per line.
    """
    path = Path(path)
    if not path.exists():
        raise MissingError(f"--noise-file {path}: no such file")
    try:
        if path.suffix == ".npy":
            labels = np.load(path)
        elif path.suffix == ".csv":
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            cols = [c for c in (rows[0].keys() if rows else []) if c != "train_index"]
            if column is None:
                if len(cols) != 1:
                    raise MissingError(f"--noise-file {path}: has columns {cols}; choose one with --noise-column")
                column = cols[0]
            if column not in cols:
                raise MissingError(f"--noise-column {column}: not in {path.name} (columns: {', '.join(cols)})")
            labels = np.array([int(r[column]) for r in rows])
        else:
            labels = np.array([int(x) for x in path.read_text().split()])
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise MissingError(f"--noise-file {path}: malformed ({type(e).__name__}: {e}); "
                           "expected .npy, a CSV with a header, or one integer label per line") from None
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != num_samples:
        raise MissingError(f"--noise-file {path}: has {len(labels)} labels, the training set has {num_samples}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise MissingError(f"--noise-file {path}: labels span {labels.min()}..{labels.max()}, "
                           f"the data set has {num_classes} classes")
    return labels


NOISE_SPEC = re.compile(r"^(sym|asym|inst)(\d+(?:\.\d+)?)$")
NOISE_CHOICES = "clean, symNN, asymNN, instNN (NN = percent in [0, 100), e.g. sym40)"


def parse_noise(spec: str) -> tuple[str, float]:
    """'sym40' -> ('sym', 0.4); 'clean' -> ('clean', 0.0). Bad specs raise UsageError."""
    if spec == "clean":
        return "clean", 0.0
    m = NOISE_SPEC.match(spec)
    if not m:
        raise UsageError(f"--noise {spec}: allowed are {NOISE_CHOICES}")
    rate = float(m.group(2)) / 100
    if not 0 <= rate < 1:
        raise UsageError(f"--noise {spec}: the rate must be in [0, 100) percent")
    return m.group(1), rate


def make_noisy_labels(spec: str, labels: np.ndarray, num_classes: int, seed: int, dataset: str,
                      images: np.ndarray | None = None, include_true: bool = True, inst_pixels: str = "raw",
                      cifar100_asym: str = "superclass") -> tuple[np.ndarray, dict]:
    """Apply the noise named by `spec`; returns (noisy labels, info with the realized rate, and
    `inst_pixels` for instance noise, `cifar100_asym` for CIFAR-100 asymmetric noise)."""
    kind, rate = parse_noise(spec)
    labels = np.asarray(labels, dtype=np.int64)
    if kind == "clean":
        noisy = labels.copy()
    elif kind == "sym":
        noisy = symmetric_noise(labels, rate, num_classes, seed, include_true=include_true)
    elif kind == "asym":
        noisy = asymmetric_noise(labels, rate, asym_map(dataset, cifar100_asym), seed)
    else:
        if images is None:
            raise UsageError(f"--noise {spec}: instance-dependent noise needs the training images")
        noisy = instance_noise(labels, images, rate, num_classes, seed, pixels=inst_pixels)
    info = {"spec": spec, "kind": kind, "rate": rate, "seed": seed, "include_true": include_true,
            "realized_rate": float((noisy != labels).mean())}
    if kind == "inst":
        info["inst_pixels"] = inst_pixels
    if kind == "asym" and dataset == "cifar100":
        info["cifar100_asym"] = cifar100_asym
    return noisy, info
