"""The demo's work without Gradio: :class:`DemoApp` does each tab's job as a plain method (tests call them
directly) with the sampling settings given by name; their labels and explanations come from the settings'
own metadata (:func:`sampling_settings`), and so do a model's micro-conditions (:func:`condition_fields`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import first_line, is_int, is_number, number_pair, renamed
from ..models.uvit_config import MicroConditions
from ..pipeline import PipelineOutput, VQDiffusionPipeline
from ..samplers import SAMPLERS, sampler_settings
from ..sampling import SamplingOptions

logger = logging.getLogger(__name__)

MAX_IMAGES = 16  # per request: the page shows them all at once
MAX_SEED = 2**63 - 1

# The controls of a request that are not sampling settings: name -> (label, short explanation).  The sampling
# controls take their label and explanation from the settings' own metadata (:func:`sampling_settings`).
OPTION_HELP: dict[str, tuple[str, str]] = {
    "seed": ("Seed", "the same seed and settings give the same images"),
    "num_images": ("Number of images", f"images per request, 1 to {MAX_IMAGES}"),
    "strength": ("Strength", "how much of the image is regenerated: small keeps it close, 1 starts afresh"),
}
# Longer explanations for the page than the CLI's one-liners.
_PAGE_HELP = {
    "guidance_scale": "classifier-free guidance: higher follows the prompt more closely; 1 = off",
    "truncation_rate": "keep only the most likely tokens up to this probability mass; 1 = off",
    "spacing": "which steps of the chain run when there are fewer than its length",
    "temperature": "below 1: safer, less varied images; above 1: more varied",
    "num_inference_steps": "reverse-diffusion steps; fewer is faster (exact skip-step posterior)",
}


def sampling_settings() -> dict[str, dataclasses.Field]:
    """Every sampling control of the page by name: the shared settings of :class:`SamplingOptions`, then each
    strategy's own (:func:`vqdiffusion.samplers.sampler_settings`)."""
    return {**{f.name: f for f in dataclasses.fields(SamplingOptions)}, **sampler_settings()}


def condition_fields() -> dict[str, dataclasses.Field]:
    """Every micro-condition control by name: the fields of :class:`MicroConditions` (aMUSEd's); a page shows
    those its model takes (:attr:`DemoApp.condition_names`)."""
    return {f.name: f for f in dataclasses.fields(MicroConditions)}


def takes_pair(field: dataclasses.Field) -> bool:
    """Whether a micro-condition is a pair of numbers (a text box "a, b"), not one number."""
    return str(field.type).startswith("tuple")


def _fields() -> dict[str, dataclasses.Field]:
    return {**sampling_settings(), **condition_fields()}


def label_of(name: str) -> str:
    """The page's name of a control."""
    if name in OPTION_HELP:
        return OPTION_HELP[name][0]
    field = _fields().get(name)
    label = field.metadata.get("label") if field is not None else None
    return label or name.replace("_", " ").capitalize()


def help_of(name: str) -> str:
    if name in OPTION_HELP:
        return OPTION_HELP[name][1]
    if name == "sampler":
        return "; ".join(f"{cls.name}: {cls.summary}" for cls in SAMPLERS.values())
    return _PAGE_HELP.get(name) or _fields()[name].metadata["help"]


@dataclasses.dataclass
class DemoResult:
    """What a tab shows: the images (empty after an error) and a Markdown status line (the time taken, or
    the error message)."""

    images: list[Image.Image]
    status: str
    ok: bool = True


