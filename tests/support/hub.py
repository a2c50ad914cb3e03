"""A Hugging Face cache folder built locally, in the Hub's own layout (nothing is downloaded).

``models--<org>--<name>/blobs/<hash>`` holds each file once, ``snapshots/<commit>/<path>`` links to the
blobs, and ``refs/<branch>`` names a branch's commit: what ``huggingface_hub.snapshot_download`` writes and
reads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Put the files of folder ``source`` into ``cache`` as ``repo_id`` at branch ``revision``; returns the
    snapshot folder.  The commit id is a hash of the files, so different contents get different commits."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1(repr([(str(p.relative_to(source)), p.read_bytes()) for p in files]).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
