"""Inpainting, outpainting and variation (docs/design.md §10): known tokens exact, one chain run's output
distribution against brute-force enumeration over dense float64 matrices, strength edge cases, batching, and
every bad input."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from support.weights import save_diffusers_pipeline, tiny_label_components, tiny_text_components
from test_diffusion_math import brute_force_posterior, one_step_matrices, product
from test_samplers import K_TOY, N_TOY, ToyPredictor, frequency_bound

from vqdiffusion.diffusion import MaskReplaceSchedule, spaced_timesteps
from vqdiffusion.editing import (
    KnownTokens,
    dilate_tokens,
    model_input,
    place_on_canvas,
    token_mask,
    variation_start,
    variation_start_step,
    variation_timesteps,
)
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.image_inputs import box_mask, image_batch, mask_batch
from vqdiffusion.pipeline import VQDiffusionPipeline
from vqdiffusion.sampling import SAMPLERS, SamplingOptions, sample_tokens
from vqdiffusion.testing import RandomPipelineSpec

MASK_ONLY = MaskReplaceSchedule(K_TOY, 20, 0.95, 0.0, 0.05, 1.0)  # abar = 1 - gbar exactly
REPLACE = MaskReplaceSchedule(K_TOY, 20, 0.9, 0.05, 0.02, 0.6)  # real replacement mass
MASK_ONLY_SAMPLERS = ("remdm", "first_hitting")


def _known(batch: int, seed: int = 0, mode: str = "renoise") -> KnownTokens:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, K_TOY, (batch, N_TOY), generator=g)
    known = torch.zeros(batch, N_TOY, dtype=torch.bool)
    known[:, [0, 3, 4, 8]] = True
    return KnownTokens(tokens, known, mode)


# ---------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------


def test_token_mask_marks_every_token_whose_patch_touches_the_mask() -> None:
    pixels = torch.zeros(1, 8, 12, dtype=torch.bool)
    pixels[0, 3, 5] = True  # patch (row 0, col 1) of 4 x 4 patches
    pixels[0, 7, 11] = True  # patch (1, 2)
    expected = torch.tensor([[[False, True, False], [False, False, True]]])
    assert torch.equal(token_mask(pixels, 4), expected)
    with pytest.raises(ValueError, match="not a multiple"):
        token_mask(torch.zeros(1, 6, 8, dtype=torch.bool), 4)


def test_dilate_tokens_grows_by_one_in_eight_directions() -> None:
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 2, 2] = True
    grown = dilate_tokens(mask, 1)[0]
    assert grown.sum() == 9 and bool(grown[1:4, 1:4].all())
    assert torch.equal(dilate_tokens(mask, 0), mask)


def test_variation_start_step_and_steps_at_the_edges() -> None:
    assert variation_start_step(1.0, 100) == 99
    assert variation_start_step(0.5, 100) == 49
    assert variation_start_step(1e-9, 100) == 0
    assert variation_timesteps(1.0, 100, 10) == spaced_timesteps(100, 10)
    steps = variation_timesteps(0.5, 100, 10)
    assert steps[0] == 49 and steps[1:] == [t for t in spaced_timesteps(100, 10) if t < 49]
    for bad in (0, 0.0, -0.1, 1.01, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="strength must be in"):
            variation_start_step(bad, 100)


def test_variation_start_masks_the_expected_count_for_counting_samplers() -> None:
    x0 = torch.randint(0, K_TOY, (50, N_TOY), generator=torch.Generator().manual_seed(0))
    t = 9
    expected = round(N_TOY * MASK_ONLY.cumulative_at(t)[2])
    for sampler in (s for s in SAMPLERS.values() if s.fills_fixed_count):  # uniform, purity, confidence
        start = variation_start(MASK_ONLY, x0, t, sampler.fills_fixed_count, torch.Generator().manual_seed(1))
        assert ((start == K_TOY).sum(1) == expected).all()
        assert torch.equal(torch.where(start == K_TOY, x0, start), x0)  # the rest is x0


def test_renoised_known_tokens_follow_q_xt_given_x0() -> None:
    """The model's input at known positions is a draw of q(x_t | x0): frequencies against the dense
    cumulative matrix Qbar_t[x0, :] (float64 products of the one-step matrices)."""
    n, t = 40000, 7
    tokens = torch.full((n, 1), 2, dtype=torch.long)
    known = KnownTokens(tokens, torch.ones(n, 1, dtype=torch.bool), "renoise")
    x_in = model_input(torch.full((n, 1), K_TOY), known, REPLACE, t, torch.Generator().manual_seed(0))
    expected = product(one_step_matrices(REPLACE)[: t + 1], K_TOY + 1)[2]
    freq = torch.bincount(x_in.flatten(), minlength=K_TOY + 1).double() / n
    for p, f in zip(expected.tolist(), freq.tolist(), strict=True):
        assert abs(p - f) <= frequency_bound(p, n)
    clean = model_input(torch.full((n, 1), K_TOY), KnownTokens(tokens, known.known, "clean"), REPLACE, t)
    assert bool((clean == 2).all())


def test_place_on_canvas_by_hand() -> None:
    image = torch.arange(2 * 3, dtype=torch.float32).view(1, 2, 3).expand(3, 2, 3) + 1
    canvas, uncovered = place_on_canvas(image, (4, 4), (2, -1))  # 1 row above the canvas, 1 column off the right
    assert canvas.shape == (3, 4, 4)
    assert canvas[0, 0, 2:].tolist() == [4.0, 5.0] and float(canvas[0, 1:].abs().sum()) == 0
    assert uncovered.sum() == 14 and not bool(uncovered[0, 2:].any())
    with pytest.raises(ValueError, match="does not overlap"):
        place_on_canvas(image, (4, 4), (4, 0))


def test_image_and_mask_inputs() -> None:
    array = np.zeros((4, 6, 3), np.uint8)
    array[0, 0] = 255
    batch = image_batch([Image.fromarray(array), array, torch.zeros(3, 4, 6)], (6, 4))
    assert batch.shape == (3, 3, 4, 6) and float(batch[0, :, 0, 0].min()) == 1.0 and float(batch[1].max()) == 1.0
    with pytest.raises(ValueError, match=r"image is 6x4 but the model makes 8x8 images; resize it to 8x8"):
        image_batch(array, (8, 8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        image_batch(torch.full((3, 4, 6), 2.0), (6, 4))
    with pytest.raises(ValueError, match="must be a PIL image"):
        image_batch("picture.png", (6, 4))
    assert mask_batch(np.full((4, 6), 255, np.uint8), (6, 4)).all()


def test_a_non_binary_mask_is_thresholded_with_a_warning(caplog) -> None:
    soft = torch.tensor([[0.2, 0.5], [0.7, 1.0]])
    with caplog.at_level(logging.WARNING):
        out = mask_batch(soft, (2, 2))
    assert out[0].tolist() == [[False, True], [True, True]] and "thresholded at 0.5" in caplog.text
    caplog.clear()
    mask_batch(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), (2, 2))
    assert "thresholded" not in caplog.text


def test_box_mask_by_hand_and_outside() -> None:
    mask = box_mask((1, 0, 3, 2), (4, 3))
    assert mask.shape == (1, 3, 4) and sorted(map(tuple, mask[0].nonzero().tolist())) == [
        (0, 1),
        (0, 2),
        (1, 1),
        (1, 2),
    ]
    with pytest.raises(ValueError, match="not inside the 4x3 image"):
        box_mask((1, 0, 5, 2), (4, 3))
    with pytest.raises(ValueError, match="not inside"):
        box_mask((2, 0, 2, 2), (4, 3))


# ---------------------------------------------------------------------------------------------------------
# The chain with known tokens
# ---------------------------------------------------------------------------------------------------------


def _sampler_options(sampler: str, steps: int = 6) -> SamplingOptions:
    return SamplingOptions(num_inference_steps=steps, sampler=sampler, prior_weight=1.0 if sampler == "purity" else 0.0)


@pytest.mark.parametrize("mode", ["renoise", "clean"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", [MASK_ONLY, REPLACE], ids=["mask_only", "mask_replace"])
def test_known_tokens_are_bit_identical_for_every_sampler(sampler: str, mode: str, schedule) -> None:
    if sampler in MASK_ONLY_SAMPLERS and schedule is REPLACE:
        pytest.skip("remdm and first_hitting need a mask-only schedule")
    known = _known(4, mode=mode)
    out = sample_tokens(
        ToyPredictor(),
        schedule,
        4,
        N_TOY,
        _sampler_options(sampler),
        generator=torch.Generator().manual_seed(0),
        progress=False,
        known=known,
    )
    assert torch.equal(out[known.known], known.tokens[known.known])
    assert int(out.max()) < K_TOY  # nothing left masked


@pytest.mark.parametrize("sampler", ["uniform", "purity"])
def test_budget_samplers_fill_only_the_unknown_positions(sampler: str) -> None:
    """With clean known tokens the model sees exactly the unknown [MASK] count, which follows the budget of
    the unknown positions (not of all N) and ends at 0."""
    from vqdiffusion.diffusion import unmask_budget

    predict, known = ToyPredictor(), _known(3, mode="clean")
    free = N_TOY - int(known.known[0].sum())
    options = _sampler_options(sampler, steps=4)
    sample_tokens(
        predict, MASK_ONLY, 3, N_TOY, options, generator=torch.Generator().manual_seed(0), progress=False, known=known
    )
    steps = spaced_timesteps(MASK_ONLY.num_timesteps, 4)
    budget = unmask_budget(MASK_ONLY, steps, free)
    expected = [(t, free - sum(budget[:i])) for i, t in enumerate(steps) if budget[i] > 0]
    assert [(t, masked[0]) for t, masked in predict.calls] == expected


def test_counting_samplers_refuse_rows_with_different_mask_counts() -> None:
    known = _known(2)
    known.known[1, 1] = True
    with pytest.raises(ValueError, match="same number of them; got \\[5, 6\\]"):
        sample_tokens(ToyPredictor(), MASK_ONLY, 2, N_TOY, _sampler_options("purity"), progress=False, known=known)


class TinyPredictor:
    """log p(x0 | x_t) [B, K, N] of a K = 2, N = 3 toy: a fixed function of each row's tokens and t."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.table = torch.randn(3, 3, 2, 3, generator=g, dtype=torch.float64)  # (x_t at pos 0, 1, 2) ...

    def log_probs(self, x: tuple[int, int, int], t: int) -> torch.Tensor:
        logits = 3.0 * self.table[x[0], x[1]] + 0.5 * (1 + t) * self.table[x[2], x[1]]  # [2, 3]
        return torch.log_softmax(logits, dim=0)  # [K, N]

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        table = torch.stack([self.log_probs(x, t) for x in itertools.product(range(3), repeat=3)])  # [27, K, N]
        return table[x_t[:, 0] * 9 + x_t[:, 1] * 3 + x_t[:, 2]].float()


