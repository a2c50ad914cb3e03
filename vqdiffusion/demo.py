"""The web demo (``vqdiffusion demo``): text to image with every sampling option, inpainting and variations
(when the pipeline has them), in a local Gradio app.

:class:`DemoApp` holds the model and does the work of each tab as plain functions (no Gradio needed: tests
call them directly); :func:`build_demo` lays them out as a ``gradio.Blocks`` page and :func:`launch_demo`
serves it.  Gradio is the optional extra ``pip install "vqdiffusion[demo]"``, imported only here and only
when the page is built.

Bad input (an empty prompt, a value out of range, a missing image or mask) is returned as a message shown
in the page, never a traceback.  Requests are served one at a time: :class:`DemoApp` runs the pipeline under
a lock, each request with its own ``torch.Generator``, so two browser tabs generating at once both get their
own images (the second waits; the time it waited is reported).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from .diffusion import SPACINGS
from .pipeline import DEFAULT_MODEL, PipelineOutput, VQDiffusionPipeline
from .sampling import SAMPLERS, SamplingOptions

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_IMAGES",
    "OPTION_HELP",
    "DemoApp",
    "DemoResult",
    "build_demo",
    "import_gradio",
    "launch_demo",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_IMAGES = 16  # per request: the page shows them all at once
MAX_SEED = 2**63 - 1
GUIDANCE_SLIDER_MAX = 20.0  # the slider's range; the pipeline accepts up to MAX_GUIDANCE_SCALE

# The sampling controls: field of SamplingOptions (or of the request) -> (label, short explanation).
OPTION_HELP: dict[str, tuple[str, str]] = {
    "num_inference_steps": ("Steps", "reverse-diffusion steps; fewer is faster (exact skip-step posterior)"),
    "guidance_scale": ("Guidance", "classifier-free guidance: higher follows the prompt more closely; 1 = off"),
    "truncation_rate": ("Truncation", "keep only the most likely tokens up to this probability mass; 1 = off"),
    "sampler": (
        "Sampler",
        "ancestral: every token at every step; uniform / purity: a fixed number of tokens per step; "
        "confidence: MaskGIT; remdm: remasking; first_hitting: one call per unmasking step (mask-only models)",
    ),
    "prior_weight": ("Prior weight", "purity sampler only: how strongly confident tokens are unmasked first"),
    "spacing": ("Spacing", "which steps of the chain run when there are fewer than its length"),
    "temperature": ("Temperature", "below 1: safer, less varied images; above 1: more varied"),
    "seed": ("Seed", "the same seed and settings give the same images"),
    "num_images": ("Number of images", f"images per request, 1 to {MAX_IMAGES}"),
    "strength": ("Strength", "how much of the image is regenerated: small keeps it close, 1 starts afresh"),
}


@dataclasses.dataclass
class DemoResult:
    """What a tab shows: the images (empty after an error) and a Markdown status line (the time taken, or
    the error message)."""

    images: list[Image.Image]
    status: str
    ok: bool = True


class DemoApp:
    """The demo's work, independent of Gradio: one method per tab, each returning a :class:`DemoResult`.

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
        cfg, factor = self.pipe.denoiser.config, self.pipe.vqvae.config.downsample_factor
        return cfg.width * factor, cfg.height * factor

    @property
    def has_inpaint(self) -> bool:
        return hasattr(self.pipe, "inpaint")

    @property
    def has_variation(self) -> bool:
        return hasattr(self.pipe, "variation")

    def describe(self) -> str:
        """One Markdown line about the model."""
        width, height = self.image_size
        kind = {"text": "text-conditional", "class": "class-conditional", "none": "unconditional"}[self.condition_kind]
        name = f"`{self.model_name}`: " if self.model_name else ""
        return f"{name}{kind}, {width} x {height} images, {self.num_timesteps} diffusion steps"

    # -- the tabs -------------------------------------------------------------------------------------
    def text_to_image(
        self, prompt: str, *options: Any, progress: Callable[[int, int], None] | None = None
    ) -> DemoResult:
        """``options``: steps, guidance, truncation, sampler, prior weight, spacing, temperature, seed,
        number of images (the order of :data:`SAMPLING_CONTROLS`)."""
        return self._run("generated", lambda: self._prepare(prompt, options), self.pipe.__call__, progress)

    def inpaint(
        self, prompt: str, editor: Any, *options: Any, progress: Callable[[int, int], None] | None = None
    ) -> DemoResult:
        """``editor``: Gradio ImageEditor's value (``background`` image and the drawn ``layers``; what is drawn
        is regenerated) or an (image, mask) pair; ``options`` as :meth:`text_to_image`."""

        def prepare() -> tuple[tuple[Any, ...], dict[str, Any]]:
            image, mask = self._image_and_mask(editor)
            (condition,), kwargs = self._prepare(prompt, options)
            return (condition, image, mask), kwargs

        return self._run("inpainted", prepare, getattr(self.pipe, "inpaint", None), progress)

    def variation(
        self,
        prompt: str,
        image: Image.Image | None,
        strength: float,
        *options: Any,
        progress: Callable[[int, int], None] | None = None,
    ) -> DemoResult:
        """Variations of ``image`` (``strength`` in (0, 1]); ``options`` as :meth:`text_to_image`."""

        def prepare() -> tuple[tuple[Any, ...], dict[str, Any]]:
            if image is None:
                raise ValueError("upload an image to make variations of")
            if not _is_number(strength) or not 0.0 < float(strength) <= 1.0:
                raise ValueError(f"Strength must be in (0, 1], got {strength!r}")
            (condition,), kwargs = self._prepare(prompt, options)
            return (condition, self._fit(image.convert("RGB")), float(strength)), kwargs

        return self._run("made", prepare, getattr(self.pipe, "variation", None), progress)

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

    def sampling_kwargs(self, options: tuple[Any, ...]) -> dict[str, Any]:
        """The pipeline keywords of the controls' values (checked: ValueError naming the control)."""
        if len(options) != len(SAMPLING_CONTROLS):
            raise ValueError(f"expected {len(SAMPLING_CONTROLS)} sampling settings, got {len(options)}")
        values = dict(zip(SAMPLING_CONTROLS, options, strict=True))
        for name in ("num_inference_steps", "seed", "num_images"):
            values[name] = _as_int(values[name], OPTION_HELP[name][0])
        for name in ("guidance_scale", "truncation_rate", "prior_weight", "temperature"):
            if not _is_number(values[name]):
                raise ValueError(f"{OPTION_HELP[name][0]} must be a number, got {values[name]!r}")
            values[name] = float(values[name])
        if not 1 <= values["num_images"] <= self.max_images:
            raise ValueError(f"Number of images must be in 1 to {self.max_images}, got {values['num_images']}")
        if not 0 <= values["seed"] <= MAX_SEED:
            raise ValueError(f"Seed must be in 0 to {MAX_SEED}, got {values['seed']}")
        if values["sampler"] != "purity":  # the prior weight belongs to the purity sampler only
            values["prior_weight"] = None
        if self.condition_kind == "none":
            values["guidance_scale"] = None  # no guidance without a condition
        seed, count = values.pop("seed"), values.pop("num_images")
        try:
            self.pipe.sampling_options(**values)
        except ValueError as err:
            raise ValueError(_labelled(str(err))) from None
        generator = torch.Generator(device=self.pipe.device).manual_seed(seed)
        return {**values, "num_images_per_prompt": count, "generator": generator, "output_type": "pil"}

    def _prepare(self, prompt: str, options: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.condition(prompt),), self.sampling_kwargs(options)

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

    def _run(
        self,
        verb: str,
        prepare: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]],
        method: Callable[..., PipelineOutput] | None,
        progress: Callable[[int, int], None] | None,
    ) -> DemoResult:
        if method is None:
            return DemoResult([], "**Error:** this pipeline cannot do that yet", ok=False)
        try:
            args, kwargs = prepare()
            if progress is not None and _accepts(method, "callback"):
                kwargs["callback"] = progress
            if _accepts(method, "progress"):
                kwargs["progress"] = False  # no terminal progress bar for a web request
            asked = time.perf_counter()
            with self._lock:
                started = time.perf_counter()
                output = method(*args, **kwargs)
            seconds = time.perf_counter() - started
        except ValueError as err:  # bad input: the message names the setting and the fix
            return DemoResult([], f"**Error:** {_first_line(err)}", ok=False)
        except Exception as err:  # a bug or the machine (e.g. out of memory): logged with its traceback
            logger.exception("demo request failed")
            return DemoResult([], f"**Error:** {type(err).__name__}: {_first_line(err)} (see the server log)", ok=False)
        images = list(output.images)
        width, height = images[0].size if images else (0, 0)
        waited = started - asked
        wait = f", after waiting {waited:.1f} s for another request" if waited >= 0.05 else ""
        plural = "s" if len(images) != 1 else ""
        status = f"{verb.capitalize()} {len(images)} image{plural} of {width} x {height} in {seconds:.2f} s{wait}"
        return DemoResult(images, status)


