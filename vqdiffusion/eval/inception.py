"""The FID Inception-v3: the network of pytorch-fid and torch-fidelity, to run their weights file without either.

``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity publishes the same weights as
``weights-inception-2015-12-05-6726825d.pth``) is TensorFlow's ``inception-2015-12-05`` graph, the network of
the original TF FID and IS code, converted to a state dict in the layout of torchvision's ``Inception3``
without the auxiliary head and with 1008 classes.  :class:`FIDInceptionV3` has exactly that layout, so the
file loads with ``load_state_dict(strict=True)``, and runs the graph's pooling, where it differs from
torchvision's Inception:

* the average pools inside ``Mixed_5b``-``Mixed_5d`` (block A), ``Mixed_6b``-``Mixed_6e`` (block C) and
  ``Mixed_7b`` (block E) leave the zero padding out of the mean (``count_include_pad=False``);
* the pool branch of the last block, ``Mixed_7c``, max-pools (3 x 3, stride 1, padding 1) instead;
* the reduction blocks ``Mixed_6a`` and ``Mixed_7a`` max-pool 3 x 3 with stride 2, as torchvision's.

Every convolution has no bias and is followed by BatchNorm (eps 0.001) and ReLU.

The input protocol is pytorch-fid's (``InceptionV3(resize_input=True, normalize_input=True)``): uint8 RGB is
divided by 255, resized to 299 x 299 with ``F.interpolate(mode="bilinear", align_corners=False)`` (no
antialiasing; the identity for 299 x 299 images) and mapped from [0, 1] to [-1, 1] by ``2 x - 1``.  The
features are the 2048-d global average pool after ``Mixed_7c`` ("pool3", pytorch-fid's block 3).  For the
Inception Score, :meth:`FIDInceptionV3.logits` gives the 1008 class logits ``pool3 @ fc.weight.T``, without
the output bias by default: torch-fidelity's ``logits_unbiased`` (torchmetrics' default IS feature), as the
original IS code, which takes the softmax of the graph's matmul before the bias is added.

torch-fidelity resizes with its own TensorFlow-1-compatible bilinear interpolation and scales by
(x - 128) / 128, so its features differ slightly from pytorch-fid's, and so from ours.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..io import check_finite, check_weights_match, load_weights

__all__ = [
    "NUM_CLASSES",
    "NUM_FEATURES",
    "PROTOCOL",
    "FIDInceptionV3",
    "fid_inception_from_state_dict",
    "load_fid_inception",
]

NUM_FEATURES = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
#: The preprocessing, in words, for reports.
PROTOCOL = (
    "pytorch-fid's: uint8 RGB / 255, resized to 299x299 with F.interpolate(mode='bilinear', align_corners=False, "
    "no antialiasing), scaled from [0, 1] to [-1, 1] by 2x - 1; features: 2048-d pool3; IS: softmax of the 1008 "
    "logits without the fc bias (torch-fidelity's logits_unbiased)"
)


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU: the ``conv`` / ``bn`` pair of every layer."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _mean_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3 x 3 'SAME' average pool: the padded zeros do not count."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35 x 35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | mean pool -> 1x1 (64 + 64 + 96 + pool)."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_mean_pool(x)),
        )
        return torch.cat(parts, dim=1)


class ReductionB(nn.Module):
    """35 -> 17: 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | 3x3 max pool stride 2 (384 + 96 + input)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (
            self.branch3x3(x),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, kernel_size=3, stride=2),
        )
        return torch.cat(parts, dim=1)


class MixedC(nn.Module):
    """17 x 17 block with factorised 7 x 7 convolutions (``c7`` inner channels), 4 x 192 outputs."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = ConvBN(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = ConvBN(c7, 192, row[0], padding=row[1])
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(
                x,
                self.branch7x7dbl_1,
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ),
            self.branch_pool(_mean_pool(x)),
        )
        return torch.cat(parts, dim=1)


class ReductionD(nn.Module):
    """17 -> 8: 1x1 -> 3x3 stride 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2 | 3x3 max pool stride 2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, kernel_size=3, stride=2),
        )
        return torch.cat(parts, dim=1)


class MixedE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs (320 + 768 + 768 + 192 = 2048); ``pool`` is ``"mean"``
    (``Mixed_7b``) or ``"max"`` (``Mixed_7c``, the TF graph's)."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        narrow = self.branch3x3_1(x)
        wide = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _mean_pool(x) if self.pool == "mean" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        parts = (
            self.branch1x1(x),
            self.branch3x3_2a(narrow),
            self.branch3x3_2b(narrow),
            self.branch3x3dbl_3a(wide),
            self.branch3x3dbl_3b(wide),
            self.branch_pool(pooled),
        )
        return torch.cat(parts, dim=1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 in pytorch-fid's state-dict layout; ``forward(uint8 images)`` -> pool3 ``[B, 2048]``.

    Build it, then load the weights (:func:`load_fid_inception`); the constructor leaves PyTorch's default
    initialisation, which is no Inception.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, c7=128)
        self.Mixed_6c = MixedC(768, c7=160)
        self.Mixed_6d = MixedC(768, c7=160)
        self.Mixed_6e = MixedC(768, c7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, pool="mean")
        self.Mixed_7c = MixedE(2048, pool="max")
        self.fc = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> float32 ``[B, 3, 299, 299]`` in [-1, 1], as pytorch-fid."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 RGB images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.to(torch.float32) / 255
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """The 2048-d features of preprocessed images (the global average pool after ``Mixed_7c``)."""
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a)
        x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return x.mean(dim=(2, 3))

    def logits(self, features: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
        """The 1008 class logits of pool3 ``features``; without the output bias unless ``bias`` (see module doc)."""
        out = features @ self.fc.weight.t()
        return out + self.fc.bias if bias else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool3(self.preprocess(images))


def _without_batch_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BatchNorm's ``num_batches_tracked`` counters, which the published file does not hold, left out."""
    return {key: value for key, value in state.items() if not key.endswith(".num_batches_tracked")}


def load_fid_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights of a state-dict file (``pt_inception-2015-12-05-*.pth``), in
    eval mode on ``device``, read with ``torch.load(weights_only=True)`` (:func:`vqdiffusion.io.load_weights`)."""
    return fid_inception_from_state_dict(load_weights(path), str(path), device)


def fid_inception_from_state_dict(
    state: dict[str, torch.Tensor], source: str, device: str | torch.device = "cpu"
) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with ``state``: the names and shapes are checked first (ValueError naming the
    first mismatch), then loaded strictly.  The counters ``*.bn.num_batches_tracked`` may be present (a
    ``state_dict()`` of this module) or absent (the published file); they do not affect inference."""
    state = _without_batch_counters(state)
    model = FIDInceptionV3()
    check_weights_match(_without_batch_counters(model.state_dict()), state, f"{source} (FID Inception-v3 state dict)")
    # one float64 sum per tensor is finite exactly when every value is (float32 values cannot overflow it)
    sums = [v.sum(dtype=torch.float64) for v in state.values() if v.is_floating_point()]
    if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
        check_finite(state, source)  # names the tensor
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)