def brute_force_two_steps(schedule, predictor, x0_known: int, t: int, s: int, mode: str) -> dict:
    """P(final x0 at positions 1, 2) for the chain [t, s] from x_t = (., [MASK], [MASK]) with position 0 known,
    by enumerating the known token's noise at each call (renoise: q(x_t | x0) from the dense Qbar) and the
    intermediate x_s at the unknown positions (Bayes posterior of test_diffusion_math)."""
    K = 2
    mats = one_step_matrices(schedule)

    def known_inputs(step: int) -> list[tuple[int, float]]:
        if mode == "clean":
            return [(x0_known, 1.0)]
        row = product(mats[: step + 1], K + 1)[x0_known]
        return [(v, float(row[v])) for v in range(K + 1) if row[v] > 0]

    out = {pair: 0.0 for pair in itertools.product(range(K), repeat=2)}
    for v1, p_v1 in known_inputs(t):
        p_x0 = predictor.log_probs((v1, K, K), t).exp()  # [K, N]
        post = [brute_force_posterior(schedule, p_x0[:, i], K, t, s) for i in (1, 2)]  # [K+1] each
        for a, b in itertools.product(range(K + 1), repeat=2):
            p_ab = p_v1 * float(post[0][a] * post[1][b])
            if p_ab == 0:
                continue
            for v2, p_v2 in known_inputs(s):
                last = predictor.log_probs((v2, a, b), s).exp()
                for c, d in out:
                    out[(c, d)] += p_ab * p_v2 * float(last[c, 1] * last[d, 2])
    return out