class DemoApp:
    """The demo's work, independent of Gradio: one method per tab, each returning a :class:`DemoResult`.

    ``settings`` of every tab map control names to values: the sampling settings (a field of
    :class:`SamplingOptions` or of a strategy; the settings of strategies other than the chosen one are
    ignored, a missing one takes the model's default), ``seed``, ``num_images`` and the model's
    micro-conditions (:attr:`condition_names`; a missing or empty one takes the model's default).

    Every pipeline call runs under one lock (the text tokenizer and the device are shared), with a new
    ``torch.Generator`` seeded per request, so concurrent requests get the images they would get alone.
    """

    def __init__(self, pipe: VQDiffusionPipeline, *, model_name: str = "", max_images: int = MAX_IMAGES) -> None:
        self.pipe = pipe
        self.model_name = model_name
        self.max_images = max_images
        self._lock = threading.Lock()

    # -- what the page offers -----------------------------------------------------------------------
    @property
    def condition_kind(self) -> str:
        return self.pipe.condition_kind

    @property
    def defaults(self) -> SamplingOptions:
        return self.pipe.defaults

    @property
    def num_timesteps(self) -> int:
        return self.pipe.schedule.num_timesteps

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the model's images."""
        return self.pipe.image_size

    @property
    def condition_names(self) -> tuple[str, ...]:
        """The micro-conditions the model takes, each a control (aMUSEd's; none for VQ-Diffusion)."""
        return tuple(name for name in condition_fields() if name in self.pipe.condition_keywords)

    def default_value(self, name: str) -> Any:
        """The control's initial value: the model's default (of its default sampler, else the setting's); a
        micro-condition's field default, a pair as its text "a, b" (None: empty)."""
        if name in condition_fields():
            return shown(condition_fields()[name].default)
        defaults = self.defaults
        if name == "sampler":
            return defaults.sampler.name
        if hasattr(defaults, name):
            return getattr(defaults, name)
        if hasattr(defaults.sampler, name):
            return getattr(defaults.sampler, name)
        return sampler_settings()[name].default

    def describe(self) -> str:
        """One Markdown line about the model."""
        width, height = self.image_size
        kind = {"text": "text-conditional", "class": "class-conditional", "none": "unconditional"}[self.condition_kind]
        name = f"`{self.model_name}`: " if self.model_name else ""
        return f"{name}{kind}, {width} x {height} images, {self.num_timesteps} diffusion steps"

    # -- the tabs -------------------------------------------------------------------------------------
    def text_to_image(
        self, prompt: str, settings: Mapping[str, Any], progress: Callable[[int, int], None] | None = None
    ) -> DemoResult:
        """Images for ``prompt`` with ``settings``."""
        with self._request("generated") as request:
            condition, kwargs = self.condition(prompt), self.sampling_kwargs(settings, progress)
            with request.turn():
                request.output = self.pipe(condition, **kwargs)
        return request.result

    def inpaint(
        self,
        prompt: str,
        editor: Any,
        settings: Mapping[str, Any],
        progress: Callable[[int, int], None] | None = None,
    ) -> DemoResult:
        """``editor``: Gradio ImageEditor's value (``background`` image and the drawn ``layers``; what is drawn
        is regenerated) or an (image, mask) pair."""
        with self._request("inpainted") as request:
            image, mask = self._image_and_mask(editor)
            condition, kwargs = self.condition(prompt), self.sampling_kwargs(settings, progress)
            with request.turn():
                request.output = self.pipe.inpaint(condition, image=image, mask=mask, **kwargs)
        return request.result

    def variation(
        self,
        prompt: str,
        image: Image.Image | None,
        strength: float,
        settings: Mapping[str, Any],
        progress: Callable[[int, int], None] | None = None,
    ) -> DemoResult:
        """Variations of ``image`` (``strength`` in (0, 1])."""
        with self._request("made") as request:
            if image is None:
                raise ValueError("upload an image to make variations of")
            if not _is_finite(strength) or not 0.0 < float(strength) <= 1.0:
                raise ValueError(f"Strength must be in (0, 1], got {strength!r}")
            condition, kwargs = self.condition(prompt), self.sampling_kwargs(settings, progress)
            source = self._fit(image.convert("RGB"))
            with request.turn():
                request.output = self.pipe.variation(condition, image=source, strength=float(strength), **kwargs)
        return request.result

    # -- helpers -------------------------------------------------------------------------------------
    def condition(self, prompt: str | None) -> str | list[int] | None:
        """The pipeline's condition for the prompt box: the text (text models), ``[label]`` (class
        models: the box holds an integer) or None (unconditional models: the box must be empty)."""
        text = (prompt or "").strip()
        kind = self.condition_kind
        if kind == "text":
            if not text:
                raise ValueError("the prompt is empty; describe the image you want, e.g. “a red circle”")
            return text
        if kind == "class":
            n = self.pipe.num_class_labels
            try:
                label = int(text)
            except ValueError:
                raise ValueError(f"this model is class-conditional: enter a class label, 0 to {n - 1}") from None
            if not 0 <= label < n:
                raise ValueError(f"the class label must be in 0 to {n - 1}, got {label}")
            return [label]
        if text:
            raise ValueError("this model is unconditional: leave the prompt empty")
        return None

    def sampling_kwargs(
        self, settings: Mapping[str, Any], progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """The pipeline keywords of the controls' values, the model's micro-conditions included (checked:
        ValueError naming the control)."""
        fields = sampling_settings()
        unknown = sorted(set(settings) - set(fields) - set(condition_fields()) - {"seed", "num_images"})
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}")
        values = {name: settings.get(name) for name in fields if settings.get(name) is not None}
        seed = _as_int(settings.get("seed", 0), label_of("seed"))
        count = _as_int(settings.get("num_images", 1), label_of("num_images"))
        for name, value in values.items():
            kind = str(fields[name].type)
            if kind.startswith("int"):
                values[name] = _as_int(value, label_of(name))
            elif kind.startswith("float"):
                if not _is_finite(value):
                    raise ValueError(f"{label_of(name)} must be a number, got {value!r}")
                values[name] = float(value)
        if not 1 <= count <= self.max_images:
            raise ValueError(f"Number of images must be in 1 to {self.max_images}, got {count}")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"Seed must be in 0 to {MAX_SEED}, got {seed}")
        chosen = SAMPLERS.get(values.get("sampler", self.defaults.sampler.name))
        others = set(sampler_settings()) - set(chosen.setting_names() if chosen is not None else ())
        values = {name: value for name, value in values.items() if name not in others}  # other samplers' controls
        if self.condition_kind == "none":
            values.pop("guidance_scale", None)  # no guidance without a condition
        try:
            self.pipe.sampling_options(**values)
        except ValueError as err:
            raise ValueError(_labelled(str(err))) from None
        values.update(self.condition_kwargs(settings))
        generator = torch.Generator(device=self.pipe.device).manual_seed(seed)
        kwargs = {**values, "num_images_per_prompt": count, "generator": generator, "output_type": "pil"}
        kwargs["progress"] = False  # no terminal progress bar for a web request
        if progress is not None:
            kwargs["callback"] = progress
        return kwargs

    def condition_kwargs(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The micro-condition keywords of the controls' values (a pair's text "a, b" read as two numbers; a
        missing or empty control left out: the model's default), checked by the pipeline (ValueError naming
        the control)."""
        values: dict[str, Any] = {}
        for name, field in condition_fields().items():
            value = settings.get(name)
            if isinstance(value, str) and not value.strip():
                value = None
            if isinstance(value, str) and takes_pair(field):
                try:
                    value = number_pair(value)
                except ValueError:
                    raise ValueError(f"{label_of(name)} must be two numbers a, b (e.g. 0, 0), got {value!r}") from None
            if value is not None:
                values[name] = value
        try:
            self.pipe.condition_settings(**values)
        except ValueError as err:
            raise ValueError(_labelled(str(err))) from None
        return values

    def _image_and_mask(self, editor: Any) -> tuple[Image.Image, Image.Image]:
        """(RGB image, L mask: 255 = regenerate) at the model's size, from an ImageEditor value."""
        if isinstance(editor, tuple | list) and len(editor) == 2:
            image, mask = editor
        elif isinstance(editor, dict):
            image = editor.get("background")
            mask = _drawn_mask(editor.get("layers") or [], image)
        else:
            image, mask = None, None
        if image is None:
            raise ValueError("upload an image to inpaint, then paint over the part to regenerate")
        if mask is None or not np.asarray(mask.convert("L")).any():
            raise ValueError("paint over the part of the image to regenerate (the mask is empty)")
        return self._fit(image.convert("RGB")), self._fit(mask.convert("L"), Image.NEAREST)

    def _fit(self, image: Image.Image, resample: int = Image.BICUBIC) -> Image.Image:
        size = self.image_size
        return image if image.size == size else image.resize(size, resample)

    @contextlib.contextmanager
    def _request(self, verb: str) -> Iterator[_Request]:
        """One request: its errors become the result's message (bad input: the message, which names the
        setting and the fix; anything else: its type and first line, with the traceback in the server log)."""
        request = _Request(verb, self._lock)
        try:
            yield request
        except ValueError as err:
            request.result = DemoResult([], f"**Error:** {first_line(err)}", ok=False)
        except Exception as err:  # a bug or the machine (e.g. out of memory): logged with its traceback
            logger.exception("demo request failed")
            message = f"**Error:** {type(err).__name__}: {first_line(err)} (see the server log)"
            request.result = DemoResult([], message, ok=False)


