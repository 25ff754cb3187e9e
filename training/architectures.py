"""Architectures: CIFAR-sized classifiers built by name, whose input is float NCHW in [0, 1] pixel space.

Each is registered with `@register_architecture(name)`; `list_architectures()` names them and
`create_model(name, num_classes, **kwargs)` builds one. (Deployed model versions are the service's
`ModelRegistry`, a different thing.)

Every model normalises its input itself (CIFAR mean/std as buffers, the first step of `features`), so
attacks, ε and exported ONNX graphs all live in [0, 1]. Every model exposes

- `features(x) -> (N, D)`: penultimate features (Mahalanobis needs them),
- `head`: the final `nn.Linear`, with `forward(x) == head(features(x))`,
- `model_config`: `{"name", "num_classes", **kwargs}` so `create_model(**model_config)` rebuilds it,
- `mean`, `std` (tuples) and `input_size = 32`: the preprocessing travels with the model,
- `flip_average` (a constructor keyword of every architecture, recorded in `model_config`): in eval mode the
  model averages the features of the image and of its mirror image, so exported graphs, evaluation, attacks
  and certificates all see the test-time-flipped model that is served.

No in-place ops on views and no data-dependent control flow, so all of them export to ONNX.

    model = create_model("small_cnn", num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_ARCHITECTURES: dict[str, Callable[..., OODNet]] = {}


def register_architecture(name: str) -> Callable[[Callable[..., OODNet]], Callable[..., OODNet]]:
    """Decorator: `@register_architecture("resnet18")` on a builder `fn(num_classes, **kwargs) -> OODNet`."""

    def deco(fn: Callable[..., OODNet]) -> Callable[..., OODNet]:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[name] = fn
        return fn

    return deco


_COMPOSED = {"guarded"}  # built from trained models by `oodguard guard`, never trained themselves


def list_architectures() -> list[str]:
    """The trainable architectures (`--model`); `create_model` also builds the composed `guarded`."""
    return sorted(set(_ARCHITECTURES) - _COMPOSED)


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> OODNet:
    """Build a registered model; unknown names raise ValueError listing the valid ones."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_architectures())}")
    # (guarded is not listed: it is composed by `oodguard guard`, not trained)
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    model = _ARCHITECTURES[name](num_classes=int(num_classes), **kwargs)
    model.model_config = {"name": name, "num_classes": int(num_classes), **kwargs}
    return model


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean/std are buffers so they are saved and exported with the model."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class OODNet(nn.Module):
    """Base class: normalise -> `body` (to pooled penultimate features) -> `head` (linear)."""

    input_size = 32

    def __init__(self, feature_dim: int, num_classes: int, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 flip_average: bool = False):
        super().__init__()
        # test-time flip averaging: in eval mode the features (so the logits) are the mean of the image's and
        # its mirror image's; training (and its attack) sees one view, the flips are in the augmentation
        self.flip_average = bool(flip_average)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.normalize = Normalize(self.mean, self.std)
        self.head = nn.Linear(feature_dim, num_classes)
        self.model_config: dict[str, Any] = {}

    def body(self, x: torch.Tensor) -> torch.Tensor:  # normalised NCHW -> (N, feature_dim)
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.normalize(x))
        if self.flip_average and not self.training:
            h = (h + self.body(self.normalize(torch.flip(x, dims=(3,))))) / 2
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def _conv_bn(cin: int, cout: int, stride: int = 1, act: str = "relu") -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), _ACTIVATIONS[act]()]


# -- small CNN (default) ----------------------------------------------------------------------------