# The sampling controls' values, in the order the tabs pass them.
SAMPLING_CONTROLS = (
    "num_inference_steps",
    "guidance_scale",
    "truncation_rate",
    "sampler",
    "prior_weight",
    "spacing",
    "temperature",
    "seed",
    "num_images",
)
_FIELD_LABELS = {name: label for name, (label, _) in OPTION_HELP.items()}


def _labelled(message: str) -> str:
    """A SamplingOptions message (it starts with the field name) with the field named by its control."""
    first = message.split(" ", 1)[0]
    label = _FIELD_LABELS.get(first)
    return message if label is None else label + message[len(first) :]


def _accepts(method: Callable[..., Any], name: str) -> bool:
    import inspect

    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _as_int(value: object, label: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{label} must be a whole number, got {value!r}")
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------
# The page (Gradio)
# ---------------------------------------------------------------------------------------------------------
def import_gradio() -> Any:
    """The ``gradio`` module; ModuleNotFoundError saying how to install it when it is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from a local demo
    try:
        import gradio
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise ModuleNotFoundError(
            'the demo needs Gradio: pip install "vqdiffusion[demo]" (or pip install gradio)', name="gradio"
        ) from None
    return gradio


def _sampling_controls(gr: Any, app: DemoApp, tab: str) -> list[Any]:
    """The controls of :data:`SAMPLING_CONTROLS`, initialised to the model's defaults."""
    d = app.defaults

    def info(name: str) -> dict[str, Any]:
        label, text = OPTION_HELP[name]
        return {"label": label, "info": text, "elem_id": f"{tab}-{name.replace('_', '-')}"}

    unconditional = app.condition_kind == "none"
    with gr.Accordion("Sampling options", open=True):
        with gr.Row():
            steps = gr.Slider(1, app.num_timesteps, value=d.num_inference_steps, step=1, **info("num_inference_steps"))
            guidance = gr.Slider(
                0.0,
                max(GUIDANCE_SLIDER_MAX, d.guidance_scale),
                value=1.0 if unconditional else d.guidance_scale,
                step=0.1,
                interactive=not unconditional,
                **info("guidance_scale"),
            )
            truncation = gr.Slider(0.01, 1.0, value=d.truncation_rate, step=0.01, **info("truncation_rate"))
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLERS), value=d.sampler, **info("sampler"))
            prior = gr.Slider(0.0, 10.0, value=d.prior_weight, step=0.1, **info("prior_weight"))
            spacing = gr.Dropdown(list(SPACINGS), value=d.spacing, **info("spacing"))
        with gr.Row():
            temperature = gr.Slider(0.05, 3.0, value=d.temperature, step=0.05, **info("temperature"))
            seed = gr.Number(value=0, precision=0, minimum=0, **info("seed"))
            count = gr.Slider(1, app.max_images, value=min(4, app.max_images), step=1, **info("num_images"))
    return [steps, guidance, truncation, sampler, prior, spacing, temperature, seed, count]