class _Request:
    """The timing and the result of one request (see :meth:`DemoApp._request`)."""

    def __init__(self, verb: str, lock: threading.Lock) -> None:
        self.verb, self._lock = verb, lock
        self.output: PipelineOutput | None = None
        self.waited = self.seconds = 0.0
        self._result: DemoResult | None = None

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """The pipeline's turn: wait for the lock, then time the call."""
        asked = time.perf_counter()
        with self._lock:
            started = time.perf_counter()
            yield
        self.waited, self.seconds = started - asked, time.perf_counter() - started

    @property
    def result(self) -> DemoResult:
        if self._result is not None:
            return self._result
        images = list(self.output.images)
        width, height = images[0].size if images else (0, 0)
        wait = f", after waiting {self.waited:.1f} s for another request" if self.waited >= 0.05 else ""
        plural = "s" if len(images) != 1 else ""
        made = f"{self.verb.capitalize()} {len(images)} image{plural} of {width} x {height}"
        return DemoResult(images, f"{made} in {self.seconds:.2f} s{wait}")

    @result.setter
    def result(self, value: DemoResult) -> None:
        self._result = value


def _labelled(message: str) -> str:
    """A settings message (it starts with the setting's name) with the setting named by its control."""
    return renamed(message, {name: label_of(name) for name in _fields()})


def shown(value: Any) -> Any:
    """A value as its control shows it: a pair as "a, b", None as empty."""
    if value is None:
        return ""
    if isinstance(value, tuple | list):
        return ", ".join(f"{v:g}" for v in value)
    return value


def _drawn_mask(layers: list[Any], background: Image.Image | None) -> Image.Image | None:
    """White wherever any layer of the editor has paint (alpha > 0)."""
    if not layers:
        return None
    size = layers[0].size if background is None else background.size
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA").resize(size, Image.NEAREST))[..., 3]
        mask |= alpha > 0
    return Image.fromarray((mask * 255).astype(np.uint8), mode="L")


def _is_finite(value: object) -> bool:
    return is_number(value) and math.isfinite(value)


def _as_int(value: object, label: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value):
        raise ValueError(f"{label} must be a whole number, got {value!r}")
    return value
