"""Reading the authors' files safely: their YAML configs and their ``torch.save`` checkpoints.

* YAML: the authors' configs tag some lists ``!!python/tuple``; they are read with PyYAML's *safe* loader
  extended by that one tag (read as a list).  No ``target`` class named in a config is ever imported.
* Checkpoints: ``torch.load(weights_only=True)`` first.  Training checkpoints also pickle non-tensor
  state (optimizer and scheduler objects, numpy scalars, Lightning callbacks).  If the safe loader refuses
  such a file, the globals it names are listed with ``torch.serialization.get_unsafe_globals_in_checkpoint``
  and each is replaced by an inert placeholder class (allow-listed under that name for this one load):
  the placeholder swallows its constructor arguments and state, so nothing from the file is imported or
  executed and only tensors and plain containers come back.  The names replaced are logged.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------
def read_authors_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse one of the authors' YAML configs (safe loader plus ``!!python/tuple`` read as a list).

    Raises FileNotFoundError for a missing file and ConfigError for malformed YAML or a non-mapping.
    """
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is a dependency
        raise ConfigError("reading the authors' YAML configs needs PyYAML: pip install pyyaml") from err

    class _Loader(yaml.SafeLoader):
        pass

    def _tuple(loader: yaml.SafeLoader, node: yaml.Node) -> list[Any]:
        return list(loader.construct_sequence(node, deep=True))

    _Loader.add_constructor("tag:yaml.org,2002:python/tuple", _tuple)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} at offset {err.start}); "
            "give the authors' YAML config"
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not a YAML file the safe loader can read: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    return data


def config_section(data: Mapping[str, Any], dotted: str, where: str) -> Any:
    """``data["a"]["b"]...`` for ``dotted = "a.b..."``; ConfigError naming the first missing part."""
    node: Any = data
    done = []
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ConfigError(f"{where}: missing '{'.'.join([*done, part])}' (found {have})")
        node = node[part]
        done.append(part)
    return node


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
def _placeholder(name: str) -> type:
    """An inert class standing in for the pickled global ``name``: accepts any arguments and state."""

    def _init(self: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def _setstate(self: Any, state: Any) -> None:
        pass

    def _new(cls: type, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    def _repr(self: Any) -> str:
        return f"<placeholder for {name}>"

    return type(
        "Placeholder_" + name.replace(".", "_"),
        (),
        {"__init__": _init, "__new__": _new, "__setstate__": _setstate, "__repr__": _repr},
    )


def load_authors_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``.pth``/``.ckpt`` the authors (or taming-transformers) saved, on the CPU, tensors only.

    Returns the top-level dict.  Non-tensor objects the safe unpickler would refuse come back as inert
    placeholders (see the module docstring); they are never used.  Raises FileNotFoundError or ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # not a torch.save zip archive at all
            raise ValueError(f"{path} is not a checkpoint torch.load can read: {err}") from None
        stand_ins = [(_placeholder(name), name) for name in unsafe]
        try:
            with torch.serialization.safe_globals(stand_ins):
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: could not load its tensors with weights_only=True: {err}") from None
        logger.warning(
            "%s: %d non-tensor object type(s) in the file were replaced by inert placeholders (never imported "
            "or run): %s",
            path,
            len(unsafe),
            ", ".join(unsafe[:8]) + (" ..." if len(unsafe) > 8 else ""),
        )
    except Exception as err:
        raise ValueError(f"{path} could not be loaded with torch.load(weights_only=True): {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not the dict of a training checkpoint")
    return data


def tensor_dict(container: Any, where: str) -> StateDict:
    """Check that ``container`` is a mapping of string keys to tensors (a state dict) and return it as a dict."""
    if not isinstance(container, Mapping):
        raise ValueError(f"{where} is a {type(container).__name__}, not a state dict")
    bad = [k for k, v in container.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where} holds {len(bad)} non-tensor entr(y/ies), e.g. {bad[:3]}")
    return dict(container)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The entries of ``state`` under ``prefix`` with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
