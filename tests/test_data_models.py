import numpy as np
import pytest
import torch

from common import data, models
from common.utils import MissingError, UsageError


def test_fashion_mnist_offline():
    try:
        d = data.load_fashion_mnist()
    except MissingError as e:
        pytest.skip(f"Debian package dataset-fashion-mnist not installed: {e}")
    assert d.train_x.shape == (60000, 1, 28, 28) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.train_y).tolist() == [6000] * 10
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    # the first training image is an ankle boot (class 9), the second a T-shirt (class 0)
    assert d.train_y[:2].tolist() == [9, 0]
    assert 60 < d.train_x.float().mean() < 80  # mean pixel ~72.9 (0.286 * 255)


def test_fashion_mnist_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nothing")
    with pytest.raises(MissingError) as e:
        data.load_fashion_mnist(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "fashion_mnist" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_from_data_dir(tmp_path):
    import gzip

    root = tmp_path / "fashion-mnist"
    root.mkdir()

    def idx(name, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
        with gzip.open(root / f"{name}.gz", "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())

    idx("train-images-idx3-ubyte", np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256)
    idx("train-labels-idx1-ubyte", np.array([3, 4]))
    idx("t10k-images-idx3-ubyte", np.zeros((1, 28, 28)))
    idx("t10k-labels-idx1-ubyte", np.array([5]))
    d = data.load_fashion_mnist(str(tmp_path))
    assert d.train_y.tolist() == [3, 4] and d.train_x[0, 0, 0, 5] == 5 and len(d.test_y) == 1


def test_cifar_offline_error(tmp_path):
    with pytest.raises(MissingError) as e:
        data.load_cifar("cifar10", str(tmp_path), download=False)
    assert "cifar10" in str(e.value) and "cifar-10-batches-py" in str(e.value) and "\n" not in str(e.value)


def test_cifar_offline_download_fails_fast(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*a, **k):
        raise urllib.error.URLError("no network")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # not in offline mode:
        monkeypatch.delenv(var, raising=False)  # the download is tried, and fails
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(MissingError, match="cifar100.*download failed"):
        data.load_cifar("cifar100", str(tmp_path), download=True)


def test_cifar_in_offline_mode_tries_no_download_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingError, match="cifar10: .*offline mode"):
        data.load_cifar("cifar10", str(tmp_path / "none"), download=True)
    assert not (tmp_path / "none").exists()


def test_cifar_reads_the_torchvision_layout(tmp_path, monkeypatch):
    """Write a miniature CIFAR-10 in the release's pickle layout and read it back."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # our files have other md5s
    d = data.load_cifar("cifar10", str(tmp_path), download=False)
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.train_y.tolist()[:4] == [0, 1, 2, 3]


def test_clothing1m_layout(tmp_path):
    with pytest.raises(MissingError, match="clothing1m"):
        data.load_clothing1m(str(tmp_path))
    base = tmp_path / "clothing1m"
    base.mkdir()
    (base / "noisy_label_kv.txt").write_text("images/0/a.jpg 3\nimages/0/b.jpg 5\n")
    (base / "noisy_train_key_list.txt").write_text("images/0/a.jpg\nimages/0/b.jpg\n")
    (base / "clean_label_kv.txt").write_text("images/1/c.jpg 13\n")
    (base / "clean_test_key_list.txt").write_text("images/1/c.jpg\n")
    d = data.load_clothing1m(str(tmp_path))
    assert d.train_y.tolist() == [3, 5] and d.test_y.tolist() == [13] and d.train_x[0].endswith("images/0/a.jpg")


def test_unknown_dataset():
    with pytest.raises(UsageError, match="--dataset"):
        data.load_image_dataset("mnist")


@pytest.mark.parametrize("name,in_ch,size,params", [
    ("resnet18", 3, 32, 11_168_832), ("resnet34", 3, 32, 21_276_992),
    ("preact_resnet18", 3, 32, None), ("small_cnn", 1, 28, None), ("cnn_fc", 1, 28, 3_286_464),
])
def test_backbone_shapes(name, in_ch, size, params):
    m = models.build_backbone(name, in_ch=in_ch).eval()
    x = torch.randint(0, 256, (2, in_ch, size, size), dtype=torch.uint8)
    with torch.no_grad():
        assert m(x).shape == (2, m.out_dim)
    if params is not None:
        assert models.count_parameters(m) == params


def test_resnet34_matches_the_known_cifar_parameter_count():
    # the CIFAR ResNet-34 with a 10-way linear classifier has 21,282,122 parameters
    m = models.build_backbone("resnet34")
    assert models.count_parameters(m) + 512 * 10 + 10 == 21_282_122


def test_resnet50_random_init():
    m = models.build_backbone("resnet50", pretrained=False)
    assert m.out_dim == 2048 and models.count_parameters(m) == 23_508_032


def test_resnet50_pretrained_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import urllib.request

    def no_network(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(MissingError, match="resnet50"):
        models.build_backbone("resnet50", pretrained=True)


def test_unknown_backbone():
    with pytest.raises(UsageError, match="--backbone"):
        models.build_backbone("vgg")


def test_normalize():
    n = models.Normalize((0.5,), (0.25,))
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(n(x), torch.tensor([[[[-2.0, 2.0]]]]))


def test_cnn_fc_is_conv64_conv128_then_fc512():
    m = models.build_backbone("cnn_fc", in_ch=1)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 64, (3, 3)), (64, 128, (3, 3))]
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) == 2
    assert sum(isinstance(x, torch.nn.MaxPool2d) for x in m.modules()) == 2
    fc = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fc] == [(128 * 7 * 7, 512)] and m.out_dim == 512
    with torch.no_grad():  # the output is the fully connected layer after a ReLU
        assert (m.eval()(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)) >= 0).all()


# ---- the held-out split of the noisy training labels (--holdout)
def test_holdout_takes_samples_out_with_their_noisy_labels():
    full = data.load_noisy_data("fake_cifar10", None, 3, "sym40", limit_train=400)
    d = data.load_noisy_data("fake_cifar10", None, 3, "sym40", limit_train=400, holdout=100)
    h = d.holdout
    assert len(d.noisy_y) == 300 and len(h["noisy"]) == 100 and len(h["x"]) == 100
    assert not set(d.subset) & set(h["subset"]) and sorted({*d.subset, *h["subset"]}) == sorted(full.subset)
    # every label is what it is without the split: the noise is made first, then the split
    pos = {int(i): k for k, i in enumerate(full.subset)}
    for part_subset, noisy, clean in ((d.subset, d.noisy_y, d.clean_y), (h["subset"], h["noisy"], h["clean"])):
        k = [pos[int(i)] for i in part_subset]
        assert (noisy == full.noisy_y[k]).all() and (clean == full.clean_y[k]).all()
    assert (h["x"] == full.train_x[[pos[int(i)] for i in h["subset"]]]).all()
    # seeded by the noise seed on a stream of its own: same split for another noise, another for another seed
    assert (data.load_noisy_data("fake_cifar10", None, 3, "clean", limit_train=400, holdout=100).holdout["subset"]
            == h["subset"]).all()
    other = data.load_noisy_data("fake_cifar10", None, 4, "sym40", limit_train=400, holdout=100)
    assert set(other.holdout["subset"]) != set(h["subset"])
    info = d.noise_info
    assert info["holdout"] == 100 and info["realized_rate"] == float((d.noisy_y != d.clean_y).numpy().mean())
    assert info["holdout_realized_rate"] == float((h["noisy"] != h["clean"]).numpy().mean())
    arrays = d.label_arrays()
    assert set(arrays) == {"subset", "clean", "noisy", "test_indices", "holdout_subset", "holdout_clean",
                           "holdout_noisy"}
    assert set(full.label_arrays()) == {"subset", "clean", "noisy", "test_indices"} and full.holdout is None
    _, _, evals = d.datasets(lambda x: x, lambda x: x, lambda x: x)
    assert list(evals) == ["acc", "holdout_noisy_acc"] and evals["holdout_noisy_acc"][5][1] == h["noisy"][5]
    assert list(full.datasets(lambda x: x, lambda x: x, lambda x: x)[2]) == ["acc"]


@pytest.mark.parametrize("n", [400, 500])
def test_holdout_must_leave_training_samples(n):
    with pytest.raises(UsageError, match=f"--holdout {n}: must be less than the 400 training samples"):
        data.load_noisy_data("fake_cifar10", None, 0, "sym40", limit_train=400, holdout=n)
