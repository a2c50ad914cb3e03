"""Tokenizer and denoiser diagnostics on tokenizers and denoisers built to have known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vqdiffusion.data.shapes import PROMPT_SETS, prompt_set
from vqdiffusion.diffusion import MaskReplaceSchedule
from vqdiffusion.eval.shapes import evaluate
from vqdiffusion.eval.stats import wilson_interval
from vqdiffusion.eval.suite import evaluate_shapes, write_report
from vqdiffusion.eval.tokenizer import (
    NEAR_BLACK_RMS,
    blank_image_codes,
    code_perplexity,
    default_entropy_steps,
    denoiser_x0_entropy,
    format_shape_ceiling,
    near_black_codes,
    token_histogram,
    tokenizer_diagnostics,
    tokenizer_shape_ceiling,
    x0_entropy,
)
from vqdiffusion.models.vqvae import VQVAE, VQVAEConfig

# ---------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------


def test_code_perplexity_of_known_histograms():
    assert code_perplexity(torch.tensor([7, 0, 0, 0])) == pytest.approx(1.0)
    assert code_perplexity(torch.tensor([3, 3, 3, 3, 0, 0])) == pytest.approx(4.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp(H) = 2 ** 1.5
    assert code_perplexity(torch.tensor([2, 1, 1])) == pytest.approx(2**1.5)
    with pytest.raises(ValueError, match="positive sum"):
        code_perplexity(torch.zeros(3))
    tokens = torch.tensor([[0, 2], [2, 2]])
    assert token_histogram(tokens, 4).tolist() == [1, 0, 3, 0]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        token_histogram(tokens, 2)


def test_x0_entropy_in_nats():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]]).t().unsqueeze(0)  # [1, K=4, N=2]
    entropy = x0_entropy(p.log())
    assert torch.allclose(entropy, torch.tensor([[1.5 * math.log(2), 0.0]]))
    uniform = torch.full((2, 8, 3), -math.log(8))
    assert torch.allclose(x0_entropy(uniform), torch.full((2, 3), math.log(8)))


# ---------------------------------------------------------------------------------------------------------
# A real VQVAE with hand-set weights
# ---------------------------------------------------------------------------------------------------------


def constant_vqvae(decoded_value: float) -> VQVAE:
    """A tiny VQVAE (f = 2, K = 16, D = 8) whose encoder output is the constant e_0 = (1, 0, ..., 0) at every
    position (the output conv's weights are zero), whose codebook puts code 5 at e_0 and every other code far
    away, and whose decoder outputs ``decoded_value`` everywhere (in [-1, 1]) whatever the tokens."""
    model = VQVAE(VQVAEConfig.preset("tiny"))
    d = model.config.embed_dim
    with torch.no_grad():
        model.encoder.out_conv.weight.zero_()
        model.encoder.out_conv.bias.copy_(torch.eye(d)[0])
        model.quant_proj.weight.copy_(torch.eye(d).view(d, d, 1, 1))
        model.quant_proj.bias.zero_()
        codes = 10 + torch.arange(16.0).unsqueeze(1) * torch.ones(16, d)  # all far from e_0 ...
        codes[5] = torch.eye(d)[0]  # ... except code 5
        model.codebook.weight.copy_(codes)
        model.decoder.out_conv.weight.zero_()
        model.decoder.out_conv.bias.fill_(decoded_value)
    return model.eval()


def test_hand_set_vqvae_maps_black_to_one_code_and_counts_black_decodes():
    model = constant_vqvae(-1.0)  # decodes to black
    assert blank_image_codes(model) == 1
    assert torch.equal(model.encode(-torch.ones(1, 3, 64, 64)), torch.full((1, 32, 32), 5))
    assert near_black_codes(model).tolist() == list(range(16))  # every code decodes to black
    grey = constant_vqvae(2 * 0.1 - 1)  # decodes to 0.1 on [0, 1]: RMS 0.1 > 0.05
    assert near_black_codes(grey).numel() == 0
    report = tokenizer_diagnostics(model, num_images=8, psnr_images=4, batch_size=4)
    assert report["codes_used"] == 1 and report["code_perplexity"] == pytest.approx(1.0)
    assert report["background_codes"] == 1 and report["background_top1_share"] == 1.0
    assert report["blank_image_codes"] == 1 and report["near_black_codes"] == 16 and report["num_codes"] == 16
    # a render decoded as black: PSNR is that of black against the render, well below 30 dB
    assert 5 < report["psnr"]["seen_pairs"] < 30


def test_position_dependent_latents_give_more_blank_codes():
    """The measurement can fail: a latent that depends on the position splits a black image over codes."""
    model = constant_vqvae(-1.0)
    with torch.no_grad():
        model.quant_proj.bias.copy_(torch.eye(8)[1] * 100)  # latent (1, 100, 0, ...) -> far from code 5
        model.codebook.weight[7] = torch.eye(8)[1] * 100
    assert blank_image_codes(model) == 1 and int(model.encode(-torch.ones(1, 3, 64, 64)).unique()) == 7
    original = model.encoder.forward
    ramp = torch.arange(32.0).view(1, 1, 1, 32) * 10  # x position, scaled past half the code spacing

    def forward(x):
        out = original(x).clone()
        out[:, 1:2] = out[:, 1:2] + ramp  # channel 1 grows along x
        return out

    model.encoder.forward = forward
    with torch.no_grad():
        model.codebook.weight[8] = torch.eye(8)[1] * 300
    assert blank_image_codes(model) == 2


# ---------------------------------------------------------------------------------------------------------
# A palette tokenizer: each 8 x 8 patch -> the nearest of 12 colours
# ---------------------------------------------------------------------------------------------------------

# Grey levels 0, 0.02, 0.04, 0.1 (the first three within NEAR_BLACK_RMS of black), then saturated colours.
PALETTE = torch.tensor(
    [[0.0] * 3, [0.02] * 3, [0.04] * 3, [0.1] * 3]
    + [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    + [[0.6, 0.2, 0.8], [1.0, 0.5, 0.1], [0.1, 0.8, 0.8], [1.0, 1.0, 1.0]]
)


class PaletteTokenizer(torch.nn.Module):
    """Code of a patch = the palette colour nearest to its mean; decoding fills the patch with that colour."""

    config = SimpleNamespace(num_embeddings=len(PALETTE), downsample_factor=8)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.encoded: list[torch.Tensor] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        means = torch.nn.functional.avg_pool2d((images + 1) / 2, 8)  # [B, 3, h, w] in [0, 1]
        tokens = torch.cdist(means.permute(0, 2, 3, 1).reshape(-1, 3), PALETTE).argmin(dim=1)
        tokens = tokens.view(images.shape[0], *means.shape[-2:])
        self.encoded.append(tokens)
        return tokens

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        colours = PALETTE[tokens].permute(0, 3, 1, 2)  # [B, 3, h, w]
        return torch.nn.functional.interpolate(colours, scale_factor=8, mode="nearest") * 2 - 1


def test_palette_tokenizer_diagnostics_match_an_independent_count():
    tokenizer = PaletteTokenizer()
    assert blank_image_codes(tokenizer) == 1
    assert near_black_codes(tokenizer).tolist() == [0, 1, 2]  # grey 0.1 is above NEAR_BLACK_RMS
    assert NEAR_BLACK_RMS == 0.05
    tokenizer.encoded.clear()
    report = tokenizer_diagnostics(tokenizer, num_images=40, psnr_images=4, batch_size=16)
    # the first 40 images encoded are the histogram's renders (3 batches), then one blank image
    histogram_tokens = torch.cat(tokenizer.encoded[:3]).numpy()
    assert histogram_tokens.shape == (40, 8, 8)
    values, counts = np.unique(histogram_tokens, return_counts=True)
    p = counts / counts.sum()
    assert report["codes_used"] == len(values) and report["codes_used"] > 3  # black and some colours
    assert report["code_perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert report["blank_image_codes"] == 1 and report["near_black_codes"] == 3
    # pure-black patches: the renders' black 8 x 8 blocks, counted independently, all get code 0
    assert report["background_codes"] == 1 and report["background_top1_share"] == 1.0
    json.dumps(report)  # JSON-ready


# ---------------------------------------------------------------------------------------------------------
# Denoiser entropy with a denoiser of known output
# ---------------------------------------------------------------------------------------------------------


class KnownDenoiser(torch.nn.Module):
    """log p(x0 | x_t): uniform over K at [MASK] positions, certain (one-hot on x_t) elsewhere."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.k = num_classes
        self.calls: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, t: int, cond: torch.Tensor | None) -> torch.Tensor:
        self.calls.append((x_t.clone(), t, cond))
        masked = x_t == self.k
        one_hot = torch.nn.functional.one_hot(x_t.clamp(max=self.k - 1), self.k).permute(0, 2, 1).float()
        log_p = torch.where(one_hot > 0, 0.0, -math.inf)
        return torch.where(masked.unsqueeze(1), torch.full_like(log_p, -math.log(self.k)), log_p)


