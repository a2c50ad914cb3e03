"""vqdiffusion.io: the one atomic write (temporary file in the same folder, then os.replace)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vqdiffusion.io import atomic_write_bytes, atomic_write_text, atomic_write_with, load_weights, save_safetensors


def test_atomic_writes_create_and_replace(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "first\n")
    assert target.read_text() == "first\n"
    atomic_write_bytes(target, "zweite ü\n".encode())
    assert target.read_text(encoding="utf-8") == "zweite ü\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_failed_write_keeps_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    save_safetensors({"w": torch.ones(2)}, target)

    def half_written(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(target, half_written)
    shared = torch.zeros(3)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors sharing memory: fails inside save_file
        save_safetensors({"a": shared, "b": shared}, target)

    def interrupted(tmp):
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    torch.testing.assert_close(load_weights(target)["w"], torch.ones(2))


def test_writer_taking_a_path_sees_the_target_extension(tmp_path):
    target = tmp_path / "grid.png"
    image = Image.new("RGB", (3, 2), (10, 20, 30))
    atomic_write_with(target, image.save)  # PIL picks the format from the temporary name's extension
    with Image.open(target) as loaded:
        assert loaded.format == "PNG" and loaded.size == (3, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path) -> None:
    """mkstemp's private 0600 must not leak into the written files: new files follow the umask, replaced files
    keep their mode."""
    import os
    import stat

    from vqdiffusion.io import atomic_write_bytes, save_safetensors

    mask = os.umask(0o022)
    try:
        fresh = atomic_write_bytes(tmp_path / "new.bin", b"x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        weights = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # its writer recreates the file
        assert stat.S_IMODE(Path(weights).stat().st_mode) == 0o644
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write_bytes(kept, b"new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_bytes() == b"new"
    finally:
        os.umask(mask)
