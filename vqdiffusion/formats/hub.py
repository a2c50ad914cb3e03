"""Model folders from the Hugging Face Hub: ``org/name`` ids resolved to a local snapshot folder.

:func:`download_model` resolves an id through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``,
``revision``, ``cache_dir``, ``local_files_only``) and downloads only the files a VQ-Diffusion pipeline
reads (:func:`pipeline_files`): the index, the components' JSON configs and tokenizer files, and one set of
weights per component (safetensors before the legacy ``.bin``; a ``variant`` such as ``"fp16"`` picks
``<stem>.fp16.<suffix>`` first).  Every ``huggingface_hub`` failure becomes one :class:`HubError`
(a ValueError) naming the id, the revision and what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..config import first_line
from . import diffusers as diffusers_format
from . import ours as ours_format

__all__ = ["HubError", "download_model", "hub_offline", "is_hub_id", "pipeline_files"]

# Folders of the two layouts whose configs, tokenizer files and weights a pipeline reads.
COMPONENT_FOLDERS = (
    "vqvae",
    "transformer",
    "denoiser",
    "text_encoder",
    "tokenizer",
    "scheduler",
    diffusers_format.NULL_DIR,
)
# Top-level files besides the index (ours: the schedule, the default settings and the learned null text).
TOP_LEVEL_FILES = (
    ours_format.SCHEDULE_FILE,
    ours_format.DEFAULTS_FILE,
    ours_format.NULL_CONDITION_FILE,
    ours_format.HISTORY_FILE,  # how the model was trained: `vqdiffusion info` shows it
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SMALL_SUFFIXES = (".json", ".txt")  # configs, tokenizer vocabularies and merges, sharded-weight indexes
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_TRUE = {"1", "on", "yes", "true"}
# The diffusers pipelines whose folders we read: VQ-Diffusion and aMUSEd (docs/design.md §12).
DIFFUSERS_PIPELINES = ("VQDiffusionPipeline", "AmusedPipeline")


class HubError(ValueError):
    """A model id that cannot be resolved: unknown, a missing revision, offline and not cached, not VQ-Diffusion."""


def is_hub_id(text: str) -> bool:
    """``org/name`` (the Hub's repository id syntax) that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not os.path.exists(text)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read now, not when ``huggingface_hub`` was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def pipeline_files(filenames: Iterable[str], variant: str | None = None) -> list[str]:
    """The files of a repository listing that a VQ-Diffusion pipeline reads, sorted.

    Ours (``vqdiffusion.json``) is preferred to diffusers' layout (``model_index.json``) when a repository
    has both.  Per component folder: every ``.json``/``.txt`` file, and the weights of one kind only: with
    ``variant`` ``<stem>.<variant>.safetensors``, else ``<stem>.safetensors``, else the same in ``.bin``
    (all shards of the chosen kind).  Anything else (images, Flax or ONNX weights, other folders) is left out.
    Raises HubError when the listing has neither index.
    """
    names = sorted(set(filenames))
    if ours_format.INDEX_FILE in names:
        index = ours_format.INDEX_FILE
    elif diffusers_format.INDEX_FILE in names:
        index = diffusers_format.INDEX_FILE
    else:
        raise HubError(
            f"not a VQ-Diffusion model: the repository has neither {ours_format.INDEX_FILE} (vqdiffusion layout) "
            f"nor {diffusers_format.INDEX_FILE} (diffusers layout)"
        )
    keep = [index] + [name for name in TOP_LEVEL_FILES if name in names]
    for folder in COMPONENT_FOLDERS:
        inside = [n[len(folder) + 1 :] for n in names if n.startswith(folder + "/") and "/" not in n[len(folder) + 1 :]]
        keep += [f"{folder}/{n}" for n in inside if n.endswith(SMALL_SUFFIXES)]
        kinds: dict[tuple[str, str | None], list[str]] = {}
        for n in inside:
            suffix = next((s for s in WEIGHT_SUFFIXES if n.endswith(s)), None)
            if suffix is not None:
                stem = n[: -len(suffix)]
                kinds.setdefault((suffix, stem.rpartition(".")[2] if "." in stem else None), []).append(n)
        preference = [(s, v) for s in WEIGHT_SUFFIXES for v in ((variant, None) if variant else (None,))]
        chosen = next((kinds[k] for k in preference if k in kinds), [])
        keep += [f"{folder}/{n}" for n in chosen]
    return sorted(set(keep))


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    variant: str | None = None,
) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default ``"main"``), downloading what is missing.

    Offline (``local_files_only`` or ``HF_HUB_OFFLINE``) only the cache is read.  Online, the repository is
    listed first, its diffusers index is checked to describe a ``VQDiffusionPipeline`` before any weights
    are fetched, and then only :func:`pipeline_files` are downloaded.  Raises :class:`HubError`.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    revision = revision or "main"
    cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
    offline = local_files_only or hub_offline()
    where = {"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir}
    try:
        if offline:
            folder = Path(snapshot_download(**where, local_files_only=True))
        else:
            listing = HfApi().list_repo_files(repo_id, revision=revision)
            files = pipeline_files(listing, variant)
            if ours_format.INDEX_FILE not in files:  # before gigabytes of weights: is it VQ-Diffusion?
                index = hf_hub_download(filename=diffusers_format.INDEX_FILE, **where)
                _check_diffusers_index(Path(index), repo_id)
            folder = Path(snapshot_download(**where, allow_patterns=files))
    except HubError as err:
        raise HubError(f"{repo_id} (revision {revision}): {err}") from None
    except Exception as err:
        mapped = _hub_error(err, repo_id, revision, Path(cache), offline, local_files_only)
        if mapped is None:
            raise
        raise mapped from None
    if not any((folder / name).is_file() for name in (ours_format.INDEX_FILE, diffusers_format.INDEX_FILE)):
        raise HubError(
            f"{repo_id} (revision {revision}, cached in {folder}) is not a VQ-Diffusion model: it has neither "
            f"{ours_format.INDEX_FILE} nor {diffusers_format.INDEX_FILE}"
        )
    if (folder / diffusers_format.INDEX_FILE).is_file() and not (folder / ours_format.INDEX_FILE).is_file():
        _check_diffusers_index(folder / diffusers_format.INDEX_FILE, repo_id)
    return folder


def _check_diffusers_index(path: Path, repo_id: str) -> None:
    from ..config import read_json_object

    name = read_json_object(path).get("_class_name")
    if name not in DIFFUSERS_PIPELINES:
        raise HubError(
            f"{repo_id} is not a VQ-Diffusion model: its {path.name} describes a {name!r} (this library reads "
            f"diffusers' {' and '.join(DIFFUSERS_PIPELINES)})"
        )


def _hub_error(
    err: Exception, repo_id: str, revision: str, cache: Path, offline: bool, local_files_only: bool
) -> HubError | None:
    """One line for a ``huggingface_hub`` failure (None: not one of the Hub's errors)."""
    from huggingface_hub import errors

    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.IncompleteSnapshotError)):
        if offline:
            why = "local_files_only=True (--local-files-only)" if local_files_only else "HF_HUB_OFFLINE is set"
            return HubError(
                f"{repo_id} (revision {revision}) is not in the Hugging Face cache {cache} (or only in part) and "
                f"downloads are off ({why}); download it once with network access, or give a local folder"
            )
        return HubError(
            f"cannot download {repo_id} (revision {revision}): the Hugging Face Hub cannot be reached and the model "
            f"is not in the cache {cache}; check the network connection"
        )
    if _is_connection_error(err):
        return HubError(
            f"cannot download {repo_id} (revision {revision}): the Hugging Face Hub cannot be reached "
            f"({first_line(err)}); check the network connection, or set HF_HUB_OFFLINE=1 to use the cache {cache}"
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {revision!r}; give a branch, tag or commit it has (e.g. main)")
    if isinstance(err, errors.GatedRepoError):
        return HubError(f"{repo_id} is gated: accept its conditions on huggingface.co and log in (hf auth login)")
    if isinstance(err, errors.RepositoryNotFoundError):
        return HubError(
            f"no model {repo_id!r} on the Hugging Face Hub (if it is private, log in with hf auth login); "
            "check the id, or give a local folder"
        )
    if isinstance(err, (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError)):
        return HubError(f"{repo_id} (revision {revision}) lacks a file it lists: {first_line(err)}")
    if isinstance(err, errors.HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hugging Face Hub id (org/name): {first_line(err)}")
    if isinstance(err, errors.HfHubHTTPError):
        return HubError(f"the Hugging Face Hub failed for {repo_id} (revision {revision}): {first_line(err)}")
    return None


def _is_connection_error(err: BaseException) -> bool:
    """A failed connection or a timeout (the HTTP client's own exception classes, or the socket's)."""
    name = type(err).__name__
    from_http_client = type(err).__module__.split(".")[0].startswith("httpx")
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return from_http_client and ("Connect" in name or "Timeout" in name)