class SmallCNN(OODNet):
    """A compact VGG-style net in the spirit of airbench, sized for 2 CPU cores.

    Stem conv at 32x32, then three stages of [conv -> maxpool -> BN -> ReLU -> conv -> BN -> ReLU] at
    32->16, 16->8, 8->4 (the pool comes right after the first conv, so the expensive second conv runs at
    a quarter of the pixels), then global average pooling. widths=(32, 64, 128): ~0.3 M parameters,
    ~18 M multiply-adds per image; ~1,100 training images/s on 2 idle CPU cores.

    Global *average* pooling, not airbench's max: max-pooled features are large enough that SGD at the
    paper's lr 0.1 without warm-up blew the loss up (4.7 after 20 steps) and stalled at chance for ~100
    steps (21% test accuracy after 300 steps vs 53% with average pooling). `pool="maxavg"` rebuilds
    that first version (max and mean features concatenated) for its existing checkpoints.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), stem: int = 24,
                 pool: str = "avg", act: str = "relu", **kw):
        widths = tuple(int(w) for w in widths)
        if pool not in ("avg", "maxavg"):
            raise ValueError(f"small_cnn pool must be 'avg' or 'maxavg', got {pool!r}")
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(_ACTIVATIONS)}, got {act!r}")
        super().__init__(feature_dim=widths[-1] * (2 if pool == "maxavg" else 1), num_classes=num_classes, **kw)
        self.pool = pool
        layers: list[nn.Module] = _conv_bn(3, stem, act=act)
        cin = stem
        for w in widths:
            layers += [
                nn.Conv2d(cin, w, 3, padding=1, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(w),
                _ACTIVATIONS[act](),
                *_conv_bn(w, w, act=act),
            ]
            cin = w
        self.trunk = nn.Sequential(*layers)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if self.pool == "maxavg":  # the first version's pooling; kept so its checkpoints still load
            return torch.cat([torch.amax(h, dim=(2, 3)), torch.mean(h, dim=(2, 3))], dim=1)
        return torch.mean(h, dim=(2, 3))


@register_architecture("small_cnn")
def small_cnn(num_classes: int = 10, **kwargs: Any) -> OODNet:
    return SmallCNN(num_classes=num_classes, **kwargs)


@register_architecture("fast_cnn")
def fast_cnn(num_classes: int = 10, **kwargs: Any) -> OODNet:
    """The same block design at airbench94's widths (64, 256, 256), GELU: the net fast CIFAR-10 training
    reaches ~94% with in ~10 epochs. ~2.3 M parameters, ~120 M multiply-adds per image; ~280 training
    images/s on 2 CPU cores (batch 256), so an epoch of 45,000 images takes under 3 minutes."""
    return SmallCNN(num_classes=num_classes, **{"widths": (64, 256, 256), "stem": 32, "act": "gelu", **kwargs})


# -- airbench94's network ----------------------------------------------------------------------------


class AirbenchNet(OODNet):
    """airbench94's network (Keller Jordan's fast CIFAR-10 training), made an OODNet.

    A frozen 2x2 *whitening* convolution (24 filters: the eigenvectors of the training images' 2x2-patch
    covariance, scaled by 1/sqrt(eigenvalue), and their negatives; set from data by `data_init`), GELU,
    then three blocks of [conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU] at widths (64, 256, 256),
    global *max* pooling, features scaled by 1/9. What makes it train in ~10 epochs, each a published
    ablation (github.com/KellerJordan/cifar10-zoo, airbench_ablations): the whitening stem, convolutions
    initialised as identities (dirac) on their first `cin` output channels, BatchNorm without a learnt scale
    (its bias is learnt, at a 64x learning rate: `TrainConfig.norm_bias_lr_scale`), and the 1/9 scale, which
    keeps the first logits small at the recipe's large learning rate (`--recipe airbench`).

    ~2.0 M parameters, ~120 M multiply-adds per image: ~175 training images/s on 2 CPU cores (batch 1000).
    The first block's convolution runs at 31x31 (the 2x2 stem has no padding), the rest at 15, 7 and 3.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256), whiten_width: int = 24,
                 feature_scale: float = 1 / 9, **kw):
        widths = tuple(int(w) for w in widths)
        if whiten_width % 2 or not 2 <= whiten_width <= 24:
            raise ValueError(f"whiten_width must be even and in 2..24 (12 patch components, and their negatives), got {whiten_width}")
        super().__init__(feature_dim=widths[-1], num_classes=num_classes, **kw)
        self.feature_scale = float(feature_scale)
        self.whiten = nn.Conv2d(3, whiten_width, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by data_init, never trained
        nn.init.zeros_(self.whiten.bias)
        layers: list[nn.Module] = [self.whiten, nn.GELU()]
        cin = whiten_width
        for w in widths:
            layers += [_dirac_conv(cin, w), nn.MaxPool2d(2), _unscaled_bn(w), nn.GELU(),
                       _dirac_conv(w, w), _unscaled_bn(w), nn.GELU()]
            cin = w
        self.trunk = nn.Sequential(*layers)

    @torch.no_grad()
    def data_init(self, images: torch.Tensor) -> None:
        """Set the whitening filters from float NCHW training images in [0, 1] (a few thousand suffice)."""
        x = self.normalize(images.float().to(self.whiten.weight.device))
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))  # ascending
        k = self.whiten.out_channels // 2
        top = eigenvectors[:, -k:].T / torch.sqrt(eigenvalues[-k:, None] + 5e-4)  # eps: the near-zero components
        filters = top.reshape(k, 3, 2, 2).to(self.whiten.weight.dtype)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.trunk(x), dim=(2, 3)) * self.feature_scale


def _dirac_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])  # identity on the first cin outputs, default init elsewhere
    return conv


