"""The numerical guards of a run (issue 28; docs/design.md §6.11): NaN or infinite log-probabilities during
sampling, a NaN or infinite text condition, encoder latents or decoded pixels are a ValueError naming the
component at fault and the fix, never an image.  The model-folder cases (denoiser, null condition and VQ-VAE
weights x 1e30, CLI and API) are rows of tests/test_bad_inputs.py; these are the in-memory ones and the
guard's own behaviour (a NaN at one middle step only, one check per run)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from support.weights import tiny_text_components

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.diffusion import MaskReplaceSchedule
from vqdiffusion.pipeline import core
from vqdiffusion.pipeline.checks import NonFiniteError
from vqdiffusion.sampling import FiniteWatch, NonFiniteLogProbsError, SamplingOptions, sample_tokens

K, N = 6, 10


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scaled(pipe: VQDiffusionPipeline, part: str, factor: float = 1e30) -> VQDiffusionPipeline:
    with torch.no_grad():
        for p in getattr(pipe, part).parameters():
            p.mul_(factor)
    return pipe


@pytest.fixture
def pipe(tiny_clip_dirs) -> VQDiffusionPipeline:
    return VQDiffusionPipeline.from_components(tiny_text_components(tiny_clip_dirs))


class FlatPredictor:
    """log p(x0 | x_t) uniform over K classes, with ``value`` at one position of call number ``bad_call``
    only; records the step of every call."""

    def __init__(self, bad_call: int | None = None, value: float = float("nan")) -> None:
        self.bad_call, self.value, self.steps = bad_call, value, []

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        log_p = torch.full((x_t.shape[0], K, N), -math.log(K))
        if len(self.steps) == self.bad_call:
            log_p[0, 0, 3] = self.value
        self.steps.append(t)
        return log_p


@pytest.mark.parametrize("sampler", ["ancestral", "purity", "first_hitting"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_one_bad_middle_step_is_found_and_named(sampler: str, value: float) -> None:
    schedule = MaskReplaceSchedule(K, 20)
    options = SamplingOptions(num_inference_steps=8, guidance_scale=1.0, sampler=sampler)
    good = sample_tokens(FlatPredictor(), schedule, 2, N, options, progress=False)
    assert good.shape == (2, N)
    predict = FlatPredictor(bad_call=1, value=value)
    with pytest.raises(NonFiniteLogProbsError, match=r"NaN or infinite at step t=\d+") as info:
        sample_tokens(predict, schedule, 2, N, options, progress=False)
    assert len(predict.steps) > 2  # the bad call was in the middle of the run
    assert info.value.t == predict.steps[1]


def test_a_position_of_all_minus_inf_is_not_finite() -> None:
    watch = FiniteWatch()
    log_p = torch.zeros(1, K, N)
    watch.add(log_p, 3)
    watch.check()  # finite
    log_p = log_p.clone()
    log_p[0, :, 2] = -float("inf")
    watch.add(log_p, 2)
    with pytest.raises(NonFiniteLogProbsError, match="t=2"):
        watch.check()


def test_truncation_minus_inf_is_fine(pipe) -> None:
    """Truncation writes -inf into the log-probabilities of dropped classes: not an error."""
    out = pipe("a red circle", truncation_rate=0.3, output_type="pt", progress=False)
    assert torch.isfinite(out.images).all()


def test_the_guard_syncs_once_per_run(pipe, monkeypatch) -> None:
    """One check per chain run, whatever the number of steps (the per-step work stays on the device)."""
    checks = []
    real = FiniteWatch.check
    monkeypatch.setattr(FiniteWatch, "check", lambda self, *a: (checks.append(len(self.sums)), real(self, *a))[1])
    pipe("a red circle", num_inference_steps=7, output_type="tokens", progress=False)
    assert checks == [7]


def test_denoiser_x1e30_names_the_denoiser(pipe) -> None:
    with pytest.raises(NonFiniteError, match=r"the denoiser's log-probabilities are NaN or infinite at step t=99"):
        scaled(pipe, "denoiser")("a red circle", progress=False, output_type="tokens")


def test_null_condition_x1e30_names_it_and_guidance_1_still_runs(pipe) -> None:
    scaled(pipe, "null_condition")
    with pytest.raises(NonFiniteError, match=r"null condition of classifier-free guidance.*guidance_scale=1"):
        pipe("a red circle", progress=False, output_type="tokens")
    out = pipe("a red circle", guidance_scale=1.0, progress=False, output_type="pt")
    assert torch.isfinite(out.images).all()


def test_text_encoder_x1e30_is_refused_before_sampling(pipe, monkeypatch) -> None:
    scaled(pipe, "text_encoder")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(core, "sample_tokens", no_sampling)
    with pytest.raises(NonFiniteError, match=r"text encoder's condition is NaN or infinite \(largest \|weight\|"):
        pipe("a red circle", progress=False, guidance_scale=1.0)


@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_vqvae_x1e30_names_the_decoder(pipe, output_type: str) -> None:
    scaled(pipe, "vqvae")
    with pytest.raises(NonFiniteError, match=r"VQ-VAE decoder produced NaN or infinite pixels \(largest"):
        pipe("a red circle", progress=False, output_type=output_type)
    assert pipe("a red circle", progress=False, output_type="tokens").tokens.shape[0] == 1  # no decoding


def test_vqvae_x1e30_names_the_encoder_of_an_edit(pipe) -> None:
    width, height = pipe.image_size
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[:2, :2] = True
    scaled(pipe, "vqvae")
    with pytest.raises(NonFiniteError, match="VQ-VAE encoder produced NaN or infinite latents"):
        pipe.inpaint("x", torch.rand(3, height, width), mask, progress=False, output_type="tokens")


def test_decode_keeps_its_values(pipe) -> None:
    """The decoded pixels are those of the clamped decoder output, as before the guard."""
    tokens = torch.randint(0, pipe.vqvae.config.num_embeddings, (2, 4, 4))
    expected = ((pipe.vqvae.decode_tokens(tokens).float() + 1) / 2).clamp(0, 1)
    assert torch.equal(pipe.decode(tokens), expected)


def test_the_condition_check_reads_every_tensor_of_a_structured_condition() -> None:
    """aMUSEd's condition is a dataclass of tensors (hidden states, pooled embedding, micro-conditions): a NaN in
    any of them is refused, a finite one passes."""
    from vqdiffusion.models.uvit import AmusedCondition
    from vqdiffusion.pipeline.checks import check_condition

    good = AmusedCondition(torch.zeros(1, 4, 8), torch.zeros(1, 8), torch.zeros(1, 5))
    check_condition(good, None)
    for field in ("hidden_states", "pooled", "micro_conds"):
        bad = dataclasses.replace(good, **{field: getattr(good, field).clone().fill_(math.nan)})
        with pytest.raises(NonFiniteError, match="text encoder"):
            check_condition(bad, None)
