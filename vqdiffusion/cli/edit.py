"""``vqdiffusion inpaint``, ``outpaint`` and ``variation``: edit an image with a model (docs/design.md §10).

The commands share ``generate``'s flags (model, sampling, seed, count, output) and its output handling.  Flag
syntax, image and mask files, and a mask's contents are checked before the model is loaded; the sizes that
depend on the model (the image against the model's canvas, the mask against its tokens) before sampling.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..config import first_line
from .errors import CLIError
from .generate import (
    add_condition_arguments,
    add_model_arguments,
    add_run_arguments,
    check_generate_args,
    load_for_sampling,
    write_images,
)
from .sampling_flags import add_sampling_arguments, sampling_arguments

KNOWN_TOKEN_MODES = ("renoise", "clean")  # vqdiffusion.editing.KNOWN_TOKEN_MODES (no torch for --help)


def add_edit_parsers(sub: Any) -> None:
    """Register ``inpaint``, ``outpaint`` and ``variation``."""
    inpaint = sub.add_parser("inpaint", help="regenerate the masked part of an image")
    _add_common_arguments(inpaint, "the image to edit, at the model's size (or with --resize)", "inpaint.png")
    inpaint.add_argument("--mask", default=None, help="a mask image of the image's size: white = regenerate")
    inpaint.add_argument(
        "--box",
        default=None,
        help="instead of --mask: regenerate the box x0,y0,x1,y1 (pixels of --image, x1, y1 excl.)",
    )
    _add_known_tokens_argument(inpaint)
    _add_resize_argument(inpaint)
    inpaint.set_defaults(run=cmd_inpaint)

    outpaint = sub.add_parser("outpaint", help="place an image on the model's canvas and generate the rest")
    _add_common_arguments(outpaint, "the image to extend (any size)", "outpaint.png")
    outpaint.add_argument(
        "--offset",
        required=True,
        help="x,y pixels of the image's top-left corner on the canvas (negative values: --offset=-4,0)",
    )
    _add_known_tokens_argument(outpaint)
    outpaint.set_defaults(run=cmd_outpaint)

    variation = sub.add_parser("variation", help="a variation of an image (image-to-image)")
    _add_common_arguments(variation, "the image to vary, at the model's size (or with --resize)", "variation.png")
    variation.add_argument(
        "--strength",
        type=float,
        required=True,
        help="in (0, 1]: how much changes (near 0: almost the image; 1: a new image, as generate)",
    )
    _add_resize_argument(variation)
    variation.set_defaults(run=cmd_variation)


def _add_common_arguments(parser: argparse.ArgumentParser, image_help: str, default_output: str) -> None:
    add_condition_arguments(parser)
    parser.add_argument("--image", required=True, help=image_help)
    add_model_arguments(parser)
    add_sampling_arguments(parser, conditions=True)
    add_run_arguments(parser, default_output=default_output)


def _add_known_tokens_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--known-tokens",
        default="renoise",
        choices=KNOWN_TOKEN_MODES,
        help="what the model sees of the kept tokens: renoise (noised like training inputs) or clean (default renoise)",
    )


def _add_resize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resize",
        action="store_true",
        help="resize an image (bicubic) and its mask (nearest) of another size to the model's size",
    )


# -- the commands ------------------------------------------------------------------------------------------


def cmd_inpaint(args: argparse.Namespace) -> int:
    kind = check_generate_args(args)
    sampling = sampling_arguments(args)
    if (args.mask is None) == (args.box is None):
        which = "both" if args.mask is not None else "neither"
        raise CLIError(f"give --mask MASK.png or --box x0,y0,x1,y1 (got {which}): the part of --image to regenerate")
    image = read_image(args.image, "--image")
    mask = read_mask(args.mask, image.size) if args.mask is not None else _box_mask(args.box, image.size)
    _check_mask_contents(mask, what=f"--mask {args.mask}" if args.mask is not None else f"--box {args.box}")

    pipe, condition, generator = load_for_sampling(args, kind)
    image, mask = _fit_to_model(image, mask, pipe.image_size, args)
    _check_token_mask(mask, pipe.vqvae.config.downsample_factor, "the mask")
    result = pipe.inpaint(
        condition,
        _pixels(image),
        _mask_tensor(mask),
        known_tokens=args.known_tokens,
        **_run_options(args, generator),
        **sampling,
    )
    write_images(result.images, kind, args.output)
    return 0


def cmd_outpaint(args: argparse.Namespace) -> int:
    kind = check_generate_args(args)
    sampling = sampling_arguments(args)
    offset = parse_ints(args.offset, 2, "--offset", "x,y")
    image = read_image(args.image, "--image")

    pipe, condition, generator = load_for_sampling(args, kind)
    from ..editing import place_on_canvas

    width, height = pipe.image_size
    try:
        _, uncovered = place_on_canvas(_pixels(image)[0], (height, width), offset)
    except ValueError as err:
        raise CLIError(f"--offset {args.offset}: {err}") from None
    if not bool(uncovered.any()):
        raise CLIError(
            f"--image {args.image} ({image.width}x{image.height}) at --offset {args.offset} covers the whole "
            f"{width}x{height} canvas: nothing to outpaint; shift it or give a smaller image (or use inpaint)"
        )
    _check_token_mask(
        uncovered.numpy(), pipe.vqvae.config.downsample_factor, f"the canvas left uncovered at --offset {args.offset}"
    )
    result = pipe.outpaint(
        condition,
        _pixels(image),
        offset=offset,
        known_tokens=args.known_tokens,
        **_run_options(args, generator),
        **sampling,
    )
    write_images(result.images, kind, args.output)
    return 0


def cmd_variation(args: argparse.Namespace) -> int:
    kind = check_generate_args(args)
    sampling = sampling_arguments(args)
    strength = args.strength
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise CLIError(
            f"--strength must be in (0, 1] (near 0: close to the image; 1: a new image, as generate), got {strength}"
        )
    image = read_image(args.image, "--image")

    pipe, condition, generator = load_for_sampling(args, kind)
    image, _ = _fit_to_model(image, None, pipe.image_size, args)
    result = pipe.variation(condition, _pixels(image), strength, **_run_options(args, generator), **sampling)
    write_images(result.images, kind, args.output)
    return 0


# -- inputs ------------------------------------------------------------------------------------------------


def parse_ints(text: str, count: int, flag: str, syntax: str) -> tuple[int, ...]:
    """``text`` as ``count`` comma-separated integers; CLIError naming ``flag`` and its ``syntax`` otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count:
        raise CLIError(
            f"{flag} {text!r}: expected {count} integers {syntax} separated by commas, e.g. {flag} "
            f"{','.join(str(4 * i) for i in range(count))}"
        )
    return values


