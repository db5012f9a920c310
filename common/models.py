"""Image backbones (the encoder g of the noisy-label papers).

Every builder returns an `nn.Module` mapping uint8-derived float images [B, C, H, W] to
features [B, out_dim], with `.out_dim` set; the classification and projection heads belong
to the method script. Normalisation by the data set's mean/std happens inside the backbone
(`Normalize` below), so the data pipeline can stay in uint8.

- `resnet18` / `resnet34`: the CIFAR variant (3x3 stem, stride 1, no max-pool), as in
  most noisy-label code bases; the paper does not say which stem it used.
- `preact_resnet18`: pre-activation ResNet-18 (He et al. 2016), DivideMix's backbone.
- `resnet50`: torchvision's ImageNet ResNet-50, with ImageNet weights when `pretrained`.
- `small_cnn`: a 6-conv CNN for 28x28 inputs (Fashion-MNIST CPU runs).
- `cnn_fc`: conv 64 -> conv 128 -> a fully connected 512 layer, for 28x28 inputs (a CNN with a
  fully connected head, which memorises noisy labels where small_cnn's global pooling does not).

Text encoders (transformers) are in common/text_models.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.utils import MissingError, UsageError, autocast

BACKBONES = ("resnet18", "resnet34", "preact_resnet18", "resnet50", "small_cnn", "cnn_fc")


class Normalize(nn.Module):
    """uint8-range or [0,1] float images -> (x/255 - mean) / std, per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, four stages (64-512 channels), global pooling."""

    def __init__(self, block: type, num_blocks: list[int], in_ch: int = 3, preact: bool = False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64) if not preact else nn.Identity()
        layers, cin = [], 64
        for i, (cout, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            for j in range(n):
                layers.append(block(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(512) if preact else nn.Identity()
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = F.relu(self.bn1(out)) if not self.preact else out
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.final_bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class SmallCNN(nn.Module):
    """Three blocks of two 3x3 convolutions (16, 32, 64 channels) with BatchNorm, ReLU and
    2x2 max-pooling, then global average pooling: 72k parameters, for 28x28 inputs. Sized for
    2 CPU cores: LaCoL's three views train at several hundred samples per second."""

    def __init__(self, in_ch: int = 1, width: int = 16):
        super().__init__()
        chans = [in_ch, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(3):
            for j in range(2):
                layers += [nn.Conv2d(chans[i] if j == 0 else chans[i + 1], chans[i + 1], 3, padding=1, bias=False),
                           nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


class CNNFC(nn.Module):
    """Two stages of one 3x3 convolution (64, then 128 channels) with BatchNorm, ReLU and 2x2
    max-pooling (28 -> 14 -> 7), then flatten (128 x 7 x 7) and a fully connected 512 layer with
    ReLU, the encoder's output (out_dim 512): 3.3M parameters, almost all in the fully connected
    layer. For 28x28 inputs (issue 28's reference regime)."""

    def __init__(self, in_ch: int = 1, size: int = 28):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((in_ch, 64), (64, 128)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(128 * (size // 4) ** 2, 512)
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.features(x).flatten(1)))


class _Backbone(nn.Sequential):
    """Normalize -> encoder, exposing the encoder's out_dim."""

    def __init__(self, norm: Normalize, encoder: nn.Module):
        super().__init__(norm, encoder)
        self.out_dim = encoder.out_dim


def build_backbone(name: str, in_ch: int = 3, mean_std: tuple | None = None, pretrained: bool = False,
                   width: int = 16) -> nn.Module:
    """Build the encoder g. `mean_std` = ((means...), (stds...)) for the input normalisation;
    `width` = channels of small_cnn's first block (doubled in each of the next two)."""
    if name not in BACKBONES:
        raise UsageError(f"--backbone {name}: allowed are {', '.join(BACKBONES)}")
    mean, std = mean_std or ((0.5,) * in_ch, (0.25,) * in_ch)
    if name == "resnet18":
        enc = CifarResNet(BasicBlock, [2, 2, 2, 2], in_ch)
    elif name == "resnet34":
        enc = CifarResNet(BasicBlock, [3, 4, 6, 3], in_ch)
    elif name == "preact_resnet18":
        enc = CifarResNet(PreActBlock, [2, 2, 2, 2], in_ch, preact=True)
    elif name == "small_cnn":
        enc = SmallCNN(in_ch, width)
    elif name == "cnn_fc":
        enc = CNNFC(in_ch)
    else:
        enc = torchvision_resnet50(pretrained)
    return _Backbone(Normalize(mean, std), enc)


def torchvision_resnet50(pretrained: bool) -> nn.Module:
    """torchvision's ResNet-50 without its fc layer; ImageNet-1k weights (V1, as in the
    Clothing1M literature) when `pretrained`. Offline and not cached: MissingError."""
    import torchvision

    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        net = torchvision.models.resnet50(weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise MissingError(f"resnet50: ImageNet weights {weights} not in the torch hub cache and the download "
                           f"failed ({type(e).__name__}); run once with network access, or pass "
                           "--no-pretrained for random initialisation") from None
    net.fc = nn.Identity()
    net.out_dim = 2048
    return net


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def channels_last(device, amp_dtype) -> bool:
    """Channels-last memory where it is faster: on CUDA, and under bf16 autocast on a CPU (oneDNN's
    bf16 convolutions; a CE step of the small CNN at batch 384 was 1.33x faster). fp32 on a CPU
    keeps the default layout, and its numbers."""
    return device.type == "cuda" or amp_dtype is not None


def to_input(x: torch.Tensor, device: torch.device, amp_dtype) -> torch.Tensor:
    """A batch of images on the device, channels-last where that is faster (`channels_last`)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last(device, amp_dtype) else x


@torch.no_grad()
def predict_logits(forward, model: nn.Module, loader, device: torch.device, amp_dtype) -> tuple[torch.Tensor, ...]:
    """`forward(x)`'s logits (fp32, on the CPU) for the first view of every item of `loader`, with the
    labels and indices, `model` in eval mode (and back in train mode after)."""
    model.eval()
    out = []
    for x, *_views, y, idx in loader:
        x = to_input(x, device, amp_dtype)
        with autocast(device, amp_dtype):
            logits = forward(x)
        out.append((logits.float().cpu(), y, idx))
    model.train()
    logits, y, idx = (torch.cat(t) for t in zip(*out))
    return logits, y, idx
