"""aMUSEd checkpoints in the pipeline (issue 26 phase 2, docs/design.md §12): ``from_pretrained`` of an aMUSEd
folder, the time-agnostic model kind and which samplers run on it, equality with diffusers' ``AmusedPipeline``
(tokens and images of a guided run), editing, and the CLI from a fake Hub cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.amused import CODEBOOK, SIDE, reference_folder
from support.hub import add_to_hub_cache

from vqdiffusion.diffusion import MaskingSchedule
from vqdiffusion.pipeline import AmusedPipeline, VQDiffusionPipeline
from vqdiffusion.samplers import SAMPLERS, Ancestral, Confidence, check_model_kind
from vqdiffusion.sampling import SamplingOptions

pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat", "a red bird"]


@pytest.fixture(scope="module")
def reference_and_folder(tmp_path_factory):
    return reference_folder(tmp_path_factory.mktemp("amused_pipe"))


@pytest.fixture(scope="module")
def pipe(reference_and_folder) -> AmusedPipeline:
    return VQDiffusionPipeline.from_pretrained(reference_and_folder[1])


def test_from_pretrained_picks_the_kind(pipe):
    assert isinstance(pipe, AmusedPipeline) and pipe.time_agnostic
    assert isinstance(pipe.schedule, MaskingSchedule) and pipe.schedule.masking_schedule == "cosine"
    d = pipe.defaults
    assert (d.num_inference_steps, d.guidance_scale) == (12, 10.0)
    assert d.sampler == Confidence(masking_schedule="cosine", choice_temperature=2.0, step_rule="amused")
    assert pipe.image_size == (2 * SIDE, 2 * SIDE)


def test_dtype_and_variant(reference_and_folder, tmp_path):
    reference, _ = reference_and_folder
    root = tmp_path / "fp16"
    reference.save_pretrained(str(root), variant="fp16")
    half = VQDiffusionPipeline.from_pretrained(root, torch_dtype=torch.bfloat16, variant="fp16")
    assert isinstance(half, AmusedPipeline) and half.dtype == torch.bfloat16
    assert next(half.vqvae.parameters()).dtype == torch.float32  # force_upcast: decoded in float32, as diffusers
    out = half("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="tokens")
    assert out.tokens.shape == (1, SIDE, SIDE) and int(out.tokens.max()) < CODEBOOK


def _reference_run(reference, prompts, steps, scale, seed, output_type, **kw):
    with torch.no_grad():
        return reference(
            prompts, num_inference_steps=steps, guidance_scale=scale, generator=torch.Generator().manual_seed(seed),
            output_type=output_type, **kw,
        ).images  # fmt: skip


@pytest.mark.parametrize("steps, scale", [(12, 10.0), (4, 3.0), (5, 1.0)])
def test_confidence_equals_amused_pipeline(reference_and_folder, pipe, steps, scale):
    """pipe(prompts, sampler="confidence") with aMUSEd's settings gives diffusers' tokens and images."""
    reference, _ = reference_and_folder
    want_tokens = _reference_run(reference, PROMPTS, steps, scale, 7, "latent")
    want_images = _reference_run(reference, PROMPTS, steps, scale, 7, "pt")
    out = pipe(
        PROMPTS, num_inference_steps=steps, guidance_scale=scale, sampler="confidence",
        generator=torch.Generator().manual_seed(7), output_type="pt", progress=False,
    )  # fmt: skip
    assert torch.equal(out.tokens, want_tokens)
    torch.testing.assert_close(out.images, want_images, atol=1e-5, rtol=1e-5)


def test_defaults_are_amuseds_and_micro_conditions_are_keywords(reference_and_folder, pipe):
    reference, _ = reference_and_folder
    want = _reference_run(
        reference, ["a cat"], 12, 10.0, 3, "latent",
        micro_conditioning_aesthetic_score=4.5, micro_conditioning_crop_coord=(1, 2),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    out = pipe("a cat", generator=gen, output_type="tokens", aesthetic_score=4.5, crop_coords=(1, 2))
    assert torch.equal(out.tokens, want)
    with pytest.raises(ValueError, match="aesthetic_score must be a finite number"):
        pipe("a cat", aesthetic_score="high", output_type="tokens")
    # orig_size defaults to the generated image's size (diffusers' only choice); another one is a keyword too
    same = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="tokens", aesthetic_score=4.5,
                crop_coords=(1, 2), orig_size=(2 * SIDE, 2 * SIDE))  # fmt: skip
    assert torch.equal(same.tokens, want)
    assert pipe.micro_conditions(1, orig_size=(512, 384)).tolist() == [[512.0, 384.0, 0.0, 0.0, 6.0]]
    assert pipe.condition_settings(crop_coords=[1, 2]) == {
        "aesthetic_score": 6.0, "crop_coords": [1, 2], "orig_size": [2 * SIDE, 2 * SIDE]
    }  # fmt: skip
    for bad, words in [({"aesthetic_score": float("nan")}, "aesthetic_score must be a finite number"),
                       ({"crop_coords": (-1, 0)}, "crop_coords must be two finite numbers >= 0"),
                       ({"orig_size": (0, 8)}, "orig_size must be two finite numbers > 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            pipe("a cat", output_type="tokens", **bad)


def test_guidance_null_is_the_empty_prompt(pipe):
    """The null condition is the empty prompt's encoding (with the call's micro-conditions); the guided runs
    above equal diffusers' AmusedPipeline, whose negative prompt defaults to ""."""
    cond = pipe.null_embeddings(2, aesthetic_score=5.0)
    hidden, pooled = pipe.text_encoder.encode([""])
    torch.testing.assert_close(cond.hidden_states, hidden.expand(2, -1, -1))
    torch.testing.assert_close(cond.pooled, pooled.expand(2, -1))
    assert cond.micro_conds.tolist() == [[2.0 * SIDE, 2.0 * SIDE, 0.0, 0.0, 5.0]] * 2


