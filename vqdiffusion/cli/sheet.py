"""``vqdiffusion sheet``: a captioned contact sheet (one grid PNG) of a folder of images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import CLIError


def add_sheet_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("sheet", help="a captioned contact sheet (grid PNG) of a folder of images")
    p.add_argument("folder", help="folder of images (a sample-set folder gives its prompts as captions)")
    p.add_argument("--out", default=None, help="output PNG (default: FOLDER-sheet.png beside the folder)")
    p.add_argument("--columns", type=int, default=None, help="images per row (default: a square grid)")
    p.add_argument("--thumb", type=int, default=128, help="cell size in pixels (default 128)")
    p.add_argument("--max-images", type=int, default=64, help="the first N images, in file order (default 64)")
    p.add_argument("--caption-lines", type=int, default=3, help="lines of caption per image (default 3)")
    p.add_argument("--no-captions", action="store_true", help="images only")
    p.set_defaults(run=run_sheet)
    return p


def run_sheet(args: argparse.Namespace) -> int:
    from ..eval.sheet import contact_sheet
    from ..io import atomic_write_with, check_output_path

    folder = Path(args.folder)
    out = Path(args.out) if args.out else _default_out(folder)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out {out}: the sheet is a .png file")
    check_output_path(out, what="--out")
    sheet = contact_sheet(
        folder,
        columns=args.columns,
        thumb=args.thumb,
        max_images=args.max_images,
        captions=not args.no_captions,
        caption_lines=args.caption_lines,
    )
    atomic_write_with(out, lambda tmp: sheet.save(tmp, format="PNG"))
    print(out)
    return 0


def _default_out(folder: Path) -> Path:
    """``FOLDER-sheet.png`` beside the folder; a folder without a name (``/``) needs ``--out``."""
    resolved = folder.resolve()
    if not resolved.name:
        raise CLIError(f"the folder {str(folder)!r} has no name to name the sheet after; give --out SHEET.png")
    return resolved.with_name(resolved.name + "-sheet.png")
