import numpy as np
import pytest

from common import noise
from common.utils import MissingError, UsageError

N, C = 20000, 10


@pytest.fixture
def labels():
    return np.random.default_rng(123).integers(0, C, N)


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.8])
def test_symmetric_including_true_class(labels, rate):
    noisy = noise.symmetric_noise(labels, rate, C, seed=0)
    # round(rate*N) samples are relabelled uniformly over C classes: 1/C of them keep their label
    assert abs((noisy != labels).mean() - rate * (C - 1) / C) < 0.01


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_symmetric_excluding_true_class(labels, rate):
    noisy = noise.symmetric_noise(labels, rate, C, seed=0, include_true=False)
    assert abs((noisy != labels).mean() - rate) < 0.01
    # flipped labels are spread over the other classes evenly
    flipped = noisy[(labels == 0) & (noisy != 0)]
    counts = np.bincount(flipped, minlength=C)[1:]
    assert counts.min() > 0.7 * counts.mean()


def test_same_seed_same_labels_other_seed_other_labels(labels):
    a = noise.make_noisy_labels("sym40", labels, C, 1, "cifar10")[0]
    b = noise.make_noisy_labels("sym40", labels, C, 1, "cifar10")[0]
    c = noise.make_noisy_labels("sym40", labels, C, 2, "cifar10")[0]
    assert (a == b).all() and (a != c).any()


def test_asymmetric_cifar10_maps_exactly_the_documented_pairs(labels):
    noisy = noise.asymmetric_noise(labels, 0.4, noise.ASYM_CIFAR10, seed=0)
    changed = noisy != labels
    pairs = set(zip(labels[changed].tolist(), noisy[changed].tolist()))
    assert pairs == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}
    for src in noise.ASYM_CIFAR10:
        n_src = (labels == src).sum()
        assert changed[labels == src].sum() == round(0.4 * n_src)
    for other in set(range(C)) - set(noise.ASYM_CIFAR10):
        assert not changed[labels == other].any()


def test_asymmetric_fashion_mnist_pairs(labels):
    noisy = noise.asymmetric_noise(labels, 0.4, noise.ASYM_FASHION_MNIST, seed=0)
    changed = noisy != labels
    assert set(zip(labels[changed].tolist(), noisy[changed].tolist())) == set(noise.ASYM_FASHION_MNIST.items())


def test_cifar100_superclass_map_matches_cifar100n_file(shared_data):
    import csv

    with open(shared_data / "cifar_n" / "CIFAR-100_human.labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    fine = np.array([int(r["clean_label"]) for r in rows])
    coarse = np.array([int(r["clean_coarse_label"]) for r in rows])
    assert (noise.CIFAR100_COARSE[fine] == coarse).all()


def test_cifar100_asym_is_a_cycle_within_superclasses():
    m = noise.cifar100_asym_map()
    assert sorted(m) == list(range(100)) and sorted(m.values()) == list(range(100))
    for src, dst in m.items():
        assert src != dst and noise.CIFAR100_COARSE[src] == noise.CIFAR100_COARSE[dst]


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_instance_noise_rate_and_determinism(rate):
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 4000)
    x = rng.integers(0, 256, (4000, 1, 8, 8), dtype=np.uint8)
    a = noise.instance_noise(y, x, rate, C, seed=3)
    assert abs((a != y).mean() - rate) < 0.03
    assert (a == noise.instance_noise(y, x, rate, C, seed=3)).all()
    # the flip target depends on the image: two identical-label samples do not share one distribution
    assert len(np.unique(a[(y == 0) & (a != 0)])) > 1


@pytest.mark.parametrize("spec", ["sym", "sym100", "sym-5", "gauss40", "asym", "", "40"])
def test_bad_noise_specs(spec):
    with pytest.raises(UsageError, match="--noise"):
        noise.parse_noise(spec)


def test_parse_noise():
    assert noise.parse_noise("sym40") == ("sym", 0.4)
    assert noise.parse_noise("asym20") == ("asym", 0.2)
    assert noise.parse_noise("clean") == ("clean", 0.0)


def test_asym_unknown_dataset():
    with pytest.raises(UsageError, match="no asymmetric mapping"):
        noise.make_noisy_labels("asym20", np.zeros(10, int), C, 0, "clothing1m")


def test_noise_file_cifar10n(shared_data):
    path = shared_data / "cifar_n" / "CIFAR-10_human.labels.csv"
    worse = noise.load_noise_file(path, 50000, 10, column="worse_label")
    clean = noise.load_noise_file(path, 50000, 10, column="clean_label")
    assert abs((worse != clean).mean() - 0.4021) < 0.001  # CIFAR-10N "worst": 40.21% noise
    with pytest.raises(MissingError, match="choose one"):
        noise.load_noise_file(path, 50000, 10)
    with pytest.raises(MissingError, match="has 50000 labels"):
        noise.load_noise_file(path, 60000, 10, column="worse_label")
    path100 = shared_data / "cifar_n" / "CIFAR-100_human.labels.csv"
    with pytest.raises(MissingError, match="100 classes|10 classes"):
        noise.load_noise_file(path100, 50000, 10, column="noisy_label")


