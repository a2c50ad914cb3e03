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


_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def _is_loopback(host: object) -> bool:
    import socket

    text = host.decode() if isinstance(host, bytes) else str(host)
    if text in _LOOPBACK_NAMES or text == socket.gethostname():
        return True
    return text.startswith("127.") or text in ("::1", "0:0:0:0:0:0:0:1", "")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the suite may reach the network: connecting to (or resolving) anything but this machine's
    loopback raises.  Unix sockets and loopback (the demo's browser test) stay allowed."""
    import socket

    def refuse(what: object) -> None:
        raise RuntimeError(f"a test tried to reach the network ({what}); tests must work offline")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def guarded(address: object) -> None:
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            refuse(address)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guarded(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            guarded(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host):
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
