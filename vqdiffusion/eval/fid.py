"""FID, KID and Inception Score of a folder of images, with a local Inception weights file.

The metrics are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``,
``InceptionScore``), fed with features that this module extracts once per folder (torchmetrics' documented
custom-feature input).  Nothing is downloaded: the Inception network comes from the file the user gives.

Two kinds of file are accepted (:func:`load_inception`):

* ``"torchscript"``: NVIDIA's TorchScript translation of TensorFlow's ``inception-2015-12-05`` graph
  (``inception-2015-12-05.pt``, the network of StyleGAN2-ADA's and StyleGAN3's metrics and of clean-fid).
  It takes the uint8 images as they are and does its own resizing (bilinear to 299 x 299) and scaling
  ((x - 128) / 128); features are ``net(x, return_features=True)`` (2048-d pool features), IS uses
  ``net(x, no_output_bias=True)`` (1008-way softmax without the output bias, as the original IS code).
  Needs nothing beyond torch.
* ``"pytorch-fid"``: the state dict of the FID Inception of pytorch-fid and torch-fidelity
  (``pt_inception-2015-12-05-6726825d.pth``), run by our own :class:`~vqdiffusion.eval.inception.FIDInceptionV3`
  (the same TensorFlow graph as the TorchScript file) with pytorch-fid's protocol: uint8 / 255, bilinear
  ``F.interpolate`` to 299 x 299 (``align_corners=False``, no antialiasing), ``2 x - 1``; 2048-d pool3
  features; IS over the softmax of the 1008 logits without the output bias (torch-fidelity's
  ``logits_unbiased``).  Needs nothing beyond torch (neither torch-fidelity nor torchvision).

Images are read as 8-bit RGB (the quantisation of the PNG files ``sample-set`` writes) and never resized
here: each network resizes to 299 x 299 as stated above.  Reference statistics are saved as ``.npz`` with
``mu`` and ``sigma`` (float64), the layout pytorch-fid and clean-fid read and write, plus our metadata and,
for KID, the features; an ``.npz`` from those tools with ``mu`` and ``sigma`` loads too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import atomic_write_with, load_weights
from .fid_reference import (  # ReferenceStatsError re-exported: its old home
    ReferenceStatsError,
    _check_covariance,
    _meta,
    _num_images,
    _real_array,
)
from .folder import ImageBatches, list_images
from .inception import PROTOCOL, FIDInceptionV3, fid_inception_from_state_dict

__all__ = [
    "BACKENDS",
    "FolderFeatures",
    "InceptionNetwork",
    "ReferenceStats",
    "ReferenceStatsError",
    "compute_fid",
    "compute_isc",
    "compute_kid",
    "evaluate_fid",
    "folder_features",
    "load_inception",
]

BACKENDS = ("torchscript", "pytorch-fid")
STATS_FORMAT = "vqdiffusion-fid-reference"
STATS_VERSION = 1
#: How each backend prepares an image; recorded in every report.
PREPROCESSING = {
    "torchscript": "uint8 RGB into the network, which resizes bilinearly to 299x299 (align_corners=False, no "
    "antialiasing) and scales (x - 128) / 128",
    "pytorch-fid": PROTOCOL,
}


def _torchmetrics():
    """torchmetrics' image metrics, with a clear message when they cannot be imported."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "torchmetrics":
            raise ModuleNotFoundError(
                "the fid suite needs torchmetrics: pip install 'vqdiffusion[eval]'", name=err.name
            ) from None
        raise
    except (ImportError, RuntimeError) as err:  # torch-fidelity installed beside a torchvision that fails
        raise RuntimeError(
            f"torchmetrics could not import torch-fidelity ({type(err).__name__}: {err}); uninstall torch-fidelity "
            "or install a torchvision built for this torch"
        ) from None
    return FrechetInceptionDistance, KernelInceptionDistance, InceptionScore


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class InceptionNetwork:
    """A loaded feature network: ``features(x)`` -> ``[B, D]`` and ``log_probs(x)`` -> ``[B, C]`` (for IS), both
    float64 on the CPU, from uint8 images ``[B, 3, H, W]``."""

    backend: str
    path: Path
    sha256: str
    device: torch.device
    module: nn.Module

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_log_probs(images, log_probs=False)[0]

    @torch.inference_mode()
    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        out = self.features_and_log_probs(images, log_probs=True)[1]
        assert out is not None
        return out

    @torch.inference_mode()
    def features_and_log_probs(
        self, images: torch.Tensor, *, log_probs: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both at once: our own network computes the pool features once for both."""
        x = images.to(self.device)
        n = x.shape[0]
        if self.backend == "torchscript":
            features = self.module(x, return_features=True).reshape(n, -1)
            if not log_probs:
                return features.double().cpu(), None
            probs = self.module(x, no_output_bias=True).reshape(n, -1).double()
            return features.double().cpu(), probs.clamp_min(1e-30).log().cpu()
        assert isinstance(self.module, FIDInceptionV3)
        features = self.module(x)
        if not log_probs:
            return features.double().cpu(), None
        logits = self.module.logits(features, bias=False)
        return features.double().cpu(), logits.double().log_softmax(dim=1).cpu()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "file": str(self.path),
            "sha256": self.sha256,
            "preprocessing": PREPROCESSING[self.backend],
        }


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionNetwork:
    """Load the Inception network from a local file: a TorchScript archive (``inception-2015-12-05.pt``), or
    a state dict of the FID Inception (``pt_inception-2015-12-05-*.pth``), run by our
    :class:`~vqdiffusion.eval.inception.FIDInceptionV3`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    device = torch.device(device)
    sha = file_sha256(path)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript, but the published Inception files are TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise ValueError(f"{path}: not a loadable TorchScript Inception ({str(err).splitlines()[0]})") from None
        _check_torchscript_inception(path, module)
        return InceptionNetwork("torchscript", path, sha, device, module)
    try:
        state = load_weights(path)
    except ValueError:
        raise ValueError(
            f"{path} is neither a TorchScript Inception (inception-2015-12-05.pt) nor a weights-only state dict "
            "(pt_inception-2015-12-05-*.pth)"
        ) from None
    if "fc.weight" not in state:
        raise ValueError(f"{path}: a state dict without 'fc.weight' is not the FID Inception's")
    return InceptionNetwork("pytorch-fid", path, sha, device, fid_inception_from_state_dict(state, str(path), device))


#: The keyword arguments of the forward of NVIDIA's TorchScript Inception that :class:`InceptionNetwork` uses.
_TORCHSCRIPT_ARGUMENTS = ("return_features", "no_output_bias")


def _check_torchscript_inception(path: Path, module: Any) -> None:
    """A TorchScript file whose ``forward`` lacks the Inception's keyword arguments is another network."""
    try:
        names = {argument.name for argument in module.forward.schema.arguments}
    except (AttributeError, RuntimeError):
        names = set()
    missing = [name for name in _TORCHSCRIPT_ARGUMENTS if name not in names]
    if missing:
        raise ValueError(
            f"{path} is a TorchScript network but not the Inception of inception-2015-12-05.pt (its forward has no "
            f"{', '.join(missing)} argument); give that file or pt_inception-2015-12-05-*.pth"
        )


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with ``<name>/code/`` entries (a ``torch.save`` zip has none)."""
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


@dataclasses.dataclass
class FolderFeatures:
    """Features of one folder: ``features [n, D]`` float64, ``log_probs [n, C]`` (IS) or None."""

    folder: Path
    num_images: int
    image_size: tuple[int, int]
    features: torch.Tensor
    log_probs: torch.Tensor | None = None


def folder_features(
    folder: str | os.PathLike,
    network: InceptionNetwork,
    *,
    batch_size: int = 50,
    log_probs: bool = False,
    progress: bool = True,
    what: str = "folder",
) -> FolderFeatures:
    """Run ``network`` over every image of ``folder`` (see :class:`~vqdiffusion.eval.folder.ImageBatches`)."""
    paths = list_images(folder, what=what)
    if len(paths) < batch_size:
        raise ValueError(
            f"{what} {folder} holds {len(paths)} images, fewer than the batch size {batch_size}; FID needs many "
            "images (the papers use 30,000 to 50,000), so this is taken as a wrong folder (lower --batch-size to "
            "evaluate a small folder anyway)"
        )
    batches = ImageBatches(paths, batch_size, what=what)
    features, logits = [], []
    for images in tqdm(batches, desc=f"inception: {Path(folder).name}", unit="batch", disable=not progress):
        found, found_log_probs = network.features_and_log_probs(images, log_probs=log_probs)
        features.append(found)
        if found_log_probs is not None:
            logits.append(found_log_probs)
    assert batches.size is not None
    return FolderFeatures(
        Path(folder), len(paths), batches.size, torch.cat(features), torch.cat(logits) if log_probs else None
    )


@dataclasses.dataclass
class ReferenceStats:
    """Mean and covariance of the reference features (and the features themselves, for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None
    meta: dict[str, Any]
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, found: FolderFeatures, network: InceptionNetwork, *, keep_features: bool) -> ReferenceStats:
        f = found.features.numpy()
        meta = {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "source": str(found.folder),
            "image_size": list(found.image_size),
            "inception": network.describe(),
        }
        return cls(
            f.mean(axis=0),
            np.cov(f, rowvar=False),
            found.num_images,
            meta,
            f.astype(np.float32) if keep_features else None,
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"reference statistics are saved as .npz, got {path}")
        arrays: dict[str, np.ndarray] = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta))}
        if self.num_images is not None:
            arrays["num_images"] = np.array(self.num_images)
        if self.features is not None:
            arrays["features"] = self.features

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return atomic_write_with(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        """Read and check an ``.npz`` of statistics (every array checked before any FID work)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            detail = "an empty file" if path.is_file() and path.stat().st_size == 0 else str(err)
            raise ReferenceStatsError(
                f"cannot read reference statistics {path}: {detail}; give an .npz saved by --save-reference-stats"
            ) from None
        if "mu" not in arrays or "sigma" not in arrays:
            raise ReferenceStatsError(
                f"{path}: reference statistics need 'mu' and 'sigma' arrays, found {sorted(arrays)}"
            )
        mu, sigma = _real_array(path, "mu", arrays["mu"]), _real_array(path, "sigma", arrays["sigma"])
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ReferenceStatsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        _check_covariance(path, sigma)
        features = arrays.get("features")
        if features is not None:
            features = _real_array(path, "features", features)
            if features.ndim != 2 or features.shape[1] != mu.shape[0]:
                raise ReferenceStatsError(
                    f"{path}: 'features' has shape {features.shape}, expected [n, {mu.shape[0]}] like mu"
                )
        return cls(mu, sigma, _num_images(path, arrays.get("num_images")), _meta(path, arrays.get("meta")), features)


def _passthrough(num_features: int) -> nn.Module:
    """The custom "feature extractor" handed to torchmetrics: our features are already extracted."""
    module = nn.Identity()
    module.num_features = num_features
    return module


def compute_fid(samples: torch.Tensor, reference: ReferenceStats) -> float:
    """torchmetrics' FID between the sample features ``[n, D]`` and the reference mean and covariance.

    The reference enters as torchmetrics' running sums rebuilt from (mu, sigma): with n' images,
    sum = n' mu and sum of outer products = (n' - 1) sigma + n' mu mu^T, which torchmetrics turns back into
    mu and sigma (n' = 2 when the file does not say; the value is the same up to rounding).
    """
    fid_class, _, _ = _torchmetrics()
    dim = samples.shape[1]
    if reference.mu.shape[0] != dim:
        raise ValueError(f"the reference statistics have {reference.mu.shape[0]} features, the samples {dim}")
    if samples.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 sample images, got {samples.shape[0]}")
    metric = fid_class(feature=_passthrough(dim))
    n = reference.num_images or 2
    mu = torch.from_numpy(reference.mu)
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * torch.from_numpy(reference.sigma) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n)
    metric.update(samples, real=False)
    return float(metric.compute())


def compute_kid(
    samples: torch.Tensor, reference: torch.Tensor, *, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """torchmetrics' KID (polynomial kernel of degree 3, gamma = 1 / D, coef 1): mean and std over subsets."""
    _, kid_class, _ = _torchmetrics()
    smallest = min(samples.shape[0], reference.shape[0])
    if subset_size > smallest:
        raise ValueError(f"--kid-subset-size {subset_size} is larger than the smaller set ({smallest} images)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = kid_class(feature=_passthrough(samples.shape[1]), subsets=subsets, subset_size=subset_size)
    metric.update(reference, real=True)
    metric.update(samples, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def compute_isc(log_probs: torch.Tensor, *, splits: int, seed: int) -> tuple[float, float]:
    """torchmetrics' Inception Score over ``splits`` splits of the (shuffled) samples: mean and std."""
    _, _, isc_class = _torchmetrics()
    if log_probs.shape[0] < splits:
        raise ValueError(f"--isc-splits {splits} is more than the {log_probs.shape[0]} sample images")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = isc_class(feature=_passthrough(log_probs.shape[1]), splits=splits)
    metric.update(log_probs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def evaluate_fid(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    inception_weights: str | os.PathLike,
    *,
    kid: bool = False,
    isc: bool = False,
    batch_size: int = 50,
    device: str = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    seed: int = 0,
    save_reference: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FID (and KID, IS when asked) of the images in ``samples`` against ``reference``, a folder of images or
    an ``.npz`` of statistics; returns the report (every setting that affects the numbers).

    ``save_reference`` writes the reference statistics of a reference folder (with the features when ``kid``)
    for later runs.
    """
    _torchmetrics()  # a missing torchmetrics is named before any work
    import torchmetrics

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    reference = Path(reference)
    if not reference.exists():
        raise FileNotFoundError(f"reference {reference} not found (a folder of images or an .npz of statistics)")
    if not reference.is_dir() and save_reference is not None:
        raise ValueError("--save-reference-stats needs a reference folder, not statistics")
    loaded = None if reference.is_dir() else ReferenceStats.load(reference)  # checked before any work
    network = load_inception(inception_weights, device)
    sample_features = folder_features(
        samples, network, batch_size=batch_size, log_probs=isc, progress=progress, what="samples folder"
    )
    if loaded is None:
        found = folder_features(reference, network, batch_size=batch_size, progress=progress, what="reference folder")
        stats = ReferenceStats.from_features(found, network, keep_features=kid)
        reference_info = {"kind": "folder", "path": str(reference), "num_images": found.num_images}
        reference_info["image_size"] = list(found.image_size)
    else:
        stats = loaded
        theirs = stats.meta.get("inception", {}).get("sha256")
        if theirs is not None and theirs != network.sha256:
            raise ValueError(
                f"{reference} was computed with another Inception file (sha256 {theirs[:12]}..., this one "
                f"{network.sha256[:12]}...); recompute it from the reference folder"
            )
        reference_info = {"kind": "statistics", "path": str(reference), "num_images": stats.num_images, **stats.meta}
        if theirs is None:
            reference_info["note"] = (
                "statistics from another tool: the FID is comparable only if they were computed with the same "
                "Inception weights and resizing"
            )
    report: dict[str, Any] = {
        "suite": "fid",
        "metrics": {"fid": compute_fid(sample_features.features, stats)},
        "samples": {
            "path": str(sample_features.folder),
            "num_images": sample_features.num_images,
            "image_size": list(sample_features.image_size),
        },
        "reference": reference_info,
        "inception": {**network.describe(), "feature_dim": int(sample_features.features.shape[1])},
        "settings": {"batch_size": batch_size, "device": str(network.device), "seed": seed},
        "library": {
            "metrics": f"torchmetrics {torchmetrics.__version__}",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if kid:
        if stats.features is None:
            raise ValueError(f"{reference} holds no reference features for KID; save the statistics with --kid")
        mean, std = compute_kid(
            sample_features.features,
            torch.from_numpy(np.asarray(stats.features, dtype=np.float64)),
            subsets=kid_subsets,
            subset_size=kid_subset_size,
            seed=seed,
        )
        report["metrics"].update(kid_mean=mean, kid_std=std)
        report["settings"]["kid"] = {
            "subsets": kid_subsets,
            "subset_size": kid_subset_size,
            "kernel": "polynomial (x.y / D + 1)^3",
        }
    if isc:
        assert sample_features.log_probs is not None
        mean, std = compute_isc(sample_features.log_probs, splits=isc_splits, seed=seed)
        report["metrics"].update(isc_mean=mean, isc_std=std)
        report["settings"]["isc"] = {"splits": isc_splits, "classes": int(sample_features.log_probs.shape[1])}
    if save_reference is not None:
        report["reference"]["saved_to"] = str(stats.save(save_reference))
    return report