class StandInPipeline:
    """A text pipeline made of the palette tokenizer, the known denoiser and a real schedule; ``__call__``
    draws black images (enough for the suite's image-level part)."""

    device = torch.device("cpu")
    condition_kind = "text"

    def __init__(self) -> None:
        self.vqvae = PaletteTokenizer()
        self.schedule = MaskReplaceSchedule(len(PALETTE), 20)
        self.denoiser = KnownDenoiser(len(PALETTE))
        self.prompts: list[str] = []

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        self.prompts += prompts
        return torch.zeros(len(prompts), 4, 8)

    def __call__(self, prompts, generator=None, output_type="pil", progress=True, **kwargs):
        from PIL import Image

        return SimpleNamespace(images=[Image.new("RGB", (64, 64)) for _ in prompts])


def test_denoiser_entropy_is_log_k_times_the_masked_fraction():
    pipe = StandInPipeline()
    report = denoiser_x0_entropy(pipe, num_per_set=5, batch_size=8)
    assert report["steps"] == [19, 10, 2] == default_entropy_steps(20)
    log_k = math.log(len(PALETTE))
    assert report["log_num_codes"] == pytest.approx(log_k)
    assert len(pipe.prompts) == 15 and pipe.prompts[0].startswith("a ")  # canonical captions of 3 x 5 scenes
    for t in report["steps"]:
        x_ts = [x for x, step, _ in pipe.denoiser.calls if step == t]
        fraction = float(torch.cat(x_ts).eq(len(PALETTE)).double().mean())
        assert report["by_step"][str(t)]["all"] == pytest.approx(fraction * log_k, rel=1e-5)
        assert report["by_step"][str(t)]["masked"] == pytest.approx(log_k, rel=1e-5)
    # more masks at larger t (the schedule's gamma grows): entropy decreases with t going down
    values = [report["by_step"][str(t)]["all"] for t in report["steps"]]
    assert values[0] > values[1] > values[2]
    with pytest.raises(ValueError, match="step indices"):
        denoiser_x0_entropy(pipe, steps=[20])