def read_image(path: str, flag: str) -> Any:
    """The image file ``path`` as an RGB PIL image (decoded now); CLIError when it is missing or unreadable."""
    from PIL import Image

    file = Path(path)
    if not file.exists():
        raise CLIError(f"{flag} {path}: no such file; give the path of a PNG or JPEG image")
    if file.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give the path of a PNG or JPEG image")
    try:
        with Image.open(file) as opened:
            return opened.convert("RGB")
    except PermissionError:
        raise CLIError(f"{flag} {path}: permission denied; make the file readable") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CLIError(f"{flag} {path} is not a readable image ({first_line(err)}); give a PNG or JPEG file") from None


def read_mask(path: str, image_size: tuple[int, int]) -> Any:
    """The mask file as a [H, W] bool numpy array (white = regenerate) of ``image_size`` = (W, H).  Gray
    values are thresholded at 0.5, with a note on stderr."""
    import numpy as np

    picture = read_image(path, "--mask")
    if picture.size != tuple(image_size):
        raise CLIError(
            f"--mask {path} is {picture.width}x{picture.height} but --image is {image_size[0]}x{image_size[1]}; "
            "give a mask of the image's size (white = regenerate)"
        )
    values = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    if not bool(((values == 0) | (values == 1)).all()):
        print(f"note: --mask {path} is not black and white: thresholded at 0.5 (white = regenerate)", file=sys.stderr)
    return values >= 0.5


def _box_mask(text: str, image_size: tuple[int, int]) -> Any:
    from ..image_inputs import box_mask

    box = parse_ints(text, 4, "--box", "x0,y0,x1,y1")
    try:
        return box_mask(box, image_size)[0].numpy()
    except ValueError as err:
        raise CLIError(f"--box {text}: {err}") from None


def _check_mask_contents(mask: Any, what: str, empty_hint: str = "paint white the part to regenerate") -> None:
    if not mask.any():
        raise CLIError(f"{what} is empty (all black): nothing to regenerate; {empty_hint}")
    if mask.all():
        raise CLIError(
            f"{what} covers the whole image: nothing of it would be kept; use vqdiffusion generate for a new image "
            "or vqdiffusion variation to vary this one"
        )


def _check_token_mask(mask: Any, factor: int, what: str) -> None:
    """The pipeline's check at the model's token grid (a token is regenerated when its f x f patch holds a
    white pixel) as a command-line message, before sampling."""
    import torch

    from ..editing import token_mask

    if bool(token_mask(torch.from_numpy(mask)[None], factor).all()):
        raise CLIError(
            f"{what} touches every {factor}x{factor}-pixel token of the image, so nothing of it would be kept (a "
            "token is regenerated when its patch holds a white pixel); keep at least one whole patch, or use "
            "vqdiffusion generate / vqdiffusion variation"
        )


def _fit_to_model(image: Any, mask: Any, size: tuple[int, int], args: argparse.Namespace) -> tuple[Any, Any]:
    """The image (and mask) at the model's size: unchanged, resized with ``--resize`` (a note on stderr), or
    CLIError naming both sizes."""
    if image.size == tuple(size):
        return image, mask
    width, height = size
    if not args.resize:
        raise CLIError(
            f"--image {args.image} is {image.width}x{image.height} but the model makes {width}x{height} images; "
            f"resize it to {width}x{height} or add --resize"
        )
    import numpy as np
    from PIL import Image

    resized = f"note: resized --image {args.image} from {image.width}x{image.height} to {width}x{height} (bicubic"
    image = image.resize((width, height), Image.BICUBIC)
    if mask is not None:
        picture = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((width, height), Image.NEAREST)
        mask = np.asarray(picture) >= 128
        resized += "; the mask: nearest"
        hint = f"its white part vanished at {width}x{height}; make it larger"
        _check_mask_contents(mask, what=f"the mask resized to {width}x{height}", empty_hint=hint)
    print(resized + ")", file=sys.stderr)
    return image, mask


def _pixels(image: Any) -> Any:
    from ..image_inputs import image_batch

    return image_batch(image, None)


def _mask_tensor(mask: Any) -> Any:
    import torch

    return torch.from_numpy(mask)[None]


def _run_options(args: argparse.Namespace, generator: Any) -> dict[str, Any]:
    return {
        "num_images_per_prompt": args.num_images,
        "generator": generator,
        "progress": not args.quiet,
        "batch_size": args.batch_size,
    }
