"""Where a model folder is: a local folder, a model shipped with the package (``"builtin:<name>"``) or a
Hugging Face Hub id (:mod:`vqdiffusion.formats.hub`)."""

from __future__ import annotations

import os
from pathlib import Path

from . import hub as hub_format
from . import ours as ours_format

BUILTIN_PREFIX = "builtin:"
# Models shipped inside the package (``vqdiffusion/assets/<name>``), loadable as ``"builtin:<name>"``.
BUILTIN_MODELS = ("shapes",)
DEFAULT_MODEL = "builtin:shapes"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def resolve_model_path(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    variant: str | None = None,
) -> Path:
    """A model directory: a local folder as is, ``"builtin:<name>"`` mapped to the package's ``assets/<name>``
    folder, and a Hub id ``org/name`` (that is not an existing local path) to its snapshot folder in the
    Hugging Face cache, downloaded if needed (:func:`vqdiffusion.formats.hub.download_model`).

    ``revision``, ``cache_dir`` and ``local_files_only`` apply to Hub ids only (ValueError otherwise);
    ``variant`` picks the weights fetched from the Hub (:func:`~vqdiffusion.formats.hub.pipeline_files`).
    """
    text = os.fspath(path)
    if hub_format.is_hub_id(text):
        return hub_format.download_model(
            text, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, variant=variant
        )
    hub_only = {"revision": revision, "cache_dir": cache_dir}
    given = [name for name, value in hub_only.items() if value is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to Hugging Face Hub ids (org/name) only, not to the local model {text!r}"
        )
    if not text.startswith(BUILTIN_PREFIX):
        return Path(text)
    name = text[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {text!r}; built-in models: {known}")
    root = ASSETS / name
    if not (root / ours_format.INDEX_FILE).is_file():
        raise FileNotFoundError(
            f"the built-in model {text!r} is missing from this installation ({root}); reinstall vqdiffusion "
            "or rebuild it with scripts/train_default.sh"
        )
    return root