def _prompt_box(gr: Any, app: DemoApp, tab: str) -> Any:
    kind = app.condition_kind
    if kind == "class":
        label, info = "Class label", f"an integer, 0 to {app.pipe.num_class_labels - 1}"
    elif kind == "none":
        label, info = "Prompt", "this model is unconditional: leave this empty"
    else:
        label, info = "Prompt", "what the image should show"
    return gr.Textbox(label=label, info=info, lines=1, elem_id=f"{tab}-prompt", placeholder="a red circle")


def build_demo(app: DemoApp) -> Any:
    """The Gradio page of ``app``: a text-to-image tab, and inpainting / variation tabs when the pipeline
    has ``inpaint`` / ``variation``.  Every event shares one queue slot ("model"), so requests wait their turn
    (the page shows the queue position) and each progress bar follows its own request's sampling steps."""
    gr = import_gradio()
    width, height = app.image_size

    def progress_of(progress: Any) -> Callable[[int, int], None]:
        return lambda done, total: progress((done, total), desc="sampling", unit="steps")

    def shown(result: DemoResult) -> tuple[list[Image.Image], str]:
        return result.images, result.status

    def text_to_image(prompt, *options, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        return shown(app.text_to_image(prompt, *options, progress=progress_of(progress)))

    def inpaint(prompt, editor, *options, progress=gr.Progress()):  # noqa: B008
        return shown(app.inpaint(prompt, editor, *options, progress=progress_of(progress)))

    def variation(prompt, image, strength, *options, progress=gr.Progress()):  # noqa: B008
        return shown(app.variation(prompt, image, strength, *options, progress=progress_of(progress)))

    queue = {"concurrency_id": "model", "concurrency_limit": 1, "show_progress": "full"}
    with gr.Blocks(title="VQ-Diffusion", analytics_enabled=False) as blocks:
        gr.Markdown(f"## VQ-Diffusion\n{app.describe()}")
        with gr.Tabs():
            with gr.Tab("Text to image", id="t2i"):
                prompt = _prompt_box(gr, app, "t2i")
                button = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                controls = _sampling_controls(gr, app, "t2i")
                status = gr.Markdown(elem_id="t2i-status")
                gallery = gr.Gallery(label="Images", elem_id="t2i-gallery", format="png", columns=4, height="auto")
                for event in (button.click, prompt.submit):
                    event(text_to_image, [prompt, *controls], [gallery, status], **queue)
            if app.has_inpaint:
                with gr.Tab("Inpainting", id="inpaint"):
                    gr.Markdown(
                        f"Upload an image (it is resized to {width} x {height}) and paint over the part to "
                        "regenerate; the rest is kept."
                    )
                    prompt_i = _prompt_box(gr, app, "inpaint")
                    editor = gr.ImageEditor(
                        label="Image and mask", type="pil", elem_id="inpaint-editor", image_mode="RGB", layers=False
                    )
                    button_i = gr.Button("Inpaint", variant="primary", elem_id="inpaint-generate")
                    controls_i = _sampling_controls(gr, app, "inpaint")
                    status_i = gr.Markdown(elem_id="inpaint-status")
                    gallery_i = gr.Gallery(label="Images", elem_id="inpaint-gallery", format="png", columns=4)
                    button_i.click(inpaint, [prompt_i, editor, *controls_i], [gallery_i, status_i], **queue)
            if app.has_variation:
                with gr.Tab("Variations", id="variation"):
                    prompt_v = _prompt_box(gr, app, "variation")
                    source = gr.Image(label="Image", type="pil", elem_id="variation-image", image_mode="RGB")
                    label, info = OPTION_HELP["strength"]
                    strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label=label, info=info)
                    button_v = gr.Button("Make variations", variant="primary", elem_id="variation-generate")
                    controls_v = _sampling_controls(gr, app, "variation")
                    status_v = gr.Markdown(elem_id="variation-status")
                    gallery_v = gr.Gallery(label="Images", elem_id="variation-gallery", format="png", columns=4)
                    button_v.click(
                        variation, [prompt_v, source, strength, *controls_v], [gallery_v, status_v], **queue
                    )
    blocks.queue(default_concurrency_limit=1, max_size=64)
    return blocks


def _theme(gr: Any) -> Any:
    """Gradio's default look with the system's fonts (the default theme fetches web fonts from the network)."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def launch_demo(
    model: str = DEFAULT_MODEL,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    block: bool = True,
    pipe: VQDiffusionPipeline | None = None,
    **load_options: Any,
) -> tuple[Any, str]:
    """Load ``model`` (or use ``pipe``) and serve its page at ``http://host:port``; returns (the Gradio
    Blocks, the URL).  ``block=False`` returns once the server runs (``blocks.close()`` stops it);
    ``load_options`` go to :meth:`VQDiffusionPipeline.from_pretrained` (revision, cache_dir, ...)."""
    gr = import_gradio()
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    if pipe is None:
        pipe = VQDiffusionPipeline.from_pretrained(model, device=device, dtype=dtype, **load_options)
    blocks = build_demo(DemoApp(pipe, model_name=str(model)))
    _, url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        ssr_mode=False,
        theme=_theme(gr),
        footer_links=[],
    )
    if block:
        print(f"vqdiffusion demo: {url} (Ctrl-C to stop)", flush=True)
        try:
            blocks.block_thread()
        finally:
            blocks.close()
    return blocks, url
