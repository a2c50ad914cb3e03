"""Hugging Face Hub ids: a cache folder in the Hub's layout, loaded with no network (conftest's guard
refuses any connection that leaves this machine); the online path with the Hub's client functions replaced."""

from __future__ import annotations

import json
import socket

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import errors
from support.hub import add_to_hub_cache
from support.weights import tiny_text_components

from vqdiffusion.formats import hub
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.formats.diffusers import save_diffusers
from vqdiffusion.pipeline import VQDiffusionPipeline

REPO = "acme/tiny-vq-diffusion"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_clip_dirs):
    """A Hugging Face cache with REPO at main (float32) and at branch fp16 (half weights), saved by our
    diffusers writer, plus a repository that is some other diffusers pipeline."""
    root = tmp_path_factory.mktemp("hub")
    components = tiny_text_components(tiny_clip_dirs)
    save_diffusers(components, root / "src_main")
    add_to_hub_cache(root / "cache", REPO, root / "src_main", "main")
    half = PipelineComponents(
        vqvae=_copy(components.vqvae).half(),
        denoiser=_copy(components.denoiser).half(),
        schedule=components.schedule,
        text_encoder=components.text_encoder,
        null_condition=_copy(components.null_condition).half(),
    )
    save_diffusers(half, root / "src_fp16")
    add_to_hub_cache(root / "cache", REPO, root / "src_fp16", "fp16")
    other = root / "src_other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    add_to_hub_cache(root / "cache", "acme/stable", other)
    bert = root / "src_bert"
    bert.mkdir()
    (bert / "config.json").write_text("{}")
    add_to_hub_cache(root / "cache", "acme/bert", bert)
    return {"cache": root / "cache", "components": components, "half": half}


def _copy(module):
    import copy

    return copy.deepcopy(module)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _states_equal(a: torch.nn.Module, b: torch.nn.Module, dtype=None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].to(dtype or sb[k].dtype), sb[k]) for k in sa)