@pytest.mark.parametrize("mode", ["renoise", "clean"])
@pytest.mark.parametrize(
    "schedule",
    [MaskReplaceSchedule(2, 6, 0.9, 0.05, 0.02, 0.6), MaskReplaceSchedule(2, 6, 0.95, 0.0, 0.05, 1.0)],
    ids=["replace", "mask_only"],
)
def test_chain_with_known_tokens_matches_brute_force(schedule, mode: str) -> None:
    """Two ancestral steps (t = 4 -> s = 1 -> x0) with one known token: the frequencies of the unknown
    positions' outcomes over 40,000 rows against exact enumeration."""
    n, t, s = 40000, 4, 1
    predictor = TinyPredictor()
    tokens = torch.zeros(n, 3, dtype=torch.long)
    tokens[:, 0] = 1
    known = KnownTokens(tokens, torch.tensor([[True, False, False]]).expand(n, 3), mode)
    out = sample_tokens(
        predictor,
        schedule,
        n,
        3,
        SamplingOptions(num_inference_steps=2),
        generator=torch.Generator().manual_seed(0),
        progress=False,
        timesteps=[t, s],
        known=known,
    )
    assert bool((out[:, 0] == 1).all())
    exact = brute_force_two_steps(schedule, predictor, 1, t, s, mode)
    assert abs(sum(exact.values()) - 1.0) < 1e-9
    for (c, d), p in exact.items():
        freq = float(((out[:, 1] == c) & (out[:, 2] == d)).double().mean())
        assert abs(freq - p) <= frequency_bound(p, n), ((c, d), freq, p)


