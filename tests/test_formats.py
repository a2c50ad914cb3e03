"""Our model folder layout (vqdiffusion.formats.ours): the typed index (version 2), reading version 1, checks
on load that name the file and field; PipelineComponents round trips."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from support.weights import TINY_VQ_CONFIG

import vqdiffusion
from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.config import ConfigError
from vqdiffusion.diffusion import MaskReplaceSchedule
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.formats.ours import FORMAT_VERSION, INDEX_FILE, load_ours, read_index, save_ours
from vqdiffusion.models.conditions import CLIPTextCondition, ConditionConfig, LearnedNullCondition
from vqdiffusion.models.denoiser import Denoiser, DenoiserConfig
from vqdiffusion.models.vqvae import VQVAE
from vqdiffusion.sampling import SamplingOptions

BUILTIN = Path(vqdiffusion.__file__).parent / "assets" / "shapes"
VQ_CONFIG = TINY_VQ_CONFIG


def _components(kind: str, tiny_clip_dirs=None, *, null: bool = True) -> PipelineComponents:
    torch.manual_seed(0)
    parts = {"vqvae": VQVAE(VQ_CONFIG), "schedule": MaskReplaceSchedule.paper_mask_and_replace(16, 100)}
    parts["defaults"] = SamplingOptions(num_inference_steps=7, guidance_scale=2.0 if null else 1.0)
    if kind == "text":
        text = CLIPTextCondition.from_pretrained(*tiny_clip_dirs, pad_token_id=0)
        parts["denoiser"] = Denoiser(DenoiserConfig.preset("tiny", cond_dim=text.hidden_size))
        parts["text_encoder"] = text
        if null:
            parts["null_condition"] = LearnedNullCondition(torch.randn(text.max_length, text.hidden_size))
    elif kind == "class":
        parts["denoiser"] = Denoiser(DenoiserConfig.preset("tiny", cond_dim=None, num_class_labels=5 if null else 4))
        parts["null_class_label"] = 4 if null else None
    else:
        parts["denoiser"] = Denoiser(DenoiserConfig.preset("tiny", cond_dim=None))
        parts["defaults"] = SamplingOptions(num_inference_steps=7, guidance_scale=1.0)
    return PipelineComponents(**parts)


def _assert_same(a: PipelineComponents, b: PipelineComponents) -> None:
    assert (a.schedule, a.defaults, a.null_class_label) == (b.schedule, b.defaults, b.null_class_label)
    assert (a.text_encoder is None) == (b.text_encoder is None) and (a.null_condition is None) == (
        b.null_condition is None
    )
    if a.text_encoder is not None:
        assert a.text_encoder.pad_token_id == b.text_encoder.pad_token_id
    for name in ("vqvae", "denoiser", "null_condition"):
        mine, theirs = getattr(a, name), getattr(b, name)
        if mine is not None:
            other = theirs.state_dict()
            assert all(torch.equal(v, other[k]) for k, v in mine.state_dict().items()), name


CASES = [("text", True), ("text", False), ("class", True), ("class", False), ("none", False)]
TEXT_SIZES = {"dim": 32, "seq_len": 77, "num_labels": None, "pad_token_id": 0}
NO_SIZES = {"dim": None, "seq_len": None, "num_labels": None, "pad_token_id": None}
EXPECTED = {
    ("text", True): {"kind": "text", **TEXT_SIZES, "null": "learned"},
    ("text", False): {"kind": "text", **TEXT_SIZES, "null": "empty_prompt"},
    ("class", True): {"kind": "class", **NO_SIZES, "num_labels": 4, "null": "learned"},
    ("class", False): {"kind": "class", **NO_SIZES, "num_labels": 4, "null": "none"},
    ("none", False): {"kind": "none", **NO_SIZES, "null": "none"},
}


def _as_v1(folder: Path) -> None:
    """Rewrite a version-2 index the way version 1 wrote it."""
    condition = json.loads((folder / INDEX_FILE).read_text())["condition"]
    index = {"format": "vqdiffusion-pipeline", "format_version": 1, "condition": condition["kind"]}
    if condition["kind"] == "text":
        index["null_condition"] = condition["null"]
        index["text_pad_token_id"] = condition["pad_token_id"]
    if condition["kind"] == "class":
        index["null_class_label"] = condition["num_labels"] if condition["null"] == "learned" else None
    (folder / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize(("kind", "null"), CASES)
def test_version_2_index_round_trip_and_version_1_still_loads(tmp_path, tiny_clip_dirs, kind, null):
    components = _components(kind, tiny_clip_dirs, null=null)
    save_ours(components, tmp_path / "m")
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    assert index == {"format": "vqdiffusion-pipeline", "format_version": 2, "condition": EXPECTED[kind, null]}
    assert FORMAT_VERSION == 2 and ConditionConfig.from_dict(index["condition"]).kind == kind
    _assert_same(components, load_ours(tmp_path / "m"))
    _as_v1(tmp_path / "m")
    assert read_index(tmp_path / "m" / INDEX_FILE)["format_version"] == 1
    _assert_same(components, load_ours(tmp_path / "m"))
    pipe = VQDiffusionPipeline.from_pretrained(tmp_path / "m")  # and the pipeline accepts the parts
    assert pipe.condition_kind == kind and pipe.null_class_label == components.null_class_label


def test_shipped_model_loads_and_a_version_1_index_still_reads(tmp_path):
    assert read_index(BUILTIN / INDEX_FILE)["format_version"] == 2
    components = load_ours(BUILTIN)
    assert components.text_encoder is not None and components.null_condition is not None
    assert components.text_encoder.pad_token_id is None and components.defaults.guidance_scale == 1.0
    # the first built-in model's index (format version 1), over the same folder
    old = tmp_path / "v1"
    shutil.copytree(BUILTIN, old)
    (old / INDEX_FILE).write_text(
        '{"format": "vqdiffusion-pipeline", "format_version": 1, "condition": "text", '
        '"null_condition": "learned", "text_pad_token_id": null}'
    )
    assert read_index(old / INDEX_FILE)["format_version"] == 1
    again = load_ours(old)
    assert again.text_encoder.pad_token_id is None and again.null_condition is not None
    assert again.denoiser.config == components.denoiser.config


def test_pipeline_components_round_trip(tmp_path, tiny_clip_dirs):
    components = _components("text", tiny_clip_dirs)
    pipe = VQDiffusionPipeline.from_components(components)
    assert pipe.components == components
    pipe.save_pretrained(tmp_path / "p", weights_dtype=torch.float16)
    loaded = VQDiffusionPipeline.from_pretrained(tmp_path / "p").components
    assert next(loaded.denoiser.parameters()).dtype == torch.float32
    stored = components.null_condition.embedding.half()  # the null text keeps its stored dtype (as before)
    torch.testing.assert_close(loaded.null_condition.embedding, stored, rtol=0, atol=0)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": "other"}, "unknown format 'other'"),
        ({"format_version": 3}, "format version 3 is not supported"),
        ({"format_version": True}, "format version True"),
        ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({"condition": "class"}, "condition must be a JSON object"),
        ({"condition": {"kind": "image"}}, "condition: ConditionConfig: kind must be one of"),
        ({"condition": {"colour": 1}}, r"condition: ConditionConfig: unknown key\(s\) \['colour'\]"),
        ({"condition": {"num_labels": 7}}, r"condition\.num_labels=7 with null='learned' needs 8 label rows"),
        ({"condition": {"null": "none"}}, r"condition\.num_labels=4 with null='none' needs 4 label rows, .* has 5"),
    ],
)
def test_bad_index_errors_name_the_file_and_field(tmp_path, changes, match):
    save_ours(_components("class"), tmp_path / "m")
    _edit_json(tmp_path / "m" / INDEX_FILE, **changes)
    with pytest.raises(ConfigError, match=match) as info:
        VQDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert str(tmp_path / "m" / INDEX_FILE) in str(info.value)


def test_condition_must_match_the_parts(tmp_path, tiny_clip_dirs):
    save_ours(_components("text", tiny_clip_dirs), tmp_path / "m")
    index = tmp_path / "m" / INDEX_FILE
    _edit_json(index, condition={"seq_len": 12})
    with pytest.raises(ConfigError, match=r"condition\.seq_len=12 but the text encoder .* gives 77"):
        load_ours(tmp_path / "m")
    _edit_json(index, condition={"seq_len": 77, "null": "none"})
    with pytest.raises(ConfigError, match=r"condition\.null='none' is not supported for a text model"):
        load_ours(tmp_path / "m")
    _edit_json(index, condition={"kind": "none", "dim": None, "seq_len": None, "pad_token_id": None})
    with pytest.raises(ConfigError, match="condition kind 'none' does not match the denoiser"):
        load_ours(tmp_path / "m")
    _as_v1(tmp_path / "m")
    _edit_json(index, condition="text", null_condition="maybe", text_pad_token_id=None)
    with pytest.raises(ConfigError, match="null_condition must be 'learned' or 'empty_prompt'"):
        load_ours(tmp_path / "m")
    _edit_json(index, null_condition="learned", text_pad_token_id=-1)
    with pytest.raises(ConfigError, match="text_pad_token_id must be"):
        load_ours(tmp_path / "m")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"guidance_scale": math.nan}, r"guidance_scale must be a number in \[0, 1000\].*got nan"),
        ({"num_inference_steps": 1000}, r"num_inference_steps must be an integer in \[1, 100\].*T of"),
        ({"truncation_rate": 2}, "truncation_rate must be in"),
        ({"sampler": "greedy"}, "sampler must be one of"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"steps": 3}, r"unknown key\(s\) \['steps'\]"),
    ],
)
def test_defaults_json_is_validated_on_load(tmp_path, changes, match):
    save_ours(_components("none"), tmp_path / "m")
    _edit_json(tmp_path / "m" / "defaults.json", **changes)  # json writes NaN as the literal NaN
    with pytest.raises(ConfigError, match=match) as info:
        VQDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert str(info.value).startswith(str(tmp_path / "m" / "defaults.json"))


def test_missing_parts_are_named(tmp_path):
    save_ours(_components("class"), tmp_path / "m")
    (tmp_path / "m" / "denoiser" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"denoiser/config\.json"):
        load_ours(tmp_path / "m")
    save_ours(_components("class"), tmp_path / "n")
    (tmp_path / "n" / "schedule.json").write_text('{"num_classes": 16, "num_timesteps": 0}')
    with pytest.raises(ConfigError, match=r"schedule\.json"):
        load_ours(tmp_path / "n")
    save_ours(_components("class"), tmp_path / "o")
    (tmp_path / "o" / "defaults.json").unlink()  # optional: the library's defaults
    assert load_ours(tmp_path / "o").defaults is None