def test_the_network_guard_refuses_outside_connections():
    with pytest.raises(RuntimeError, match="tried to reach the network"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(RuntimeError, match="tried to reach the network"):
        socket.socket().connect(("8.8.8.8", 53))


def test_hub_id_loads_from_the_cache_offline(cache, offline):
    pipe = VQDiffusionPipeline.from_pretrained(REPO, cache_dir=cache["cache"])
    ref = cache["components"]
    assert _states_equal(pipe.denoiser, ref.denoiser) and _states_equal(pipe.vqvae, ref.vqvae)
    assert torch.equal(pipe.null_condition.embedding, ref.null_condition.embedding)
    out = pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.images[0].size == (8, 8)


def test_fp16_revision_with_torch_dtype(cache, offline):
    pipe = VQDiffusionPipeline.from_pretrained(
        REPO, cache_dir=cache["cache"], revision="fp16", torch_dtype=torch.float16
    )
    # the VQ decoder is upcast to float32 under float16 (docs/design.md §11.2), from the branch's half weights
    assert pipe.dtype == torch.float16 and pipe.vqvae.codebook.weight.dtype == torch.float32
    # the fp16 branch holds the rounded weights, not main's
    assert _states_equal(pipe.denoiser, cache["half"].denoiser)
    assert _states_equal(pipe.vqvae, cache["half"].vqvae, dtype=torch.float16)
    assert not _states_equal(pipe.denoiser, cache["components"].denoiser, dtype=torch.float32)
    main = VQDiffusionPipeline.from_pretrained(REPO, cache_dir=cache["cache"], dtype=torch.float16)
    assert main.dtype == torch.float16


def test_local_files_only_without_the_environment_variable(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    pipe = VQDiffusionPipeline.from_pretrained(REPO, cache_dir=cache["cache"], local_files_only=True)
    assert pipe.condition_kind == "text"


@pytest.mark.parametrize(
    ("repo", "kwargs", "match"),
    [
        ("acme/missing", {}, r"acme/missing \(revision main\) is not in the Hugging Face cache .*HF_HUB_OFFLINE is"),
        (REPO, {"revision": "v9"}, r"revision v9\) is not in the Hugging Face cache"),
        ("acme/stable", {}, r"acme/stable is not a VQ-Diffusion model: its model_index.json describes a "),
        ("acme/bert", {}, "is not a VQ-Diffusion model: it has neither vqdiffusion.json nor model_index.json"),
    ],
)
def test_offline_errors_name_the_problem(cache, offline, repo, kwargs, match):
    with pytest.raises(hub.HubError, match=match):
        VQDiffusionPipeline.from_pretrained(repo, cache_dir=cache["cache"], **kwargs)


def test_local_files_only_error_names_the_flag(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(hub.HubError, match=r"downloads are off \(local_files_only=True"):
        VQDiffusionPipeline.from_pretrained("acme/missing", cache_dir=cache["cache"], local_files_only=True)


def test_dtype_alias_and_hub_only_arguments(cache, offline, tmp_path):
    with pytest.raises(ValueError, match="dtype=torch.float32 and torch_dtype=torch.float16 disagree"):
        VQDiffusionPipeline.from_pretrained(REPO, dtype=torch.float32, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="torch_dtype must be a torch.dtype"):
        VQDiffusionPipeline.from_pretrained(REPO, torch_dtype="float16")
    with pytest.raises(ValueError, match="revision apply to Hugging Face Hub ids .* not to the local model"):
        VQDiffusionPipeline.from_pretrained("builtin:shapes", revision="fp16")
    same = VQDiffusionPipeline.from_pretrained(
        REPO, cache_dir=cache["cache"], dtype=torch.float16, torch_dtype=torch.float16
    )
    assert same.dtype == torch.float16


def test_is_hub_id(tmp_path, monkeypatch):
    assert hub.is_hub_id("microsoft/vq-diffusion-ithq")
    for text in ("builtin:shapes", "model", "a/b/c", "../x", "/abs/path", "./rel", "org/", "org/na me"):
        assert not hub.is_hub_id(text), text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("org/name")  # an existing local folder wins


ITHQ_LISTING = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "vqvae/config.json",
    "vqvae/diffusion_pytorch_model.bin",
    "vqvae/diffusion_pytorch_model.safetensors",
    "vqvae/diffusion_pytorch_model.fp16.safetensors",
    "vqvae/diffusion_flax_model.msgpack",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.bin",
    "transformer/diffusion_pytorch_model.fp16.bin",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/model.onnx",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "scheduler/scheduler_config.json",
    "learned_classifier_free_sampling_embeddings/config.json",
    "learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.safetensors",
    "images/bear.png",
    "unet/config.json",
]
COMMON = [
    "learned_classifier_free_sampling_embeddings/config.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "transformer/config.json",
    "vqvae/config.json",
]


def test_pipeline_files_pick_one_weights_file_per_component():
    assert hub.pipeline_files(ITHQ_LISTING) == sorted(
        COMMON
        + [
            "learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "transformer/diffusion_pytorch_model.bin",
            "vqvae/diffusion_pytorch_model.safetensors",
        ]
    )
    assert hub.pipeline_files(ITHQ_LISTING, variant="fp16") == sorted(
        COMMON
        + [
            "learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "transformer/diffusion_pytorch_model.fp16.bin",
            "vqvae/diffusion_pytorch_model.fp16.safetensors",
        ]
    )


def test_pipeline_files_keep_shards_and_prefer_our_layout():
    listing = [
        "vqdiffusion.json",
        "model_index.json",
        "schedule.json",
        "defaults.json",
        "history.json",
        "README.md",
        "null_condition.safetensors",
        "denoiser/config.json",
        "denoiser/model.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/pytorch_model.bin",
    ]
    assert hub.pipeline_files(listing) == [
        "defaults.json",
        "denoiser/config.json",
        "denoiser/model.safetensors",
        "history.json",  # kept: `vqdiffusion info` shows it; README.md (not read) is left out
        "null_condition.safetensors",
        "schedule.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "vqdiffusion.json",
    ]
    with pytest.raises(hub.HubError, match="neither vqdiffusion.json"):
        hub.pipeline_files(["config.json", "model.safetensors"])


@pytest.fixture
def online(monkeypatch, cache):
    """The Hub's client functions replaced: the listing of ITHQ, downloads served from the cache's folder."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = {"snapshot": [], "file": []}
    snapshot = next((cache["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir())
    index = {"listing": ITHQ_LISTING, "index": snapshot / "model_index.json"}

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        return index["listing"]

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        calls["file"].append(filename)
        return str(index["index"])

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        calls["snapshot"].append(allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, index


def test_online_download_fetches_only_the_pipeline_files(online, tmp_path):
    calls, _ = online
    folder = hub.download_model(REPO, revision="fp16", variant="fp16")
    assert (folder / "model_index.json").is_file()
    assert calls["file"] == ["model_index.json"]
    assert calls["snapshot"] == [hub.pipeline_files(ITHQ_LISTING, variant="fp16")]


def test_online_other_pipeline_is_refused_before_any_weights(online, tmp_path):
    calls, index = online
    other = tmp_path / "model_index.json"
    other.write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    index["index"] = other
    with pytest.raises(hub.HubError, match="is not a VQ-Diffusion model: its model_index.json describes a "):
        hub.download_model(REPO)
    assert calls["snapshot"] == []


def _http_error(cls, status: int):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls("boom", response=response)


@pytest.mark.parametrize(
    ("error", "match"),
    [
        (lambda: _http_error(errors.RevisionNotFoundError, 404), r"acme/x has no revision 'v2'; give a branch"),
        (lambda: _http_error(errors.RepositoryNotFoundError, 404), r"no model 'acme/x' on the Hugging Face Hub"),
        (lambda: _http_error(errors.GatedRepoError, 403), r"acme/x is gated: accept its conditions"),
        (lambda: _http_error(errors.HfHubHTTPError, 500), r"the Hugging Face Hub failed for acme/x \(revision v2\)"),
        (lambda: httpx2.ConnectError("no route"), r"the Hugging Face Hub cannot be reached \(no route\)"),
        (lambda: errors.LocalEntryNotFoundError("x"), r"cannot be reached and the model is not in the cache"),
    ],
)
def test_online_errors_become_one_line(online, monkeypatch, error, match):
    def fail(self, repo_id, revision=None, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fail)
    with pytest.raises(hub.HubError, match=match) as info:
        hub.download_model("acme/x", revision="v2")
    assert "\n" not in str(info.value)