# ---------------------------------------------------------------------------------------------------------
# The pipeline's editing methods
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_pipes(tiny_clip_dirs, tmp_path_factory):
    """The tiny text pipeline saved in our layout and loaded back, and a random diffusers-layout one."""
    ours_dir = tmp_path_factory.mktemp("ours")
    VQDiffusionPipeline.from_components(tiny_text_components(tiny_clip_dirs)).save_pretrained(ours_dir)
    theirs_dir = tmp_path_factory.mktemp("diffusers")
    save_diffusers_pipeline(theirs_dir, RandomPipelineSpec(seed=4))
    return {
        "ours": VQDiffusionPipeline.from_pretrained(ours_dir),
        "diffusers": VQDiffusionPipeline.from_pretrained(theirs_dir, text_pad_token_id=None),
    }


def _mask_only(pipe: VQDiffusionPipeline) -> VQDiffusionPipeline:
    """The same components with a mask-only schedule of the same K and T (for remdm / first_hitting)."""
    K, T = pipe.schedule.num_classes, pipe.schedule.num_timesteps
    parts = pipe.components
    schedule = MaskReplaceSchedule(K, T, 0.99, 0.0, 0.01, 1.0)
    return VQDiffusionPipeline.from_components(PipelineComponents(**{**vars(parts), "schedule": schedule}))


