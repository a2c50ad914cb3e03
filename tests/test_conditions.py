"""Condition encoders: CLIP text against diffusers and against a hand computation, padding, truncation,
files; learned / empty-prompt null conditions; class labels; ConditionConfig."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tokenizers import BOS, EOS, expected_ids, make_tiny_clip, tiny_clip_vocab
from transformers import CLIPTextModel, CLIPTokenizer

from vqdiffusion.config import ConfigError
from vqdiffusion.models.conditions import (
    CLIPTextCondition,
    ConditionConfig,
    ConditionKind,
    EmptyPromptNullCondition,
    LearnedNullCondition,
)

PROMPTS = ["a red cat", "A photo of the bird sitting on a table", "zebra"]
LONG_PROMPT = " ".join(["green dog"] * 50)  # 100 word pieces or more: over 77 tokens


@pytest.fixture(scope="module")
def text(tiny_clip_dirs) -> CLIPTextCondition:
    return CLIPTextCondition.from_pretrained(*tiny_clip_dirs)


@pytest.fixture(scope="module")
def authors_text(text: CLIPTextCondition) -> CLIPTextCondition:
    return CLIPTextCondition(text.text_model, text.tokenizer, pad_token_id=0)


def diffusers_pipeline(text: CLIPTextCondition, learnable: bool, null: torch.Tensor | None = None):
    """diffusers' VQDiffusionPipeline around our text model and tokenizer, with tiny other parts."""
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )

    vqvae = VQModel(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        num_vq_embeddings=8,
        vq_embed_dim=4,
        norm_num_groups=4,
        sample_size=4,
    )
    transformer = Transformer2DModel(
        num_attention_heads=1,
        attention_head_dim=8,
        num_layers=1,
        num_vector_embeds=9,
        sample_size=2,
        cross_attention_dim=text.hidden_size,
        norm_type="ada_norm",
        num_embeds_ada_norm=100,
    )
    if learnable:
        embeddings = LearnedClassifierFreeSamplingEmbeddings(
            learnable=True, hidden_size=null.shape[1], length=null.shape[0]
        )
        with torch.no_grad():
            embeddings.embeddings.copy_(null)
    else:
        embeddings = LearnedClassifierFreeSamplingEmbeddings(learnable=False)
    return VQDiffusionPipeline(
        vqvae=vqvae,
        text_encoder=text.text_model,
        tokenizer=text.tokenizer,
        transformer=transformer,
        scheduler=VQDiffusionScheduler(num_vec_classes=9),
        learned_classifier_free_sampling_embeddings=embeddings,
    )


