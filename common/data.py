"""Image data loaders: CIFAR-10/100 (torchvision), Clothing1M (local files), Fashion-MNIST
(Debian package, offline), and CIFAR-shaped fake data for code-path tests only.

`load_image_dataset` returns the training and test images as uint8 tensors [N, C, H, W]
(or, for Clothing1M, file paths) with int64 labels. Augmentation happens in the method
script's DataLoader workers, on these uint8 tensors. Text loaders are in common/text_data.py.

Offline, a loader that finds nothing raises MissingError with one line: the data set, where
it looked, and how to get it (scripts exit with code 3). In offline mode (HF_HUB_OFFLINE=1,
HF_DATASETS_OFFLINE=1 or TRANSFORMERS_OFFLINE=1) CIFAR is not downloaded.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from common.utils import MissingError, UsageError

IMAGE_DATASETS = ("cifar10", "cifar100", "clothing1m", "fashion_mnist", "fake_cifar10")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "clothing1m": 14, "fashion_mnist": 10, "fake_cifar10": 10}
# Per-channel mean/std of the training images (0-1 scale), for normalisation inside the model.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "clothing1m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, for the pretrained ResNet-50
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "fake_cifar10": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
FASHION_MNIST_DIRS = ("fashion-mnist", "fashion_mnist", ".")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageData:
    """Training and clean test split of an image data set."""

    name: str
    num_classes: int
    train_x: torch.Tensor | list[str]  # uint8 [N, C, H, W], or image paths (Clothing1M)
    train_y: torch.Tensor  # int64 [N]: the clean labels where known (Clothing1M: the noisy ones)
    test_x: torch.Tensor | list[str]
    test_y: torch.Tensor
    notes: dict = field(default_factory=dict)


def load_image_dataset(name: str, data_dir: str | None = None, download: bool = True) -> ImageData:
    if name not in IMAGE_DATASETS:
        raise UsageError(f"--dataset {name}: allowed are {', '.join(IMAGE_DATASETS)}")
    if name == "fashion_mnist":
        return load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, download)
    if name == "clothing1m":
        return load_clothing1m(data_dir)
    return fake_cifar10()


# ----------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise MissingError(f"fashion_mnist: {path} is truncated ({data.size} bytes for shape {dims})")
    return data.reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for suffix in (".gz", ""):
            p = d / f"{stem}{suffix}"
            if p.exists():
                return p
    return None


def load_fashion_mnist(data_dir: str | None = None) -> ImageData:
    """Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) from IDX files.

    Looked for in `data_dir/{fashion-mnist,fashion_mnist,.}` and then in the Debian package
    `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), which works offline.
    """
    dirs = ([Path(data_dir) / d for d in FASHION_MNIST_DIRS] if data_dir else []) + [DEBIAN_FASHION_MNIST]
    stems = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    paths = {k: _find_idx(dirs, s) for k, s in stems.items()}
    if any(p is None for p in paths.values()):
        raise MissingError("fashion_mnist: IDX files not found in " + ", ".join(str(d) for d in dirs)
                           + "; install them with `apt-get install dataset-fashion-mnist` or put the four "
                           "*-idx?-ubyte(.gz) files in --data-dir/fashion-mnist")
    arr = {k: _read_idx(p) for k, p in paths.items()}
    return ImageData(
        "fashion_mnist", 10,
        torch.from_numpy(arr["train_x"].copy()).unsqueeze(1), torch.from_numpy(arr["train_y"].astype(np.int64)),
        torch.from_numpy(arr["test_x"].copy()).unsqueeze(1), torch.from_numpy(arr["test_y"].astype(np.int64)),
        notes={"source": str(paths["train_x"].parent)},
    )


# ----------------------------------------------------------------------------- CIFAR
def load_cifar(name: str, data_dir: str | None, download: bool = True) -> ImageData:
    """CIFAR-10/100 through torchvision (the python-pickle release), stored in
    `data_dir` (default ./data). With `download`, torchvision fetches it when missing."""
    import torchvision

    from common.text_data import hub_offline_requested

    root = Path(data_dir or "data")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    offline = hub_offline_requested()  # HF_HUB_OFFLINE=1 (and the like): no download attempt, nothing written
    try:
        train = cls(str(root), train=True, download=download and not offline)
        test = cls(str(root), train=False, download=download and not offline)
    except (RuntimeError, OSError) as e:  # not found without download, or no network
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        why = "offline mode (HF_HUB_OFFLINE=1), so no download was tried" if offline else \
            f"the download failed ({type(e).__name__})"
        raise MissingError(f"{name}: not found in {root / folder} and {why}; run once with network access "
                           f"(torchvision downloads it to --data-dir) or copy the extracted {folder}/ folder into "
                           "--data-dir") from None

    def to_tensor(ds):  # [N, 32, 32, 3] uint8 -> [N, 3, 32, 32]
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.int64)

    tx, ty = to_tensor(train)
    vx, vy = to_tensor(test)
    return ImageData(name, NUM_CLASSES[name], tx, ty, vx, vy, notes={"source": str(root)})


# ----------------------------------------------------------------------------- Clothing1M
CLOTHING1M_FILES = ("noisy_label_kv.txt", "noisy_train_key_list.txt", "clean_label_kv.txt", "clean_test_key_list.txt")


def load_clothing1m(data_dir: str | None) -> ImageData:
    """Clothing1M (Xiao et al. 2015), from its official release, which must be requested
    from the authors. Expected layout (the release's own):

        <data-dir>/clothing1m/            (or <data-dir> itself)
            images/0/..., images/1/..., ...  (the extracted image folders)
            noisy_label_kv.txt               ("images/x/y.jpg label" per line)
            noisy_train_key_list.txt         (the 1M noisy training images)
            clean_label_kv.txt
            clean_test_key_list.txt          (the 10,526 clean test images)

    Returns file paths (images are decoded in the DataLoader workers) and labels 0-13.
    """
    if not data_dir:
        raise MissingError("clothing1m: needs --data-dir pointing at the extracted release "
                           "(request it from the authors of Xiao et al. 2015; layout in common/data.py)")
    base = Path(data_dir)
    if (base / "clothing1m").is_dir():
        base = base / "clothing1m"
    missing = [f for f in CLOTHING1M_FILES if not (base / f).exists()]
    if missing:
        raise MissingError(f"clothing1m: {', '.join(missing)} not found in {base}; request the release from "
                           "the authors of Xiao et al. 2015 and extract it there (layout in common/data.py)")

    def kv(fname: str) -> dict[str, int]:
        out = {}
        for line in (base / fname).read_text().splitlines():
            if line.strip():
                k, v = line.split()
                out[k] = int(v)
        return out

    def keys(fname: str) -> list[str]:
        return [x.strip() for x in (base / fname).read_text().splitlines() if x.strip()]

    noisy, clean = kv("noisy_label_kv.txt"), kv("clean_label_kv.txt")
    train_keys = [k for k in keys("noisy_train_key_list.txt") if k in noisy]
    test_keys = [k for k in keys("clean_test_key_list.txt") if k in clean]
    return ImageData(
        "clothing1m", 14,
        [str(base / k) for k in train_keys], torch.tensor([noisy[k] for k in train_keys], dtype=torch.int64),
        [str(base / k) for k in test_keys], torch.tensor([clean[k] for k in test_keys], dtype=torch.int64),
        notes={"source": str(base), "train_labels_are_noisy": True},
    )


# ----------------------------------------------------------------------------- fake data
def fake_cifar10(n_train: int = 512, n_test: int = 256, seed: int = 0) -> ImageData:
    """Random uint8 images of CIFAR's shape with random labels. For code-path tests of the
    paper configuration only: accuracies on it mean nothing."""
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        "fake_cifar10", 10,
        torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n_test,), generator=g),
        notes={"warning": "FakeData: random images and labels, for code-path tests only"},
    )


# ---- a training subset with noisy labels, and the dataset that makes the views (lacol.py)
HOLDOUT_STREAM = 28  # the held-out split's random stream: its own, so the subset and the noise stay as without it


@dataclass
class NoisyData:
    """A run's data: the training subset (indices into the full set), its images, clean and given
    (noisy) labels, the test images and labels, and the noise record saved with the run. With a
    held-out split, `holdout` holds its indices (into the full set), images, clean and noisy labels."""

    data: ImageData
    subset: np.ndarray
    train_x: Any
    clean_y: torch.Tensor
    noisy_y: torch.Tensor
    test_x: Any
    test_y: torch.Tensor
    noise_info: dict
    holdout: dict | None = None

    def label_arrays(self) -> dict[str, np.ndarray]:
        """The run's labels.npz: the training subset (indices into the full set), its clean and given
        labels, the test samples' indices, and the held-out split's (holdout_*) when there is one."""
        out = {"subset": self.subset, "clean": self.clean_y.numpy(), "noisy": self.noisy_y.numpy(),
               "test_indices": np.arange(len(self.test_y))}
        if self.holdout:
            out.update(holdout_subset=self.holdout["subset"], holdout_clean=self.holdout["clean"].numpy(),
                       holdout_noisy=self.holdout["noisy"].numpy())
        return out

    def datasets(self, weak, strong, test_view) -> tuple:
        """lacol.py's datasets: the training set (weak, strong, strong' views), the selection set (weak
        view only), and the evaluation sets {"acc": the clean test set, "holdout_noisy_acc": the held-out
        samples with their *noisy* labels (only with a held-out split)}."""
        evals = {"acc": NoisyImages(self.test_x, self.test_y, test_view=test_view)}
        if self.holdout:
            evals["holdout_noisy_acc"] = NoisyImages(self.holdout["x"], self.holdout["noisy"], test_view=test_view)
        return (NoisyImages(self.train_x, self.noisy_y, (weak, strong)),
                NoisyImages(self.train_x, self.noisy_y, (weak, strong), n_views=1), evals)


def _take(x: Any, idx: np.ndarray) -> Any:
    return x[idx] if isinstance(x, torch.Tensor) else [x[i] for i in idx]


def load_noisy_data(dataset: str, data_dir: str, seed: int, noise: str, limit_train: int | None = None,
                    limit_eval: int | None = None, noise_file: str = "", noise_column: str = "",
                    include_true: bool = True, inst_pixels: str = "raw", cifar100_asym: str = "superclass",
                    holdout: int = 0) -> NoisyData:
    """Load the data set, take a seeded `limit_train` subset (sorted indices) and make its noisy
    labels: from `noise_file` (e.g. CIFAR-N) or the `noise` spec (common/noise.py). The test set is
    its first `limit_eval` samples.

    `holdout` > 0: after the noise is made (so every label is what it is without a held-out split),
    that many samples of the subset, drawn with the noise seed `seed` on a stream of their own
    (HOLDOUT_STREAM), leave training: a held-out split with its *noisy* labels (PES holds out 10% of
    the noisy training set), on which a warm-up length or a stopping epoch can be chosen without the
    test set. It changes with --seed, as the subset and the noise do. The noise record's realized_rate
    is then the training part's; holdout_realized_rate the held-out part's."""
    from common import noise as label_noise

    data = load_image_dataset(dataset, data_dir)
    n_all = len(data.train_y)
    if limit_train:
        if limit_train > n_all:
            raise UsageError(f"--limit-train {limit_train}: the training set has only {n_all} samples")
        subset = np.sort(np.random.default_rng(seed).permutation(n_all)[:limit_train])
    else:
        subset = np.arange(n_all)
    train_x = _take(data.train_x, subset)
    clean_y = data.train_y[subset].numpy()
    if noise_file:
        noisy = label_noise.load_noise_file(noise_file, n_all, data.num_classes, noise_column or None)[subset]
        info = {"spec": f"file:{Path(noise_file).name}:{noise_column}",
                "realized_rate": float((noisy != clean_y).mean())}
    else:
        images = train_x.numpy() if noise.startswith("inst") else None
        noisy, info = label_noise.make_noisy_labels(noise, clean_y, data.num_classes, seed, dataset,
                                                    images=images, include_true=include_true,
                                                    inst_pixels=inst_pixels, cifar100_asym=cifar100_asym)
    if data.notes.get("train_labels_are_noisy"):
        info["realized_rate"] = None  # Clothing1M: the true labels of the training set are unknown
    test_n = limit_eval or len(data.test_y)
    out = NoisyData(data, subset, train_x, torch.from_numpy(clean_y), torch.from_numpy(noisy).long(),
                    data.test_x[:test_n], data.test_y[:test_n], info)
    return split_holdout(out, holdout, seed) if holdout else out


def split_holdout(d: NoisyData, n: int, seed: int) -> NoisyData:
    """Move `n` samples of the training subset, drawn by `seed` (stream HOLDOUT_STREAM), into `d.holdout`."""
    if not 0 < n < len(d.noisy_y):
        raise UsageError(f"--holdout {n}: must be less than the {len(d.noisy_y)} training samples")
    out = np.sort(np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(len(d.noisy_y))[:n])
    keep = np.setdiff1d(np.arange(len(d.noisy_y)), out)
    d.holdout = {"subset": d.subset[out], "x": _take(d.train_x, out), "clean": d.clean_y[out], "noisy": d.noisy_y[out]}
    d.subset, d.train_x, d.clean_y, d.noisy_y = d.subset[keep], _take(d.train_x, keep), d.clean_y[keep], d.noisy_y[keep]
    if d.noise_info.get("realized_rate") is not None:
        d.noise_info["realized_rate"] = float((d.noisy_y != d.clean_y).numpy().mean())
        d.noise_info["holdout_realized_rate"] = float((d.holdout["noisy"] != d.holdout["clean"]).numpy().mean())
    d.noise_info["holdout"] = n
    return d


class NoisyImages(torch.utils.data.Dataset):
    """Item i -> (weak view, strong view, strong view', given label, index) for training (the first
    `n_views` views), or (image, label, index) for evaluation. Images are uint8 tensors or
    (Clothing1M) file paths, decoded here."""

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


def epoch_loader(ds: torch.utils.data.Dataset, batch_size: int, shuffle: bool, seed: int, epoch: int,
                 num_workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """A fresh loader per epoch with a generator seeded by (seed, epoch): the data order and the
    augmentations of epoch e are the same in an interrupted-and-resumed run."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                       drop_last=shuffle and len(ds) >= batch_size, num_workers=num_workers,
                                       generator=g, pin_memory=device.type == "cuda", persistent_workers=False)