def test_eval_suite_reports_the_diagnostics(tmp_path: Path):
    pipe = StandInPipeline()
    report = evaluate_shapes(pipe, num_per_set=4, batch_size=4, progress=False)
    assert report["tokenizer"]["blank_image_codes"] == 1 and report["tokenizer"]["near_black_codes"] == 3
    assert report["tokenizer_psnr"] == report["tokenizer"]["psnr"]
    assert set(report["denoiser_x0_entropy"]["by_step"]) == {"19", "10", "2"}
    json_path, _ = write_report(report, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["tokenizer"]["num_codes"] == len(PALETTE) and "denoiser_x0_entropy" in data


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's shape ceiling
# ---------------------------------------------------------------------------------------------------------


class StubTokenizer(torch.nn.Module):
    """ "Tokens" are the images themselves; ``decode_tokens`` applies ``damage`` (identity by default).  Records
    what it was asked to encode."""

    config = SimpleNamespace(num_embeddings=4, downsample_factor=8)

    def __init__(self, damage=lambda x: x) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.damage = damage
        self.inputs: list[torch.Tensor] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.clone())
        return images

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.damage(tokens)


CEILING_N = 12


def test_identity_tokenizer_scores_what_the_scorer_gives_the_renders():
    tokenizer = StubTokenizer()
    report = tokenizer_shape_ceiling(tokenizer, num_images_per_set=CEILING_N, seed=3, batch_size=5)
    assert list(report["sets"]) == list(PROMPT_SETS) and report["num_images_per_set"] == CEILING_N
    # the renders it was given, scored directly by the suite's scorer against the suite's scenes
    renders = torch.cat(tokenizer.inputs)  # [3 * n, 3, 64, 64] in [-1, 1], the sets in order
    pixels = ((renders + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, name in enumerate(PROMPT_SETS):
        scenes = prompt_set(name, CEILING_N, 3)
        expected = evaluate(list(pixels[i * CEILING_N : (i + 1) * CEILING_N]), scenes)
        got = report["sets"][name]
        for key, value in expected.items():
            assert got[key] == value, (name, key)
        k = round(expected["fully_correct"] * CEILING_N)
        assert got["fully_correct_ci95"] == wilson_interval(k, CEILING_N)
    # not a vacuous match: the scorer recognises most clean renders
    assert report["sets"]["single_seen"]["fully_correct"] > 0.5  # the scorer recognises clean renders
    json.dumps(report)
    assert "| single_seen | 12 |" in format_shape_ceiling(report)


@pytest.mark.parametrize(
    "damage",
    [
        lambda x: -torch.ones_like(x),  # black
        lambda x: torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 16), scale_factor=16.0),  # blur
    ],
    ids=["black", "blur"],
)
def test_damaging_tokenizers_score_lower(damage):
    clean = tokenizer_shape_ceiling(StubTokenizer(), num_images_per_set=CEILING_N, seed=3)
    damaged = tokenizer_shape_ceiling(StubTokenizer(damage), num_images_per_set=CEILING_N, seed=3)
    for name in PROMPT_SETS:
        assert damaged["sets"][name]["fully_correct"] < clean["sets"][name]["fully_correct"], name
        assert damaged["sets"][name]["lenient_fully_correct"] < clean["sets"][name]["lenient_fully_correct"], name


def test_eval_suite_adds_the_ceiling_when_asked():
    pipe = StandInPipeline()
    report = evaluate_shapes(pipe, num_per_set=2, batch_size=2, progress=False, diagnostics=False)
    assert "tokenizer_ceiling" not in report
    report = evaluate_shapes(
        pipe, num_per_set=2, batch_size=2, progress=False, diagnostics=False, tokenizer_ceiling=True
    )
    assert set(report["tokenizer_ceiling"]["sets"]) == set(PROMPT_SETS)
    assert report["tokenizer_ceiling"]["num_images_per_set"] == 2
