"""Shared pytest fixtures.  Plain helpers live in the ``support`` package (``from support.tokenizers import
...``; pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.tokenizers import make_tiny_clip


@pytest.fixture(scope="session")
def tiny_clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(text_encoder_dir, tokenizer_dir)`` of a tiny random CLIP (width 32, 2 layers, 77 positions),
    written once per test session.  Treat the folders as read-only; call ``make_tiny_clip`` for others."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
