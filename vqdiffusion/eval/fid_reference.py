"""The checks of reference FID statistics read from an ``.npz`` (:meth:`vqdiffusion.eval.fid.ReferenceStats.load`):
real, finite arrays, a symmetric positive semi-definite covariance, an optional image count and metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ReferenceStatsError"]


class ReferenceStatsError(ValueError):
    """A reference ``.npz`` that is not usable statistics (names the file, the array and the fix)."""


_RECOMPUTE = "recompute the statistics from the reference folder (--save-reference-stats)"


def _real_array(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    """``array`` as float64, refused unless it is real numbers, all finite."""
    if array.dtype.kind not in "biuf":
        raise ReferenceStatsError(f"{path}: '{name}' holds {array.dtype} values, not real numbers; {_RECOMPUTE}")
    values = array.astype(np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        what = "is empty" if values.size == 0 else "holds NaN or infinite values"
        raise ReferenceStatsError(f"{path}: '{name}' {what}; {_RECOMPUTE}")
    return values


def _check_covariance(path: Path, sigma: np.ndarray) -> None:
    """A covariance is symmetric and positive semi-definite (both within float64 rounding of its scale)."""
    scale = float(np.abs(sigma).max()) or 1.0
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > 1e-6 * scale:
        raise ReferenceStatsError(
            f"{path}: 'sigma' is not symmetric (|sigma - sigma^T| up to {asymmetry:.3g}), so not a covariance; "
            f"{_RECOMPUTE}"
        )
    smallest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min())
    if smallest < -1e-6 * scale:
        raise ReferenceStatsError(
            f"{path}: 'sigma' has a negative eigenvalue ({smallest:.3g}), so it is not a covariance; {_RECOMPUTE}"
        )


def _num_images(path: Path, array: np.ndarray | None) -> int | None:
    """The optional ``num_images``: one integer >= 2 (a covariance needs two images)."""
    if array is None:
        return None
    if array.shape != () or array.dtype.kind not in "iu" or int(array) < 2:
        shown = array.tolist() if array.size <= 4 else f"an array of shape {array.shape}"
        raise ReferenceStatsError(
            f"{path}: 'num_images' must be one integer >= 2, got {shown!r} ({array.dtype}); {_RECOMPUTE}"
        )
    return int(array)


def _meta(path: Path, array: np.ndarray | None) -> dict[str, Any]:
    """The optional ``meta``: a JSON object in a 0-d string array (as :meth:`ReferenceStats.save` writes it)."""
    if array is None:
        return {"format": "foreign (mu, sigma only)"}
    try:
        meta = json.loads(str(array)) if array.shape == () and array.dtype.kind == "U" else None
    except (json.JSONDecodeError, RecursionError):
        meta = None
    inception = meta.get("inception", {}) if isinstance(meta, dict) else None
    if not isinstance(inception, dict) or not isinstance(inception.get("sha256", ""), str):
        raise ReferenceStatsError(
            f"{path}: 'meta' is not the JSON object --save-reference-stats writes; {_RECOMPUTE} (or delete 'meta')"
        )
    return meta