def _image(pipe: VQDiffusionPipeline, seed: int = 0) -> torch.Tensor:
    width, height = pipe.image_size
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def _left_half(pipe: VQDiffusionPipeline) -> torch.Tensor:
    width, height = pipe.image_size
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[:, : width // 2] = True
    return mask


@pytest.mark.parametrize("layout", ["ours", "diffusers"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["renoise", "clean"])
def test_inpaint_keeps_the_image_tokens_outside_the_mask(text_pipes, layout: str, sampler: str, mode: str) -> None:
    pipe = text_pipes[layout]
    if sampler in MASK_ONLY_SAMPLERS:
        pipe = _mask_only(pipe)
    image, mask = _image(pipe), _left_half(pipe)
    extra = {"prior_weight": 1.0} if sampler == "purity" else {}
    out = pipe.inpaint(
        "a red circle",
        image,
        mask,
        known_tokens=mode,
        sampler=sampler,
        num_inference_steps=4,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        output_type="tokens",
        **extra,
    )
    x0 = pipe.encode_images(image[None])
    keep = ~token_mask(mask[None], pipe.vqvae.config.downsample_factor)[0]
    assert out.tokens.shape == (2, *keep.shape)
    assert all(torch.equal(tokens[keep], x0[0][keep]) for tokens in out.tokens)


def test_class_and_unconditional_models_inpaint() -> None:
    for kind in ("class", "none"):
        pipe = VQDiffusionPipeline.from_components(tiny_label_components(kind))
        prompt = [1, 3] if kind == "class" else None
        image, mask = _image(pipe), _left_half(pipe)
        out = pipe.inpaint(
            prompt,
            image,
            mask,
            generator=torch.Generator().manual_seed(0),
            progress=False,
            output_type="tokens",
            num_images_per_prompt=1 if kind == "class" else 3,
        )
        keep = ~token_mask(mask[None], 2)[0]
        assert len(out.tokens) in (2, 3) and all(
            torch.equal(t[keep], pipe.encode_images(image[None])[0][keep]) for t in out.tokens
        )


@pytest.mark.parametrize("sampler", ["ancestral", "purity", "confidence"])
def test_batched_editing_equals_one_image_at_a_time(text_pipes, sampler: str) -> None:
    """Two prompts with their own images and masks of different sizes (a counting sampler runs one chain per
    mask size) and per-image generators: the same tokens as four separate calls."""
    pipe = text_pipes["ours"]
    width, height = pipe.image_size
    images = [_image(pipe, 1), _image(pipe, 2)]
    small = torch.zeros(height, width, dtype=torch.bool)
    small[:2, :2] = True
    masks = [_left_half(pipe), small]
    prompts = ["a red circle", "a blue square"]
    extra = {"prior_weight": 1.0} if sampler == "purity" else {}

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = pipe.inpaint(
        prompts,
        images,
        masks,
        sampler=sampler,
        num_images_per_prompt=2,
        generator=gens(range(4)),
        progress=False,
        output_type="pt",
        **extra,
    )
    for row in range(4):
        p = row // 2
        alone = pipe.inpaint(
            prompts[p],
            images[p],
            masks[p],
            sampler=sampler,
            generator=gens([row]),
            progress=False,
            output_type="pt",
            **extra,
        )
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        torch.testing.assert_close(batch.images[row], alone.images[0], rtol=0, atol=1e-5)  # (batched convs)
    varied = pipe.variation(
        prompts,
        images,
        0.5,
        sampler=sampler,
        num_images_per_prompt=2,
        generator=gens(range(4)),
        progress=False,
        output_type="tokens",
        **extra,
    )
    for row in range(4):
        alone = pipe.variation(
            prompts[row // 2],
            images[row // 2],
            0.5,
            sampler=sampler,
            generator=gens([row]),
            progress=False,
            output_type="tokens",
            **extra,
        )
        assert torch.equal(varied.tokens[row], alone.tokens[0])


def test_variation_at_strength_one_is_plain_generation(text_pipes) -> None:
    pipe = text_pipes["ours"]
    for sampler in ("ancestral", "purity"):
        extra = {"prior_weight": 1.0} if sampler == "purity" else {}
        varied = pipe.variation(
            "a red circle",
            _image(pipe),
            1.0,
            sampler=sampler,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(3),
            progress=False,
            output_type="tokens",
            **extra,
        )
        plain = pipe(
            "a red circle",
            sampler=sampler,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(3),
            progress=False,
            output_type="tokens",
            **extra,
        )
        assert torch.equal(varied.tokens, plain.tokens)


def test_variation_strength_sets_the_start_and_the_steps(text_pipes) -> None:
    pipe = text_pipes["ours"]
    seen = []
    pipe.variation(
        "a", _image(pipe), 0.3, num_inference_steps=10, progress=False, callback=lambda done, total: seen.append(total)
    )
    # the 10-step run is 99, 89, ..., 9; strength 0.3 starts at ceil(30) - 1 = 29, then 19 and 9
    assert variation_timesteps(0.3, 100, 10) == [29, 19, 9] and seen[-1] == 3
    # a budget sampler on a mask-only schedule keeps every token the start left unmasked: at strength 0.3
    # that is all but round(N gbar_29) of the image's own tokens
    masked_only = _mask_only(pipe)
    image = _image(pipe)
    out = masked_only.variation(
        "a",
        image,
        0.3,
        sampler="uniform",
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        output_type="tokens",
        num_images_per_prompt=8,
    )
    n = out.tokens[0].numel()
    kept = n - round(n * masked_only.schedule.cumulative_at(29)[2])
    same = (out.tokens == masked_only.encode_images(image[None])).flatten(1).sum(1)
    assert 0 < kept < n and bool((same >= kept).all())


def test_outpaint_keeps_the_placed_image(text_pipes) -> None:
    pipe = text_pipes["ours"]
    width, height = pipe.image_size
    part = _image(pipe)[:, :, : width // 2]  # the left half, placed on the right
    out = pipe.outpaint(
        "a",
        part,
        offset=(width // 2, 0),
        generator=torch.Generator().manual_seed(0),
        progress=False,
        output_type="tokens",
    )
    canvas, uncovered = place_on_canvas(part, (height, width), (width // 2, 0))
    keep = ~token_mask(uncovered[None], 2)[0]
    assert bool(keep[:, -1].all()) and not bool(keep[:, 0].any())
    assert torch.equal(out.tokens[0][keep], pipe.encode_images(canvas[None])[0][keep])


def test_editing_bad_inputs_name_the_value_and_the_fix(text_pipes) -> None:
    pipe = text_pipes["ours"]
    width, height = pipe.image_size
    image, mask = _image(pipe), _left_half(pipe)
    cases = [
        (lambda: pipe.inpaint("a", torch.rand(3, height * 2, width), mask), "resize it to"),
        (lambda: pipe.inpaint("a", image, torch.zeros(height, width + 2, dtype=torch.bool)), "mask is"),
        (lambda: pipe.inpaint("a", image, torch.zeros(height, width, dtype=torch.bool)), "the mask is empty"),
        (lambda: pipe.inpaint("a", image, torch.ones(height, width, dtype=torch.bool)), "covers every token"),
        (lambda: pipe.inpaint("a", image, mask, known_tokens="noisy"), "known_tokens must be one of"),
        (lambda: pipe.inpaint(["a", "b"], [image] * 3, mask), "got 3 images for 2 prompt"),
        (lambda: pipe.inpaint("a", image, mask, steps=3), "unknown sampling keyword"),
        (lambda: pipe.inpaint("a", image, mask, truncation_rate=2.0), "truncation_rate must be in"),
        (lambda: pipe.variation("a", image, 0.0), "strength must be in"),
        (lambda: pipe.variation("a", image, 1.5), "strength must be in"),
        (lambda: pipe.outpaint("a", image, offset=(width, 0)), "does not overlap"),
        (lambda: pipe.outpaint("a", image, offset=(0, 0)), "covers the whole"),
    ]
    for call, phrase in cases:
        with pytest.raises(ValueError, match=phrase):
            call()
