"""The reference CNN, layer for layer as the reference project's table lays it out.

    conv 32@3×3 → ReLU → maxpool 2 → conv 64@2×2 → ReLU → maxpool 2 → dropout
    → dense 1024 → ReLU → dropout → dense 10 → softmax

Padding: the table does not say. We use 'same' padding (the convention of TensorFlow's own MNIST
layers tutorial, where a 3136-wide flatten feeds the dense layer): 28×28 → 14×14 → 7×7×64. For
the even 2×2 kernel, 'same' means one extra row and column of zeros on the bottom/right, as
TensorFlow does it; we pad explicitly (`ZeroPad2d`), which avoids PyTorch's padded-copy path.
`padding="valid"` gives the other reading: 26 → 13 → 12 → 6, a 2304-wide flatten.

The softmax is not a layer here: the model returns logits, the loss applies log-softmax
(numerically safer), and `predict_proba` applies softmax for probabilities.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout, the same as `nn.Dropout`, with the mask drawn by `torch.rand`.

    On CPU `nn.Dropout` draws its mask with `bernoulli_`, which is 2.7× slower than comparing a
    `torch.rand` tensor with p (9.2 ms vs 3.4 ms for this model's two dropout layers at batch 256
    on the 2-core CPU); with everything else that fast, that was 15% of a training step.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout rate must be in [0, 1), not {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReferenceCNN(nn.Module):
    def __init__(
        self, dropout: tuple[float, float] = (0.3, 0.7), padding: str = "same", width: float = 1.0
    ) -> None:
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', not {padding!r}")
        if width != 1:  # the reference table's channels, exactly (`width` is for strong and m7)
            raise ValueError(f"the reference layers' channels are fixed: width 1, not {width}")
        same = padding == "same"
        side = 7 if same else 6
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1 if same else 0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.ZeroPad2d((0, 1, 0, 1)) if same else nn.Identity(),
            nn.Conv2d(32, 64, kernel_size=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            Dropout(dropout[0]),
            nn.Flatten(),
            nn.Linear(64 * side * side, 1024),
            nn.ReLU(inplace=True),
            Dropout(dropout[1]),
            nn.Linear(1024, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images [N, 1, 28, 28] → logits [N, 10]."""
        return self.classifier(self.features(x))


def _channels(width: float, *base: int) -> list[int]:
    """The channels of a batch-norm model's layers, `base` multiplied by `--width`."""
    if width <= 0:
        raise ValueError(f"width must be positive, not {width}")
    return [max(1, round(n * width)) for n in base]


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    # No conv bias: the batch norm right after it has one.
    return [nn.Conv2d(c_in, c_out, k, stride, padding, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class StrongCNN(nn.Module):
    """A stronger model for the accuracy work: more and smaller convolutions with batch norm,
    strided 5×5 convolutions instead of max-pooling, little dense weight (the layout of the
    well-known Kaggle MNIST ensembles, whose members average about 99.7%).

        28 → conv 32@3 → 26 → conv 32@3 → 24 → conv 32@5/2 → 12 → dropout
           → conv 64@3 → 10 → conv 64@3 →  8 → conv 64@5/2 →  4 → dropout
           → conv 128@4 → 1 → dropout → dense 10

    About 15 M multiply-adds per image (the reference: 5 M) and 0.3 M parameters (3.2 M).
    `dropout` is (rate after each stage, rate before the classifier); `padding` is unused;
    `width` multiplies every layer's channels (1.5: 48/96/192, about 2.2× the arithmetic).
    """

    def __init__(
        self, dropout: tuple[float, float] = (0.2, 0.2), padding: str = "same", width: float = 1.0
    ) -> None:
        super().__init__()
        a, b, c = _channels(width, 32, 64, 128)
        self.features = nn.Sequential(
            *_conv_bn(1, a, 3), *_conv_bn(a, a, 3), *_conv_bn(a, a, 5, 2, 2),
            Dropout(dropout[0]),
            *_conv_bn(a, b, 3), *_conv_bn(b, b, 3), *_conv_bn(b, b, 5, 2, 2),
            Dropout(dropout[0]),
            *_conv_bn(b, c, 4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), Dropout(dropout[1]), nn.Linear(c, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class M7CNN(nn.Module):
    """A model unlike the strong one, for ensembles whose members differ in architecture (An et
    al., 2020, average three such layouts): four unpadded 7×7 convolutions with batch norm, no
    pooling and no striding, their M7 layout narrowed to a third of its channels so that it
    costs what the strong model costs on a CPU.

        28 → conv 16@7 → 22 → conv 32@7 → 16 → dropout → conv 48@7 → 10 → dropout
           → conv 64@7 → 4 → dropout → dense 10

    About 17 M multiply-adds per image and 0.26 M parameters. `dropout` is (rate after the
    second and third convolutions, rate before the classifier); `padding` is unused; `width`
    multiplies every layer's channels.
    """

    def __init__(
        self, dropout: tuple[float, float] = (0.2, 0.2), padding: str = "same", width: float = 1.0
    ) -> None:
        super().__init__()
        a, b, c, d = _channels(width, 16, 32, 48, 64)
        self.features = nn.Sequential(
            *_conv_bn(1, a, 7), *_conv_bn(a, b, 7), Dropout(dropout[0]),
            *_conv_bn(b, c, 7), Dropout(dropout[0]), *_conv_bn(c, d, 7),
        )
        self.classifier = nn.Sequential(nn.Flatten(), Dropout(dropout[1]), nn.Linear(d * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# Keys: config.MODEL_NAMES, in order.
MODELS = {"reference": ReferenceCNN, "strong": StrongCNN, "m7": M7CNN}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(name: str = "reference", **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    return MODELS[name](**kwargs)