def test_per_image_generators_match_single_runs(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = pipe(PROMPTS, generator=gens, output_type="tokens", num_inference_steps=4).tokens
    for i, seed in enumerate((1, 2)):
        one = pipe(PROMPTS[i], generator=torch.Generator().manual_seed(seed), output_type="tokens",
                   num_inference_steps=4).tokens  # fmt: skip
        assert torch.equal(both[i], one[0])


def test_model_kind_is_a_sampler_property():
    assert [name for name, cls in SAMPLERS.items() if cls.needs_timestep] == ["ancestral"]
    check_model_kind(Ancestral(), time_agnostic=False)
    with pytest.raises(ValueError, match=r"sampler='ancestral' needs a model trained on a timestep chain.*'uniform'"):
        check_model_kind(Ancestral(), time_agnostic=True)


def test_only_amuseds_step_reads_logits(pipe):
    """aMUSEd's step reads softmax(guided logits) alone, so the chain skips the log_softmax for it (the tensor
    diffusers' scheduler gets); every other strategy gets normalised log-probabilities."""
    assert Confidence(step_rule="amused").reads_logits
    assert not any(cls().reads_logits for cls in SAMPLERS.values())  # defaults (confidence: maskgit)
    cond, null = pipe.encode_prompt(["a cat"]), pipe.null_embeddings(1)
    x_t = torch.full((1, SIDE * SIDE), CODEBOOK)
    x_t[0, :5] = torch.arange(5)
    raw = pipe._predictor(cond, null, 10.0, normalize=False)(x_t, 0)
    log_p = pipe._predictor(cond, null, 10.0)(x_t, 0)
    torch.testing.assert_close(raw.log_softmax(dim=1), log_p)
    assert not torch.allclose(raw.logsumexp(dim=1), torch.zeros(1, SIDE * SIDE))


def test_ancestral_is_refused_with_the_alternatives(pipe):
    with pytest.raises(ValueError, match=r"sampler='ancestral' needs .* time-agnostic .*first_hitting"):
        pipe("a cat", sampler="ancestral", output_type="tokens")


@pytest.mark.parametrize(
    "settings",
    [
        {"sampler": "confidence", "step_rule": "maskgit"},
        {"sampler": "uniform"},
        {"sampler": "uniform", "order": "halton"},
        {"sampler": "purity", "prior_weight": 1.0},
        {"sampler": "remdm"},
        {"sampler": "first_hitting"},
    ],
)
def test_timestep_free_samplers_run(pipe, settings):
    out = pipe(PROMPTS, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np",
               **settings)  # fmt: skip
    assert out.tokens.shape == (2, SIDE, SIDE) and int(out.tokens.max()) < CODEBOOK
    assert out.images.shape == (2, 2 * SIDE, 2 * SIDE, 3)


def test_budget_follows_the_masking_schedule(pipe):
    """Uniformly spaced steps of the mask-only schedule leave N gamma((i + 1) / S) masked (S divides T)."""
    from vqdiffusion.diffusion import masked_fraction, spaced_timesteps, unmask_budget

    schedule, n = pipe.schedule, 256
    budgets = unmask_budget(schedule, spaced_timesteps(schedule.num_timesteps, 12), n)
    left = [n - sum(budgets[: i + 1]) for i in range(12)]
    assert left == [round(n * masked_fraction((i + 1) / 12, "cosine")) for i in range(12)]


@pytest.mark.parametrize("sampler", ["confidence", "uniform", "purity", "first_hitting"])
def test_inpaint_keeps_known_tokens(pipe, sampler):
    image = torch.rand(1, 3, 2 * SIDE, 2 * SIDE, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2 * SIDE, 2 * SIDE, dtype=torch.bool)
    mask[:, : SIDE] = True  # the left half of the tokens is regenerated
    known = pipe.encode_images(image).flatten(1)
    out = pipe.inpaint("a cat", image, mask, sampler=sampler, num_inference_steps=4, output_type="tokens",
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    keep = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    keep[:, SIDE // 2 :] = True
    assert torch.equal(out.tokens.flatten(1)[:, keep.flatten()], known[:, keep.flatten()])


def test_outpaint_and_variation(pipe):
    image = torch.rand(1, 3, 2 * SIDE, 2 * SIDE, generator=torch.Generator().manual_seed(0))
    out = pipe.variation("a cat", image, strength=0.5, num_inference_steps=6, output_type="tokens",
                         generator=torch.Generator().manual_seed(2), aesthetic_score=5.0)  # fmt: skip
    assert out.tokens.shape == (1, SIDE, SIDE)
    with pytest.raises(ValueError, match="unknown sampling keyword"):
        pipe.variation("a cat", image, strength=0.5, aesthetic=5.0)
    out = pipe.outpaint("a cat", image[..., :, :SIDE], offset=(SIDE, 0), num_inference_steps=4, output_type="np",
                        generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert out.images.shape[0] == 1


def test_the_subclass_reads_only_its_kind():
    with pytest.raises(ValueError, match="is not an AmusedPipeline folder; load it with VQDiffusionPipeline"):
        AmusedPipeline.from_pretrained("builtin:shapes")


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "again")
    again = VQDiffusionPipeline.from_pretrained(tmp_path / "again")
    assert isinstance(again, AmusedPipeline)
    a = pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="tokens")
    b = again("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="tokens")
    assert torch.equal(a.tokens, b.tokens)


def test_options_validate_for_the_model(pipe):
    assert isinstance(pipe.sampling_options(sampler="uniform"), SamplingOptions)
    with pytest.raises(ValueError, match="time-agnostic"):
        pipe.sampling_options(sampler="ancestral")


def test_cli_generate_from_a_fake_hub_cache(reference_and_folder, tmp_path, monkeypatch):
    from vqdiffusion.cli import main

    _, folder = reference_and_folder
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "amused/amused-256", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cat.png"
    code = main(["generate", "a photo of a cat", "--model", "amused/amused-256", "--steps", "4", "--seed", "0",
                 "--output", str(out), "--cache-dir", str(cache)])  # fmt: skip
    assert code in (0, None) and out.is_file()


def test_hub_index_accepts_amused(reference_and_folder, tmp_path):
    from vqdiffusion.formats import hub

    _, folder = reference_and_folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "AmusedPipeline"
    hub._check_diffusers_index(folder / "model_index.json", "amused/amused-256")


def test_cli_sample_set_and_variation(reference_and_folder, tmp_path, capsys):
    from PIL import Image

    from vqdiffusion.cli import main

    _, folder = reference_and_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "set"
    argv = ["sample-set", "--quiet", "--model", str(folder), "--prompts", str(prompts), "--num-images", "3",
            "--steps", "3", "--sampler", "purity", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(3)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["sampling"]["sampler"] == "purity"
    image = tmp_path / "in.png"
    Image.new("RGB", (2 * SIDE, 2 * SIDE), (200, 30, 30)).save(image)
    edited = tmp_path / "var.png"
    argv = ["variation", "a cat", "--model", str(folder), "--image", str(image), "--strength", "0.5",
            "--steps", "4", "--quiet", "--output", str(edited)]  # fmt: skip
    assert main(argv) == 0 and edited.is_file()
    assert main(["generate", "a cat", "--model", str(folder), "--sampler", "ancestral", "--output",
                 str(tmp_path / "no.png")]) != 0  # fmt: skip
    assert "sampler='ancestral' needs a model trained on a timestep chain" in capsys.readouterr().err


def test_demo_runs_an_amused_model(pipe):
    from vqdiffusion.demo import DemoApp

    app = DemoApp(pipe)
    options = {"num_inference_steps": 4, "guidance_scale": 10.0, "truncation_rate": 1.0, "sampler": "confidence",
               "spacing": "uniform", "temperature": 1.0, "seed": 0, "num_images": 1}  # fmt: skip
    result = app.text_to_image("a red circle", options)
    assert result.ok, result.status
    want = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(want.images[0]))
    bad = app.text_to_image("a red circle", {**options, "sampler": "ancestral"})
    assert not bad.ok and "time-agnostic" in bad.status
    pytest.importorskip("gradio", reason="the demo page needs Gradio")
    from vqdiffusion.demo import build_demo

    config = build_demo(app).config
    by_id = {c["props"].get("elem_id"): c for c in config["components"]}
    assert by_id["t2i-step-rule"]["props"]["visible"] is True  # the default sampler (confidence) has it
