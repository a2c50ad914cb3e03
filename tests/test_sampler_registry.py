"""The sampling strategies as typed classes: their settings' checks, the flat spelling (keywords, CLI flags,
``defaults.json``) resolved to a strategy object, and what adding a strategy takes: its class in the
registry, after which the pipeline, the CLI and the demo offer it without any other change."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import ClassVar

import pytest
import torch

from vqdiffusion.config import setting
from vqdiffusion.samplers import (
    SAMPLERS,
    Ancestral,
    Chain,
    Confidence,
    FirstHitting,
    Purity,
    ReMDM,
    Sampler,
    Uniform,
    make_sampler,
    sampler_settings,
)
from vqdiffusion.sampling import SamplingOptions


def test_registry_names_and_properties() -> None:
    assert list(SAMPLERS) == ["ancestral", "uniform", "purity", "confidence", "remdm", "first_hitting"]
    assert all(cls.name == name for name, cls in SAMPLERS.items())
    assert [n for n, c in SAMPLERS.items() if c.fills_fixed_count] == ["uniform", "purity", "confidence"]
    assert [n for n, c in SAMPLERS.items() if c.needs_mask_only_schedule] == ["remdm", "first_hitting"]
    assert [n for n, c in SAMPLERS.items() if c.needs_timestep] == ["ancestral"]
    assert Purity.setting_names() == ("tokens_per_call", "prior_weight")
    assert set(sampler_settings()) == {
        "tokens_per_call", "order", "prior_weight", "masking_schedule", "choice_temperature", "step_rule",
        "remask_schedule", "remask_eta",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Purity(prior_weight=-1.0), "prior_weight must be a number in [0, 1000], got -1.0"),
        (lambda: Purity(prior_weight=float("nan")), "prior_weight must be a number in [0, 1000], got nan"),
        (lambda: Uniform(tokens_per_call=0), "tokens_per_call must be a positive integer or None, got 0"),
        (lambda: Uniform(tokens_per_call=True), "tokens_per_call must be a positive integer or None, got True"),
        (lambda: Uniform(order="spiral"), "order must be one of ['random', 'halton'], got 'spiral'"),
        (lambda: Confidence(masking_schedule="square"), "masking_schedule must be one of ['cosine', 'linear']"),
        (lambda: ReMDM(remask_eta=1.5), "remask_eta must be a number in [0, 1], got 1.5"),
    ],
)
def test_each_strategy_checks_its_own_settings(make, message) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value).startswith(message)


def test_flat_keywords_resolve_to_a_strategy() -> None:
    assert make_sampler("purity", prior_weight=1.0) == Purity(prior_weight=1.0)
    assert make_sampler(Uniform(order="halton"), tokens_per_call=4) == Uniform(tokens_per_call=4, order="halton")
    assert make_sampler("ancestral", prior_weight=0.0, order="random") == Ancestral()  # defaults are no-ops
    with pytest.raises(ValueError, match=r"^prior_weight must be 0.0 unless sampler is one of \['purity'\]"):
        make_sampler("uniform", prior_weight=1.0)
    with pytest.raises(ValueError, match=r"^sampler must be one of \['ancestral'"):
        make_sampler("greedy")
    with pytest.raises(ValueError, match="unknown sampler setting"):
        make_sampler("purity", weight=1.0)
    # another sampler keeps the settings it shares with the base (the model's default)
    assert make_sampler("uniform", base=Purity(prior_weight=2.0, tokens_per_call=3)) == Uniform(tokens_per_call=3)
    options = SamplingOptions(num_inference_steps=5, sampler="purity", prior_weight=1.0)
    assert options.sampler == Purity(prior_weight=1.0)
    assert SamplingOptions(num_inference_steps=5, sampler=Purity(prior_weight=1.0)) == options
    assert options.with_values(sampler="first_hitting").sampler == FirstHitting()
    assert options.with_values(tokens_per_call=2).sampler == Purity(prior_weight=1.0, tokens_per_call=2)
    assert dataclasses.replace(options, num_inference_steps=7).sampler == options.sampler


def test_defaults_json_round_trip_and_the_old_flat_files(tmp_path) -> None:
    options = SamplingOptions(num_inference_steps=5, sampler="remdm", remask_eta=0.5)
    assert options.to_dict() == {
        "num_inference_steps": 5, "guidance_scale": 5.0, "truncation_rate": 1.0, "spacing": "uniform",
        "temperature": 1.0, "sampler": "remdm", "remask_schedule": "cap", "remask_eta": 0.5,
    }  # fmt: skip
    path = tmp_path / "defaults.json"
    options.save_json(path)
    assert SamplingOptions.load_json(path) == options
    # a file of the flat layout that listed every sampler's settings (the built-in model's, for one)
    old = {**options.to_dict(), "prior_weight": 0.0, "tokens_per_call": None, "order": "random",
           "masking_schedule": "cosine", "choice_temperature": 4.5}  # fmt: skip
    path.write_text(json.dumps(old))
    assert SamplingOptions.load_json(path) == options
    path.write_text(json.dumps({**old, "prior_weight": 1.0}))
    with pytest.raises(ValueError, match="prior_weight must be 0.0 unless sampler is one of"):
        SamplingOptions.load_json(path)
    path.write_text(json.dumps({**old, "noise": 1.0}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['noise'\]"):
        SamplingOptions.load_json(path)


@dataclasses.dataclass(frozen=True)
class Repeat(Sampler):
    """A toy strategy: x0 drawn from the first step's p(x0 | x_T) at every position, ``rounds`` times (the
    last draw kept)."""

    name: ClassVar[str] = "repeat"
    summary: ClassVar[str] = "a toy strategy registered by a test"

    rounds: int = setting(1, "draws of x0 from the first step", label="Rounds", low=1, high=5, step=1)

    def run(self, chain: Chain) -> torch.Tensor:
        from vqdiffusion.diffusion import sample_categorical

        log_p = chain.log_p_x0_at(chain.x_t, chain.steps[0])
        for i in range(self.rounds):
            x0 = chain.keep(sample_categorical(log_p, chain.generator))
            chain.report(i + 1, self.rounds)
        return x0


def test_a_new_strategy_needs_only_its_class_in_the_registry(monkeypatch) -> None:
    from support.weights import tiny_label_components

    from vqdiffusion.cli.sampling_flags import add_sampling_arguments, sampling_arguments
    from vqdiffusion.demo import DemoApp
    from vqdiffusion.pipeline import VQDiffusionPipeline

    monkeypatch.setitem(SAMPLERS, "repeat", Repeat)
    pipe = VQDiffusionPipeline.from_components(tiny_label_components("class"))
    seen = []
    out = pipe([1], sampler="repeat", rounds=3, num_inference_steps=2, output_type="tokens", progress=False,
               callback=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen == [(1, 3), (2, 3), (3, 3)] and int(out.tokens.max()) < pipe.schedule.num_classes
    with pytest.raises(ValueError, match=r"^rounds must be an integer in \[1, 5\], got 9"):
        pipe([1], sampler="repeat", rounds=9, progress=False)
    with pytest.raises(ValueError, match=r"^rounds must be 1 unless sampler is one of \['repeat'\]"):
        pipe([1], sampler="purity", rounds=2, progress=False)

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args(["--sampler", "repeat", "--rounds", "2"])
    assert sampling_arguments(args) == {"sampler": "repeat", "rounds": 2}
    assert "repeat: a toy strategy registered by a test" in " ".join(parser.format_help().split())

    app = DemoApp(pipe)
    result = app.text_to_image("1", {"sampler": "repeat", "rounds": 2, "num_inference_steps": 2, "num_images": 1})
    assert result.ok, result.status
    bad = app.text_to_image("1", {"sampler": "repeat", "rounds": 7})
    assert "Rounds must be an integer in [1, 5], got 7" in bad.status
