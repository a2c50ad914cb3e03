"""Generic state-dict conversion on an explicit key map."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch


class ConversionError(ValueError):
    """A source checkpoint does not match the target architecture."""


def convert_state_dict(
    source: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str],
    target_shapes: Mapping[str, torch.Size],
    *,
    ignored: Iterable[str] = (),
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    source_name: str = "source",
) -> dict[str, torch.Tensor]:
    """Rename ``source`` keys to target keys through ``key_map`` (source key -> target key).

    Every source key must be mapped or listed in ``ignored``; every target key must be produced exactly
    once; each produced tensor must have the target's shape. ``transforms`` (keyed by source key) may
    reshape a tensor before the shape check (e.g. a 1x1 conv kernel to a linear weight).
    Raises :class:`ConversionError` naming the offending key(s) and shapes.
    """
    transforms = transforms or {}
    ignored = set(ignored)
    unused = sorted(k for k in source if k not in key_map and k not in ignored)
    if unused:
        raise ConversionError(f"{source_name}: {len(unused)} unmapped key(s), e.g. {unused[:5]}")
    missing_src = sorted(k for k in key_map if k not in source)
    if missing_src:
        raise ConversionError(f"{source_name}: {len(missing_src)} expected key(s) missing, e.g. {missing_src[:5]}")
    out: dict[str, torch.Tensor] = {}
    for src_key, dst_key in key_map.items():
        if dst_key not in target_shapes:
            raise ConversionError(f"{source_name}: key map sends {src_key!r} to unknown target {dst_key!r}")
        if dst_key in out:
            raise ConversionError(f"{source_name}: target {dst_key!r} produced twice")
        tensor = source[src_key]
        if src_key in transforms:
            tensor = transforms[src_key](tensor)
        if tuple(tensor.shape) != tuple(target_shapes[dst_key]):
            raise ConversionError(
                f"{source_name}: shape mismatch for {src_key!r} -> {dst_key!r}: "
                f"{tuple(tensor.shape)} vs expected {tuple(target_shapes[dst_key])}"
            )
        out[dst_key] = tensor
    not_produced = sorted(set(target_shapes) - set(out))
    if not_produced:
        raise ConversionError(f"{source_name}: {len(not_produced)} target key(s) not produced, e.g. {not_produced[:5]}")
    return out


def invert_key_map(key_map: Mapping[str, str]) -> dict[str, str]:
    """Return the target -> source map; the map must be one-to-one."""
    inverse = {v: k for k, v in key_map.items()}
    if len(inverse) != len(key_map):
        raise ConversionError("key map is not one-to-one")
    return inverse
