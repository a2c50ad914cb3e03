"""Ours <-> diffusers layout: round trips are the identity and diffusers loads our export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.weights import TinySpec, save_diffusers_pipeline

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.cli import main
from vqdiffusion.formats.diffusers import save_diffusers

diffusers = pytest.importorskip("diffusers")


def assert_same_weights(a: VQDiffusionPipeline, b: VQDiffusionPipeline) -> None:
    for name, module in a.modules().items():
        other = b.modules()[name].state_dict()
        state = module.state_dict()
        assert set(state) == set(other), name
        for key, value in state.items():
            assert torch.equal(value, other[key]), (name, key)


@pytest.mark.parametrize("learnable_null", [True, False])
def test_ours_diffusers_ours_is_identity(tmp_path: Path, learnable_null: bool) -> None:
    save_diffusers_pipeline(tmp_path / "src", TinySpec(seed=4, learnable_null=learnable_null))
    ours = VQDiffusionPipeline.from_pretrained(tmp_path / "src", text_pad_token_id=None)
    save_diffusers(ours.components, tmp_path / "exported")
    back = VQDiffusionPipeline.from_pretrained(tmp_path / "exported", text_pad_token_id=None)
    assert_same_weights(ours, back)
    assert back.schedule == ours.schedule
    assert (back.null_condition is None) == (not learnable_null)


def test_diffusers_loads_our_export_and_matches_step_by_step(tmp_path: Path) -> None:
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )

    save_diffusers_pipeline(tmp_path / "src", TinySpec(seed=5))
    ours = VQDiffusionPipeline.from_pretrained(tmp_path / "src", text_pad_token_id=None)
    out = save_diffusers(ours.components, tmp_path / "exported")
    ref = diffusers.VQDiffusionPipeline.from_pretrained(out)
    assert isinstance(ref.learned_classifier_free_sampling_embeddings, LearnedClassifierFreeSamplingEmbeddings)
    prompts = ["a red circle", "blue"]
    theirs = ref._encode_prompt(prompts, 1, True)
    torch.testing.assert_close(ours.encode_prompt(prompts), theirs[2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.null_embeddings(2), theirs[:2])
    K = ours.schedule.num_classes
    x_t = torch.randint(0, K + 1, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_ref = ref.transformer(torch.cat([x_t, x_t]), encoder_hidden_states=theirs, timestep=torch.tensor(40)).sample
        out_ours = ours.denoiser(torch.cat([x_t, x_t]), 40, theirs)
        posterior_ref = torch.softmax(ref.scheduler.q_posterior(out_ref, torch.cat([x_t, x_t]), torch.tensor(40)), 1)
    posterior_ours = ours.schedule.posterior_log_probs(out_ours, torch.cat([x_t, x_t]), 40).exp()
    torch.testing.assert_close(posterior_ours, posterior_ref, rtol=0, atol=2e-5)


def test_convert_cli(tmp_path: Path, capsys) -> None:
    save_diffusers_pipeline(tmp_path / "src", TinySpec(seed=6))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "vqdiffusion.json").is_file()
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "diff"), "--to", "diffusers"]) == 0
    assert (tmp_path / "diff" / "model_index.json").is_file()
    assert_same_weights(
        VQDiffusionPipeline.from_pretrained(tmp_path / "ours"), VQDiffusionPipeline.from_pretrained(tmp_path / "diff")
    )
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ours")]) == 2
    assert "not empty" in capsys.readouterr().err