# -- against diffusers ---------------------------------------------------------------------------------
def test_encode_matches_diffusers_and_learned_null(text: CLIPTextCondition) -> None:
    null = LearnedNullCondition(torch.randn(77, text.hidden_size, generator=torch.Generator().manual_seed(1)))
    pipe = diffusers_pipeline(text, learnable=True, null=null.embedding.detach())
    with torch.no_grad():
        theirs = pipe._encode_prompt(PROMPTS, 1, False)
        guided = pipe._encode_prompt(PROMPTS, 1, True)
    ours = text.encode(PROMPTS)
    assert ours.shape == theirs.shape == (3, 77, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # With guidance diffusers stacks [negative; positive]; its negative is the learned parameter.
    torch.testing.assert_close(guided[3:], ours, atol=1e-5, rtol=0)
    assert torch.equal(guided[:3], null(3))


def test_empty_prompt_null_matches_diffusers_non_learnable(text: CLIPTextCondition) -> None:
    pipe = diffusers_pipeline(text, learnable=False)
    with torch.no_grad():
        guided = pipe._encode_prompt(PROMPTS[:2], 1, True)
    null = EmptyPromptNullCondition(text)
    torch.testing.assert_close(null(2), guided[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(text.encode_unconditional(2), guided[:2], atol=1e-5, rtol=0)
    assert null.state_dict() == {}  # derived from the text encoder, never saved


def test_long_prompt_keeps_eos_where_diffusers_cuts_it(text: CLIPTextCondition, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vqdiffusion.models.conditions"):
        ids = text.tokenize([LONG_PROMPT])
    assert "truncated" in caplog.text
    assert ids.shape == (1, 77) and int(ids[0, 0]) == text.tokenizer.bos_token_id
    assert int(ids[0, -1]) == text.tokenizer.eos_token_id
    # transformers' truncation=True does the same (BOS, first 75 pieces, EOS) ...
    reference = text.tokenizer([LONG_PROMPT], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.tolist() == reference
    # ... while diffusers keeps the first 77 ids and loses EOS: only the last position differs.
    pipe = diffusers_pipeline(text, learnable=False)
    with torch.no_grad():
        theirs = pipe._encode_prompt([LONG_PROMPT], 1, False)
    ours = text.encode([LONG_PROMPT])
    torch.testing.assert_close(ours[:, :76], theirs[:, :76], atol=1e-5, rtol=0)
    assert (ours[:, 76] - theirs[:, 76]).abs().max() > 1e-3


# -- against a hand computation ------------------------------------------------------------------------
def test_encode_equals_hand_tokenised_clip_forward(text: CLIPTextCondition, tiny_clip_dirs) -> None:
    vocab, _ = tiny_clip_vocab()
    # The merged word tokens come straight from the vocabulary, then plain BPE for the other prompts.
    first = [vocab[BOS], vocab["a</w>"], vocab["red</w>"], vocab["cat</w>"], vocab[EOS]]
    assert expected_ids(PROMPTS[0]) == first
    rows = [expected_ids(p) for p in PROMPTS]
    ids = torch.tensor([row + [vocab[EOS]] * (77 - len(row)) for row in rows])
    assert torch.equal(text.tokenize(PROMPTS), ids)
    model = CLIPTextModel.from_pretrained(str(tiny_clip_dirs[0]), local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    expected = hidden / hidden.norm(dim=-1, keepdim=True)
    out = text.encode(PROMPTS)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 77))
    assert text.max_length == 77 and text.hidden_size == 32 and text.pad_token_id is None


def test_authors_padding_changes_only_positions_after_eos(
    text: CLIPTextCondition, authors_text: CLIPTextCondition
) -> None:
    ours, authors = text.tokenize(PROMPTS), authors_text.tokenize(PROMPTS)
    a, b = text.encode(PROMPTS), authors_text.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        end = len(expected_ids(prompt))  # positions >= end are padding
        assert torch.equal(ours[i, :end], authors[i, :end])
        assert torch.all(authors[i, end:] == 0) and torch.all(ours[i, end:] == text.tokenizer.eos_token_id)
        # CLIP's causal mask: everything up to EOS is unchanged, every padded position changes.
        torch.testing.assert_close(a[i, :end], b[i, :end], atol=1e-6, rtol=0)
        assert (a[i, end:] - b[i, end:]).norm(dim=-1).min() > 1e-3
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(3, 77))
    assert authors_text.padding_id == 0 and text.padding_id == text.tokenizer.eos_token_id


# -- errors, files, dtype ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[], [""], ["   \n"], ["ok", 3], "a string", None])
def test_bad_prompts_raise(text: CLIPTextCondition, bad) -> None:
    with pytest.raises(ValueError, match="prompt"):
        text.encode(bad)


@pytest.mark.parametrize("pad", [-1, 10_000, 1.0, True])
def test_bad_pad_token_id(text: CLIPTextCondition, pad) -> None:
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTextCondition(text.text_model, text.tokenizer, pad_token_id=pad)


def test_save_load_round_trip(authors_text: CLIPTextCondition, tmp_path: Path) -> None:
    authors_text.save_pretrained(tmp_path / "te", tmp_path / "tok")
    assert (tmp_path / "te" / "model.safetensors").is_file()
    loaded = CLIPTextCondition.from_pretrained(tmp_path / "te", tmp_path / "tok", pad_token_id=0)
    assert loaded.pad_token_id == 0 and loaded.max_length == 77 and loaded.hidden_size == 32
    assert torch.equal(loaded.encode(PROMPTS), authors_text.encode(PROMPTS))
    assert torch.equal(loaded.tokenize([LONG_PROMPT]), authors_text.tokenize([LONG_PROMPT]))


def test_missing_and_corrupt_files(tiny_clip_dirs, tmp_path: Path) -> None:
    text_dir, tok_dir = tiny_clip_dirs
    with pytest.raises(FileNotFoundError, match="nope"):
        CLIPTextCondition.from_pretrained(tmp_path / "nope", tok_dir)
    with pytest.raises(FileNotFoundError, match="nope"):
        CLIPTextCondition.from_pretrained(text_dir, tmp_path / "nope")
    weights = load_file(text_dir / "model.safetensors")
    config = json.loads((text_dir / "config.json").read_text())

    def folder(name: str, config_text: str | None, tensors: dict | None, raw: bytes | None = None) -> Path:
        path = tmp_path / name
        path.mkdir()
        if config_text is not None:
            (path / "config.json").write_text(config_text)
        if tensors is not None:
            save_file(tensors, path / "model.safetensors")
        if raw is not None:
            (path / "model.safetensors").write_bytes(raw)
        return path

    no_weights = folder("no_weights", json.dumps(config), None)
    with pytest.raises(FileNotFoundError, match="no_weights"):
        CLIPTextCondition.from_pretrained(no_weights, tok_dir)
    no_config = folder("no_config", None, weights)
    with pytest.raises(FileNotFoundError, match="no_config"):
        CLIPTextCondition.from_pretrained(no_config, tok_dir)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        CLIPTextCondition.from_pretrained(text_dir, tmp_path / "no_config")  # a folder without tokenizer files
    bad_json = folder("bad_json", "{not json", weights)
    with pytest.raises(ValueError, match="bad_json"):
        CLIPTextCondition.from_pretrained(bad_json, tok_dir)
    bad_weights = folder("bad_weights", json.dumps(config), None, raw=b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="bad_weights"):
        CLIPTextCondition.from_pretrained(bad_weights, tok_dir)
    partial = dict(weights)
    partial.pop(next(k for k in partial if "final_layer_norm" in k))
    missing_key = folder("missing_key", json.dumps(config), partial)
    with pytest.raises(ValueError, match="missing_key.*lack"):
        CLIPTextCondition.from_pretrained(missing_key, tok_dir)
    bad_tok = tmp_path / "bad_tok"
    bad_tok.mkdir()
    (bad_tok / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="bad_tok"):
        CLIPTextCondition.from_pretrained(text_dir, bad_tok)


def test_bf16(tiny_clip_dirs, text: CLIPTextCondition) -> None:
    bf16 = CLIPTextCondition.from_pretrained(*tiny_clip_dirs, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    out = bf16.encode(PROMPTS)
    assert out.dtype == torch.bfloat16 and out.device == bf16.device
    torch.testing.assert_close(out.float(), text.encode(PROMPTS), atol=3e-2, rtol=0)
    torch.testing.assert_close(out.float().norm(dim=-1), torch.ones(3, 77), atol=1e-2, rtol=0)


def test_text_model_stays_frozen(text: CLIPTextCondition) -> None:
    text.train()
    assert not text.text_model.training and text.training
    assert not any(p.requires_grad for p in text.parameters())
    text.eval()


def test_other_max_length(tmp_path: Path) -> None:
    short = CLIPTextCondition.from_pretrained(*make_tiny_clip(tmp_path, hidden_size=16, max_length=12))
    out = short.encode(["a red cat", LONG_PROMPT])
    assert out.shape == (2, 12, 16) and short.max_length == 12
    assert (
        int(short.tokenize([LONG_PROMPT])[0, -1])
        == CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"), local_files_only=True).eos_token_id
    )


# -- null conditions -----------------------------------------------------------------------------------
def test_learned_null_condition() -> None:
    null = LearnedNullCondition(torch.randn(77, 8))
    out = null(4)
    assert out.shape == (4, 77, 8) and out.stride(0) == 0 and out.data_ptr() == null.embedding.data_ptr()
    out.sum().backward()
    torch.testing.assert_close(null.embedding.grad, torch.full((77, 8), 4.0))
    assert torch.equal(LearnedNullCondition.zeros(5, 3).embedding, torch.zeros(5, 3))
    for bad in (torch.randn(8), torch.randn(1, 77, 8), torch.zeros(3, 4, dtype=torch.long), [[0.0]]):
        with pytest.raises(ValueError, match="L, D"):
            LearnedNullCondition(bad)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            null(bad)


def test_empty_prompt_null_follows_padding(text: CLIPTextCondition, authors_text: CLIPTextCondition) -> None:
    ours, authors = EmptyPromptNullCondition(text), EmptyPromptNullCondition(authors_text)
    assert ours(3).shape == (3, 77, 32) and ours(3).stride(0) == 0
    ids = torch.tensor([[text.tokenizer.bos_token_id, text.tokenizer.eos_token_id] + [0] * 75])
    with torch.no_grad():
        hidden = text.text_model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(authors.embedding, hidden / hidden.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.embedding[:2], authors.embedding[:2], atol=1e-6, rtol=0)
    assert (ours.embedding[2:] - authors.embedding[2:]).abs().max() > 1e-3


# -- class labels --------------------------------------------------------------------------------------
def test_class_condition_label_table() -> None:
    learned = ConditionConfig(kind="class", dim=None, seq_len=None, num_labels=1000)
    assert learned.label_rows == 1001 and learned.null_label == 1000  # the published ImageNet layout
    plain = ConditionConfig(kind="class", dim=None, seq_len=None, num_labels=5, null="none")
    assert plain.label_rows == 5 and plain.null_label is None
    assert ConditionConfig().label_rows is None and ConditionConfig().null_label is None
    assert ConditionKind.CLASS == "class" and ConditionKind("none") is ConditionKind.NONE


# -- config --------------------------------------------------------------------------------------------
def test_condition_config_round_trip(tmp_path: Path) -> None:
    for config in (
        ConditionConfig(),
        ConditionConfig(pad_token_id=0, null="empty_prompt"),
        ConditionConfig(kind="class", dim=None, seq_len=None, num_labels=1000),
        ConditionConfig(kind="none", dim=None, seq_len=None, null="none"),
    ):
        config.save_json(tmp_path / "c.json")
        assert ConditionConfig.load_json(tmp_path / "c.json") == config
    assert ConditionConfig() == ConditionConfig(kind="text", dim=512, seq_len=77, null="learned")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "image"},
        {"null": "zeros"},
        {"dim": 0},
        {"seq_len": None},
        {"dim": 1.5},
        {"num_labels": 10},
        {"pad_token_id": -1},
        {"kind": "class", "dim": None, "seq_len": None},
        {"kind": "class", "dim": None, "seq_len": None, "num_labels": 0},
        {"kind": "class", "seq_len": None, "num_labels": 10},
        {"kind": "class", "dim": None, "seq_len": None, "num_labels": 10, "null": "empty_prompt"},
        {"kind": "class", "dim": None, "seq_len": None, "num_labels": 10, "pad_token_id": 0},
        {"kind": "none", "dim": None, "seq_len": None},
        {"kind": "none", "seq_len": None, "null": "none"},
    ],
)
def test_condition_config_rejects(kwargs) -> None:
    with pytest.raises(ConfigError):
        ConditionConfig(**kwargs)