def _unscaled_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.weight.requires_grad_(False)  # scale fixed at 1: only the shift is learnt
    return bn


@register_architecture("airbench")
def airbench(num_classes: int = 10, **kwargs: Any) -> OODNet:
    return AirbenchNet(num_classes=num_classes, **kwargs)


# -- a classifier guarded by a detector -----------------------------------------------------------------------


class GuardedNet(nn.Module):
    """A classifier and a separate in-vs-out detector in one module (and so in one exported graph).

    It is the classifier to everything that asks (`forward`, `features`, `head`, `mean`, `std`,
    `num_classes`): accuracy, msp / energy / mahalanobis and their attacks see the classifier alone. The
    detector (a 2-output model trained by `oodguard train --method disc`: output 0 "in-distribution", 1
    "outlier") adds `detector_logits(x)`, whose margin logit(in) - logit(out) is the `detector` score. The two share no
    weights, so the detector's robustness (it is trained adversarially at ε = 8/255) is not spent on the
    classifier's accuracy, and the classifier's weights are exactly the ones it was trained with.
    Built by `oodguard guard` from two runs; `model_config` holds both models' configs.
    """

    input_size = 32

    def __init__(self, num_classes: int, classifier: dict[str, Any], detector: dict[str, Any]):
        super().__init__()
        if int(classifier.get("num_classes", num_classes)) != num_classes:
            raise ValueError(f"guarded: num_classes {num_classes} differs from the classifier's {classifier['num_classes']}")
        if int(detector.get("num_classes", 2)) != 2:
            raise ValueError("guarded: the detector must have 2 outputs (in-distribution, outlier): a --method disc run")
        self.classifier = create_model(**classifier)
        self.detector = create_model(**detector)
        self.mean, self.std = self.classifier.mean, self.classifier.std
        self.num_classes = self.classifier.num_classes
        self.feature_dim = self.classifier.feature_dim

    @property
    def head(self) -> nn.Linear:
        return self.classifier.head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def detector_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector(x)


@register_architecture("guarded")
def guarded(num_classes: int = 10, classifier: dict[str, Any] | None = None,
            detector: dict[str, Any] | None = None) -> nn.Module:
    if classifier is None or detector is None:
        raise ValueError("guarded needs classifier= and detector= model configs (built by `oodguard guard`)")
    return GuardedNet(num_classes, dict(classifier), dict(detector))


# -- CIFAR ResNet-18 --------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(OODNet):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, stages of 64/128/256/512 channels (~11.2 M params)."""

    def __init__(self, num_classes: int = 10, width: int = 64, **kw):
        super().__init__(feature_dim=8 * width, num_classes=num_classes, **kw)
        self.stem = nn.Sequential(*_conv_bn(3, width))
        blocks: list[nn.Module] = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            blocks += [_BasicBlock(cin, cout, 1 if i == 0 else 2), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)


@register_architecture("resnet18")
def resnet18(num_classes: int = 10, **kwargs: Any) -> OODNet:
    return ResNet18(num_classes=num_classes, **kwargs)


# -- WideResNet-40-2 --------------------------------------------------------------------------------


class _WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis), no dropout."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        # as in the original WRN code, the projection shortcut takes the pre-activated input
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(OODNet):
    def __init__(self, num_classes: int = 10, depth: int = 40, widen: int = 2, **kw):
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        super().__init__(feature_dim=widths[3], num_classes=num_classes, **kw)
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for g, stride in zip((1, 2, 3), (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(cin, widths[g], stride if i == 0 else 1))
                cin = widths[g]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.blocks(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


@register_architecture("wrn40_2")
def wrn40_2(num_classes: int = 10, **kwargs: Any) -> OODNet:
    return WideResNet(num_classes=num_classes, **{"depth": 40, "widen": 2, **kwargs})


# -- DenseNet-BC-100 (the paper's model) ------------------------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), output concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([x, y], dim=1)


class _Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(OODNet):
    """DenseNet-BC (bottleneck + compression 0.5, no dropout); depth 100, growth 12 -> ~0.77 M params."""

    def __init__(self, num_classes: int = 10, depth: int = 100, growth: int = 12, reduction: float = 0.5, **kw):
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        layers: list[nn.Module] = []
        c = 2 * growth
        stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        for block in range(3):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if block < 2:
                cout = int(c * reduction)
                layers.append(_Transition(c, cout))
                c = cout
        super().__init__(feature_dim=c, num_classes=num_classes, **kw)
        self.stem = stem
        self.dense = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.dense(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


@register_architecture("densenet100")
def densenet100(num_classes: int = 10, **kwargs: Any) -> OODNet:
    return DenseNetBC(num_classes=num_classes, **{"depth": 100, "growth": 12, **kwargs})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
