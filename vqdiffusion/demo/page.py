"""The demo's page: :func:`build_demo` lays :class:`~vqdiffusion.demo.app.DemoApp` out as a ``gradio.Blocks``
page, its sampling and micro-condition controls generated from the settings' fields and metadata, and
:func:`launch_demo` serves it.  Gradio is the optional extra ``pip install "vqdiffusion[demo]"``, imported
only here and only when the page is built."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

from ..pipeline import DEFAULT_MODEL, VQDiffusionPipeline
from ..samplers import SAMPLERS, sampler_settings
from ..sampling import SamplingOptions
from .app import DemoApp, condition_fields, help_of, label_of, shown, takes_pair

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


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


def _sampling_controls(gr: Any, app: DemoApp, tab: str) -> dict[str, Any]:
    """The page's sampling controls by name, built from the settings' metadata and initialised to the model's
    defaults: the shared settings, the sampler, each strategy's own settings (shown only while a sampler
    that has them is chosen), the seed and the number of images."""
    unconditional = app.condition_kind == "none"
    chosen = app.defaults.sampler

    def control(name: str, field: dataclasses.Field, value: Any = None, **extra: Any) -> Any:
        info = {"label": label_of(name), "info": help_of(name), "elem_id": f"{tab}-{name.replace('_', '-')}"}
        value = app.default_value(name) if value is None else value
        meta = field.metadata
        if meta.get("choices") is not None:
            return gr.Dropdown(list(meta["choices"]), value=value, **info, **extra)
        if meta.get("high") is None:  # an open-ended whole number (None: not set)
            return gr.Number(value=value, precision=0, minimum=meta.get("low"), **info, **extra)
        high = max(meta.get("ui_high") or meta["high"], value)
        return gr.Slider(meta.get("low") or 0, high, value=value, step=meta.get("step"), **info, **extra)

    out: dict[str, Any] = {}
    shared = {f.name: f for f in dataclasses.fields(SamplingOptions)}
    with gr.Accordion("Sampling options", open=True):
        with gr.Row():
            out["num_inference_steps"] = gr.Slider(
                1,
                app.num_timesteps,
                value=app.default_value("num_inference_steps"),
                step=1,
                label=label_of("num_inference_steps"),
                info=help_of("num_inference_steps"),
                elem_id=f"{tab}-num-inference-steps",
            )
            guidance = 1.0 if unconditional else None  # an unconditional model has no guidance
            out["guidance_scale"] = control(
                "guidance_scale", shared["guidance_scale"], guidance, interactive=not unconditional
            )
            out["truncation_rate"] = control("truncation_rate", shared["truncation_rate"])
        with gr.Row():
            out["spacing"] = control("spacing", shared["spacing"])
            out["temperature"] = control("temperature", shared["temperature"])
            out["seed"] = gr.Number(
                value=0, precision=0, minimum=0, label=label_of("seed"), info=help_of("seed"), elem_id=f"{tab}-seed"
            )
            out["num_images"] = gr.Slider(
                1,
                app.max_images,
                value=min(4, app.max_images),
                step=1,
                label=label_of("num_images"),
                info=help_of("num_images"),
                elem_id=f"{tab}-num-images",
            )
        with gr.Row():
            out["sampler"] = control("sampler", shared["sampler"])
            for name, field in sampler_settings().items():
                out[name] = control(name, field, visible=name in chosen.setting_names())
    own = list(sampler_settings())

    def show(sampler: str) -> list[Any]:
        names = SAMPLERS[sampler].setting_names() if sampler in SAMPLERS else ()
        return [gr.update(visible=name in names) for name in own]

    out["sampler"].change(show, out["sampler"], [out[name] for name in own], queue=False)
    return {**out, **_condition_controls(gr, app, tab)}


def _condition_controls(gr: Any, app: DemoApp, tab: str) -> dict[str, Any]:
    """The model's micro-condition controls by name (none for a model without them), built from the fields of
    :class:`~vqdiffusion.models.uvit_config.MicroConditions` and their metadata: a number box for a number, a
    text box "a, b" for a pair (its placeholder the value an empty box stands for)."""
    if not app.condition_names:
        return {}
    fields, resolved = condition_fields(), app.pipe.condition_settings()
    out: dict[str, Any] = {}
    with gr.Accordion("Micro-conditions", open=True), gr.Row():
        for name in app.condition_names:
            meta = fields[name].metadata
            info = {"label": label_of(name), "info": help_of(name), "elem_id": f"{tab}-{name.replace('_', '-')}"}
            value = app.default_value(name)
            if takes_pair(fields[name]):
                out[name] = gr.Textbox(value=value, placeholder=shown(resolved[name]), lines=1, **info)
            else:
                out[name] = gr.Number(value=value, minimum=meta.get("low"), maximum=meta.get("high"), **info)
    return out


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
    """The Gradio page of ``app``: text-to-image, inpainting and variation tabs.  Every event shares one
    queue slot ("model"), so requests wait their turn (the page shows the queue position) and each progress
    bar follows its own request's sampling steps.  The handlers receive their inputs by name (a set of
    components gives a dict keyed by component)."""
    gr = import_gradio()
    width, height = app.image_size

    def progress_of(progress: Any) -> Callable[[int, int], None]:
        return lambda done, total: progress((done, total), desc="sampling", unit="steps")

    def settings_of(controls: dict[str, Any], values: dict[Any, Any]) -> dict[str, Any]:
        return {name: values[component] for name, component in controls.items()}

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

                def text_to_image(values, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
                    result = app.text_to_image(
                        values[prompt], settings_of(controls, values), progress=progress_of(progress)
                    )
                    return result.images, result.status

                for event in (button.click, prompt.submit):
                    event(text_to_image, {prompt, *controls.values()}, [gallery, status], **queue)
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

                def inpaint(values, progress=gr.Progress()):  # noqa: B008
                    settings = settings_of(controls_i, values)
                    result = app.inpaint(values[prompt_i], values[editor], settings, progress=progress_of(progress))
                    return result.images, result.status

                button_i.click(inpaint, {prompt_i, editor, *controls_i.values()}, [gallery_i, status_i], **queue)
            with gr.Tab("Variations", id="variation"):
                prompt_v = _prompt_box(gr, app, "variation")
                source = gr.Image(label="Image", type="pil", elem_id="variation-image", image_mode="RGB")
                strength = gr.Slider(
                    0.05, 1.0, value=0.5, step=0.05, label=label_of("strength"), info=help_of("strength")
                )
                button_v = gr.Button("Make variations", variant="primary", elem_id="variation-generate")
                controls_v = _sampling_controls(gr, app, "variation")
                status_v = gr.Markdown(elem_id="variation-status")
                gallery_v = gr.Gallery(label="Images", elem_id="variation-gallery", format="png", columns=4)

                def variation(values, progress=gr.Progress()):  # noqa: B008
                    result = app.variation(
                        values[prompt_v],
                        values[source],
                        values[strength],
                        settings_of(controls_v, values),
                        progress=progress_of(progress),
                    )
                    return result.images, result.status

                inputs_v = {prompt_v, source, strength, *controls_v.values()}
                button_v.click(variation, inputs_v, [gallery_v, status_v], **queue)
    blocks.queue(default_concurrency_limit=1, max_size=64)
    return blocks


def _theme(gr: Any) -> Any:
    """Gradio's default look with the system's fonts (the default theme fetches web fonts from the network)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


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
