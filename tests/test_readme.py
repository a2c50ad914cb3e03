"""The README's Layout section lists every module of the package, under its folder."""

from __future__ import annotations

import re
from pathlib import Path

import vqdiffusion

ROOT = Path(vqdiffusion.__file__).resolve().parent
README = ROOT.parent / "README.md"


def layout_entries() -> set[str]:
    """``folder/module.py`` (``module.py`` at the top) for every module named in the Layout code block: a line
    that starts at column 2 with ``name/`` opens that folder, one that starts there with a file name returns
    to the top; indented lines stay in the open folder."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    folder, found = "", set()
    for line in block.splitlines()[1:]:
        opened = re.match(r"^  ([a-z_]+)/", line)
        if opened:
            folder = opened.group(1) + "/"
        elif re.match(r"^  [a-z_]", line):
            folder = ""
        elif not line.startswith("  ") or not line.strip():
            continue
        for name in re.findall(r"\b([a-z][a-z_0-9]*\.py)\b", line):
            found.add(folder + name)
    return found


def test_every_module_is_in_the_readme_layout() -> None:
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*.py")
        if not p.name.startswith("__") and "assets" not in p.parts
    }
    listed = layout_entries()
    assert not modules - listed, f"modules missing from the README's Layout section: {sorted(modules - listed)}"
    assert not listed - modules, f"the Layout section lists modules that do not exist: {sorted(listed - modules)}"
