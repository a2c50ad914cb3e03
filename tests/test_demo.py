"""The demo's work without a browser: DemoApp (no Gradio needed), the page built by Gradio, the pipeline's
step callback, two requests at once, and an aMUSEd model's micro-condition controls."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from support.amused import SIDE, reference_folder
from support.weights import tiny_label_components

from vqdiffusion import samplers
from vqdiffusion.demo import DemoApp, build_demo
from vqdiffusion.pipeline import PipelineOutput, VQDiffusionPipeline

# the controls of a request, by name (the others take the model's defaults)
OPTIONS = {
    "num_inference_steps": 4,
    "guidance_scale": 2.0,
    "truncation_rate": 1.0,
    "sampler": "ancestral",
    "prior_weight": 0.0,
    "spacing": "uniform",
    "temperature": 1.0,
    "seed": 0,
    "num_images": 2,
}


@pytest.fixture(scope="module")
def shapes():
    return VQDiffusionPipeline.from_pretrained("builtin:shapes")


@pytest.fixture(scope="module")
def amused(tmp_path_factory):
    """A tiny random aMUSEd (tests/support/amused.py): 8 x 8 images, micro-conditions as call keywords."""
    pytest.importorskip("diffusers")
    return VQDiffusionPipeline.from_pretrained(reference_folder(tmp_path_factory.mktemp("demo_amused"))[1])


def _tiny(kind: str) -> VQDiffusionPipeline:
    return VQDiffusionPipeline.from_components(tiny_label_components(kind))


def _options(**changes):
    return {**OPTIONS, **changes}


def _arrays(images):
    return [np.asarray(image) for image in images]


def test_text_to_image_matches_the_pipeline_and_reports_progress(shapes):
    app = DemoApp(shapes)
    seen = []
    result = app.text_to_image("a red circle", _options(seed=7), progress=lambda d, t: seen.append((d, t)))
    assert result.ok and result.status.startswith("Generated 2 images of 64 x 64 in ")
    expected = shapes(
        "a red circle",
        num_inference_steps=4,
        guidance_scale=2.0,
        truncation_rate=1.0,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(7),
        progress=False,
    ).images
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(result.images), _arrays(expected), strict=True))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_pipeline_callback_counts_steps_over_batches(shapes):
    seen = []
    shapes("a", num_inference_steps=3, num_images_per_prompt=2, batch_size=1, progress=False,
           callback=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert seen == [(i, 6) for i in range(1, 7)]
    budget = []  # the budget samplers report every step too (also those that fill no position)
    shapes("a", num_inference_steps=5, sampler="purity", prior_weight=1.0, tokens_per_call=7, progress=False,
           callback=lambda d, t: budget.append((d, t)))  # fmt: skip
    assert budget == [(i, 5) for i in range(1, 6)]


def test_two_requests_at_once_each_get_their_own_images(shapes):
    app = DemoApp(shapes)
    alone = {seed: _arrays(app.text_to_image("a blue square", _options(seed=seed)).images) for seed in (1, 2)}
    start, results = threading.Barrier(2), {}

    def request(seed: int) -> None:
        start.wait()
        results[seed] = app.text_to_image("a blue square", _options(seed=seed))

    threads = [threading.Thread(target=request, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(results[s].ok for s in (1, 2))
    for seed in (1, 2):
        assert all(np.array_equal(a, b) for a, b in zip(_arrays(results[seed].images), alone[seed], strict=True))
    assert not np.array_equal(alone[1][0], alone[2][0])
    assert any("after waiting" in results[s].status for s in (1, 2))  # the lock made one wait


@pytest.mark.parametrize(
    ("prompt", "changes", "message"),
    [
        ("   ", {}, "the prompt is empty"),
        ("x", {"num_inference_steps": 500}, "Steps must be an integer in [1, 100], got 500"),
        ("x", {"num_inference_steps": 2.5}, "Steps must be a whole number, got 2.5"),
        ("x", {"guidance_scale": -1.0}, "Guidance must be a number in [0, 1000]"),
        ("x", {"truncation_rate": 0.0}, "Truncation must be in (0, 1], got 0.0"),
        ("x", {"temperature": 0.0}, "Temperature must be a finite number >= 0.001"),
        ("x", {"sampler": "nope"}, "Sampler must be one of"),
        ("x", {"spacing": "cubic"}, "Spacing must be one of"),
        ("x", {"seed": -1}, "Seed must be in 0 to"),
        ("x", {"seed": None}, "Seed must be a whole number, got None"),
        ("x", {"num_images": 17}, "Number of images must be in 1 to 16, got 17"),
        ("x", {"prior_weight": float("nan"), "sampler": "purity"}, "Prior weight must be a number, got nan"),
    ],
)
def test_bad_inputs_are_messages(shapes, prompt, changes, message):
    result = DemoApp(shapes).text_to_image(prompt, _options(**changes))
    assert not result.ok and result.images == []
    assert result.status.startswith("**Error:** ") and message in result.status and "\n" not in result.status


def test_prior_weight_is_ignored_unless_the_sampler_is_purity(shapes):
    assert DemoApp(shapes).text_to_image("x", _options(prior_weight=2.0, sampler="uniform")).ok


def test_class_and_unconditional_models():
    app = DemoApp(_tiny("class"))
    assert app.text_to_image("3", _options(num_inference_steps=2)).ok
    assert "enter a class label, 0 to 3" in app.text_to_image("a cat", _options()).status
    assert "the class label must be in 0 to 3, got 4" in app.text_to_image("4", _options()).status
    app = DemoApp(_tiny("none"))
    result = app.text_to_image("", _options(guidance_scale=5.0))  # the guidance control is off for it
    assert result.ok and len(result.images) == 2
    assert "leave the prompt empty" in app.text_to_image("a cat", _options()).status


class EditingPipe:
    """The editing API (inpaint / variation) recording its calls instead of sampling."""

    def __init__(self, pipe: VQDiffusionPipeline) -> None:
        self._pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def _output(self, kwargs) -> PipelineOutput:
        if "callback" in kwargs:
            kwargs["callback"](1, 1)
        count = kwargs["num_images_per_prompt"]
        return PipelineOutput(images=[Image.new("RGB", (64, 64))] * count, tokens=torch.zeros(count, 8, 8))

    def inpaint(self, prompt, image, mask, **options):
        self.calls.append(("inpaint", prompt, image, mask, options))
        return self._output(options)

    def variation(self, prompt, image, strength, **options):
        self.calls.append(("variation", prompt, image, strength, options))
        return self._output(options)


def test_inpaint_and_variation_call_the_editing_api(shapes):
    pipe = EditingPipe(shapes)
    app = DemoApp(pipe)
    layer = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 64, 32))  # the top quarter painted
    editor = {"background": Image.new("RGB", (128, 128), "red"), "layers": [layer], "composite": None}
    seen = []
    result = app.inpaint("a circle", editor, _options(), progress=lambda d, t: seen.append((d, t)))
    assert result.ok and result.status.startswith("Inpainted 2 images of 64 x 64") and seen == [(1, 1)]
    _, prompt, image, mask, options = pipe.calls[-1]
    assert prompt == "a circle" and image.size == (64, 64) and image.mode == "RGB"
    expected = np.zeros((64, 64), np.uint8)
    expected[:16, :32] = 255
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)
    assert options["num_inference_steps"] == 4 and options["num_images_per_prompt"] == 2
    empty = {"background": Image.new("RGB", (64, 64)), "layers": [Image.new("RGBA", (64, 64))]}
    assert "the mask is empty" in app.inpaint("a circle", empty, _options()).status
    assert "upload an image to inpaint" in app.inpaint("a circle", None, _options()).status

    result = app.variation("a circle", Image.new("RGB", (32, 32), "blue"), 0.4, _options())
    assert result.ok and result.status.startswith("Made 2 images")
    _, prompt, image, strength, _ = pipe.calls[-1]
    assert image.size == (64, 64) and strength == 0.4
    assert "Strength must be in (0, 1], got 0" in app.variation("a", Image.new("RGB", (64, 64)), 0, _options()).status
    assert "upload an image to make variations of" in app.variation("a", None, 0.5, _options()).status


def test_the_editing_tabs_run_the_real_pipeline(shapes):
    app = DemoApp(shapes)
    image = shapes("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    result = app.inpaint("a blue square", (image, mask), _options())
    assert result.ok and len(result.images) == 2 and result.images[0].size == (64, 64)
    # the kept three quarters come back as the image's own tokens: their decoding is close to the image's
    kept = np.asarray(result.images[0], np.float32)[:32] - np.asarray(image, np.float32)[:32]
    assert np.abs(kept[:24]).mean() < 8.0  # (rows next to the mask change a little through the decoder)
    result = app.variation("a blue square", image, 0.3, _options())
    assert result.ok and len(result.images) == 2


def test_an_unexpected_failure_is_one_line_not_a_traceback(shapes, caplog):
    class Broken(EditingPipe):
        def variation(self, prompt, image, strength, **options):
            raise RuntimeError("kaboom\nline two")

    result = DemoApp(Broken(shapes)).variation("a", Image.new("RGB", (64, 64)), 0.5, _options())
    assert result.status == "**Error:** RuntimeError: kaboom (see the server log)"
    assert "Traceback" in caplog.text and "kaboom" in caplog.text  # logged on the server


def test_the_page_offers_every_tab_and_each_samplers_own_settings(shapes):
    pytest.importorskip("gradio", reason="the demo needs Gradio: pip install -e '.[demo]'")
    config = build_demo(DemoApp(shapes)).config
    by_id = {c["props"].get("elem_id"): c for c in config["components"]}
    assert {"t2i-prompt", "inpaint-editor", "variation-image", "inpaint-generate", "variation-generate"} <= set(by_id)
    sampler = by_id["t2i-sampler"]
    assert [choice[0] for choice in sampler["props"]["choices"]] == list(samplers.SAMPLERS)
    # every strategy setting has its control, shown only while a sampler that has it is chosen (the built-in
    # model's default is ancestral, which has none)
    for name in samplers.sampler_settings():
        control = by_id[f"t2i-{name.replace('_', '-')}"]
        assert control["props"]["visible"] is False, name
    assert by_id["t2i-choice-temperature"]["props"]["label"] == "Choice temperature"
    assert not {"t2i-aesthetic-score", "t2i-crop-coords", "t2i-orig-size"} & set(by_id)  # no micro-conditions


def test_only_the_chosen_samplers_settings_reach_the_pipeline(shapes):
    app = DemoApp(shapes)
    kwargs = app.sampling_kwargs(_options(sampler="confidence", choice_temperature=2.0, remask_eta=0.5))
    assert kwargs["sampler"] == "confidence" and kwargs["choice_temperature"] == 2.0
    assert "remask_eta" not in kwargs and "prior_weight" not in kwargs
    result = app.text_to_image("a red circle", _options(sampler="remdm", remask_eta=0.5, num_inference_steps=3))
    assert result.ok, result.status
    bad = app.text_to_image("a red circle", _options(sampler="remdm", remask_eta=2.0))
    assert "Remask eta must be a number in [0, 1], got 2.0" in bad.status


def test_missing_gradio_is_one_clear_error(monkeypatch, capsys):
    import builtins

    from vqdiffusion.cli import main

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ModuleNotFoundError("No module named 'gradio'", name="gradio")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    monkeypatch.delitem(__import__("sys").modules, "gradio", raising=False)
    assert main(["demo", "--port", "7861"]) == 2
    assert 'the demo needs Gradio: pip install "vqdiffusion[demo]"' in capsys.readouterr().err


def test_bad_port_is_one_line(capsys):
    from vqdiffusion.cli import main

    assert main(["demo", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "error: --port must be in [0, 65535], got 70000\n"


# -- an aMUSEd model's micro-conditions ----------------------------------------------------------------------
AMUSED_OPTIONS = {"num_inference_steps": 4, "seed": 5, "num_images": 1}  # the rest: aMUSEd's defaults


def _amused_image(pipe, **micro) -> np.ndarray:
    generator = torch.Generator().manual_seed(5)
    return np.asarray(pipe("a cat", num_inference_steps=4, generator=generator, progress=False, **micro).images[0])


def test_micro_condition_controls_only_for_models_that_have_them(shapes, amused):
    assert DemoApp(shapes).condition_names == ()
    app = DemoApp(amused)
    assert app.condition_names == ("aesthetic_score", "crop_coords", "orig_size")
    assert [app.default_value(name) for name in app.condition_names] == [6.0, "0, 0", ""]
    pytest.importorskip("gradio", reason="the demo needs Gradio: pip install -e '.[demo]'")
    by_id = {c["props"].get("elem_id"): c["props"] for c in build_demo(app).config["components"]}
    for tab in ("t2i", "inpaint", "variation"):
        score, crop, size = (by_id[f"{tab}-{name}"] for name in ("aesthetic-score", "crop-coords", "orig-size"))
        assert (score["label"], score["value"]) == ("Aesthetic score", 6.0)
        assert score["info"] == "aesthetic score to condition on (LAION scale)"  # the field's own help
        assert (crop["label"], crop["value"]) == ("Crop coordinates", "0, 0")
        assert (size["label"], size["value"], size["placeholder"]) == ("Original size", "", f"{2 * SIDE}, {2 * SIDE}")


def test_micro_conditions_reach_the_pipeline(amused):
    app = DemoApp(amused)
    result = app.text_to_image("a cat", {**AMUSED_OPTIONS, "aesthetic_score": 2.0})
    assert result.ok, result.status
    image = np.asarray(result.images[0])
    assert np.array_equal(image, _amused_image(amused, aesthetic_score=2.0))
    assert not np.array_equal(image, _amused_image(amused))
    default = app.text_to_image("a cat", {**AMUSED_OPTIONS, "crop_coords": " ", "orig_size": ""})  # empty: default
    assert np.array_equal(np.asarray(default.images[0]), _amused_image(amused))
    pairs = app.text_to_image("a cat", {**AMUSED_OPTIONS, "crop_coords": "1, 2", "orig_size": "16,12"})
    assert np.array_equal(np.asarray(pairs.images[0]), _amused_image(amused, crop_coords=(1, 2), orig_size=(16, 12)))
    pipe = EditingPipe(amused)
    app = DemoApp(pipe)
    micro = {"aesthetic_score": 4.5, "crop_coords": "3, 0"}
    mask = Image.new("L", (8, 8), 255)
    assert app.inpaint("a cat", (Image.new("RGB", (8, 8)), mask), {**AMUSED_OPTIONS, **micro}).ok
    assert app.variation("a cat", Image.new("RGB", (8, 8)), 0.5, {**AMUSED_OPTIONS, **micro}).ok
    for call in pipe.calls:
        assert (call[-1]["aesthetic_score"], call[-1]["crop_coords"]) == (4.5, (3, 0)), call[0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aesthetic_score": float("nan")}, "Aesthetic score must be a finite number (aMUSEd's default is 6), got nan"),
        ({"crop_coords": "-1, 0"}, "Crop coordinates must be two finite numbers >= 0, (top, left), got (-1, 0)"),
        ({"orig_size": "0, 8"}, "Original size must be two finite numbers > 0, (width, height), got (0, 8)"),
        ({"crop_coords": "left"}, "Crop coordinates must be two numbers a, b (e.g. 0, 0), got 'left'"),
    ],
)
def test_bad_micro_conditions_are_messages(amused, changes, message):
    result = DemoApp(amused).text_to_image("a cat", {**AMUSED_OPTIONS, **changes})
    assert not result.ok and result.images == [] and result.status == f"**Error:** {message}"


def test_a_model_without_micro_conditions_refuses_them(shapes):
    result = DemoApp(shapes).text_to_image("a cat", _options(aesthetic_score=6.0))
    assert (
        result.status
        == "**Error:** Aesthetic score: this model takes no micro-conditions (aMUSEd models do); drop them"
    )