def test_noise_file_malformed(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("1\n2\nthree\n")
    with pytest.raises(MissingError, match="malformed"):
        noise.load_noise_file(p, 3, 10)
    p.write_text("1\n2\n3\n")
    assert noise.load_noise_file(p, 3, 10).tolist() == [1, 2, 3]
    with pytest.raises(MissingError, match="no such file"):
        noise.load_noise_file(tmp_path / "nope.npy", 3, 10)


# ---- issue 28: instance noise on raw pixels (PES/CDR) or /255; CIFAR-100's two asymmetric maps
def fmnist_like(n: int = 2000, seed: int = 0) -> np.ndarray:
    """28x28 uint8 images like Fashion-MNIST's: a black background and one bright object (a random
    rectangle of values 60-255) covering a third to two thirds of the image."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, 28, 28), dtype=np.uint8)
    for i in range(n):
        h, w = rng.integers(12, 24, 2)
        top, left = rng.integers(0, 28 - h + 1), rng.integers(0, 28 - w + 1)
        x[i, 0, top:top + h, left:left + w] = rng.integers(60, 256, (h, w))
    return x


def top_flip_share(images: np.ndarray, labels: np.ndarray, pixels: str) -> float:
    """The share of samples whose flip target has probability > 0.99 (the W of instance_noise(seed=0))."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((C, int(np.prod(images.shape[1:])), C)).astype(np.float32)
    t = noise.instance_flip_targets(labels, images, w, pixels)
    assert np.allclose(t.sum(1), 1, atol=1e-5) and (t[np.arange(len(labels)), labels] == 0).all()
    return float((t.max(1) > 0.99).mean())


def test_instance_noise_raw_pixels_make_the_flip_target_the_top_class():
    x, y = fmnist_like(), np.random.default_rng(1).integers(0, C, 2000)
    raw, unit = top_flip_share(x, y, "raw"), top_flip_share(x, y, "unit")
    assert raw > 0.97 and unit < 0.75, (raw, unit)  # raw: a sharp softmax (scores x255)


def test_instance_noise_pixels_on_fashion_mnist():
    """Issue 28's numbers: on a 4,000-image Fashion-MNIST subset 99.8% of the samples have a top flip
    probability above 0.99 on raw pixels, 52% divided by 255."""
    from common.data import load_fashion_mnist

    try:
        d = load_fashion_mnist()
    except MissingError as e:
        pytest.skip(str(e))
    sub = np.sort(np.random.default_rng(0).permutation(60000)[:4000])
    x, y = d.train_x[sub].numpy(), d.train_y[sub].numpy()
    raw, unit = top_flip_share(x, y, "raw"), top_flip_share(x, y, "unit")
    assert raw > 0.99 and 0.4 < unit < 0.65, (raw, unit)


def test_instance_noise_unit_is_raw_on_images_divided_by_255():
    x, y = fmnist_like(500), np.random.default_rng(1).integers(0, C, 500)
    unit = noise.instance_noise(y, x, 0.4, C, seed=5, pixels="unit")
    assert (unit == noise.instance_noise(y, x.astype(np.float32) / 255.0, 0.4, C, seed=5, pixels="raw")).all()
    raw = noise.instance_noise(y, x, 0.4, C, seed=5)  # the default: raw
    assert (raw == noise.instance_noise(y, x, 0.4, C, seed=5, pixels="raw")).all() and (raw != unit).any()
    # the flip rates q_i are the same draws: the realized rates agree closely
    assert abs((raw != y).mean() - (unit != y).mean()) < 0.03
    labels, info = noise.make_noisy_labels("inst40", y, C, 5, "fashion_mnist", images=x)
    assert info["inst_pixels"] == "raw" and (labels == raw).all()
    assert noise.make_noisy_labels("inst40", y, C, 5, "fashion_mnist", images=x, inst_pixels="unit")[1][
        "inst_pixels"] == "unit"


def test_cifar100_block5_map_flips_to_the_next_label_of_its_block():
    m = noise.cifar100_block5_map()
    assert sorted(m) == list(range(100)) and sorted(m.values()) == list(range(100))
    assert [m[c] for c in range(10)] == [1, 2, 3, 4, 0, 6, 7, 8, 9, 5] and m[99] == 95
    for c in range(100):
        assert m[c] // 5 == c // 5 and m[c] != c
    assert noise.asym_map("cifar100", "block5") == m and noise.asym_map("cifar100") == noise.cifar100_asym_map()
    assert m != noise.cifar100_asym_map()
    y = np.random.default_rng(0).integers(0, 100, 20000)
    noisy, info = noise.make_noisy_labels("asym40", y, 100, 0, "cifar100", cifar100_asym="block5")
    changed = noisy != y
    assert all(m[a] == b for a, b in zip(y[changed].tolist(), noisy[changed].tolist()))
    assert abs(changed.mean() - 0.4) < 0.01 and info["cifar100_asym"] == "block5"
    assert noise.make_noisy_labels("asym40", y, 100, 0, "cifar100")[1]["cifar100_asym"] == "superclass"
    assert "cifar100_asym" not in noise.make_noisy_labels("asym40", y % 10, 10, 0, "cifar10")[1]
    with pytest.raises(UsageError, match="--cifar100-asym"):
        noise.asym_map("cifar100", "blocks")
