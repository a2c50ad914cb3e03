"""CLIP text condition: padding, normalisation, truncation, loading; learned null and class conditions."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from vqdiffusion.models.conditions import ClassCondition, CLIPTextCondition, LearnedNullCondition
from vqdiffusion.text_vocab import build_char_clip_tokenizer


@pytest.fixture(scope="module")
def condition() -> CLIPTextCondition:
    tokenizer = build_char_clip_tokenizer()
    torch.manual_seed(0)
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return CLIPTextCondition(model, tokenizer)


def test_encoding_is_normalised_final_layer_norm_output(condition: CLIPTextCondition) -> None:
    prompts = ["a red circle", "blue"]
    tok = condition.tokenizer
    # Independent tokenisation: one id per character, BOS/EOS around, EOS padding to 77.
    expected_ids = []
    for prompt in prompts:
        words = prompt.split()
        ids = [tok.bos_token_id]
        for word in words:
            ids += [tok.convert_tokens_to_ids(c) for c in word[:-1]] + [tok.convert_tokens_to_ids(word[-1] + "</w>")]
        ids.append(tok.eos_token_id)
        expected_ids.append(ids + [tok.pad_token_id] * (77 - len(ids)))
    expected_ids = torch.tensor(expected_ids)
    assert torch.equal(condition.tokenize(prompts), expected_ids)
    with torch.no_grad():
        hidden = condition.text_model(input_ids=expected_ids).last_hidden_state
    expected = hidden / hidden.norm(dim=-1, keepdim=True)
    out = condition.encode(prompts)
    assert out.shape == (2, 77, 32)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 77))


def test_authors_padding_changes_only_positions_after_eos(condition: CLIPTextCondition) -> None:
    authors = CLIPTextCondition(condition.text_model, condition.tokenizer, pad_token_id=0)
    ids_default = condition.tokenize(["a red circle"])
    ids_authors = authors.tokenize(["a red circle"])
    eos = int((ids_default[0] == condition.tokenizer.eos_token_id).nonzero()[0])
    assert torch.equal(ids_default[0, : eos + 1], ids_authors[0, : eos + 1])
    assert torch.all(ids_authors[0, eos + 1 :] == 0)
    a, b = condition.encode(["a red circle"]), authors.encode(["a red circle"])
    # CLIP's causal mask: positions up to EOS are unchanged, the padded ones differ.
    torch.testing.assert_close(a[:, : eos + 1], b[:, : eos + 1])
    assert (a[:, eos + 1 :] - b[:, eos + 1 :]).abs().max() > 1e-3


def test_long_prompt_truncated_with_warning_and_eos_kept(condition: CLIPTextCondition, caplog) -> None:
    long_prompt = "abc " * 60
    with caplog.at_level(logging.WARNING):
        ids = condition.tokenize([long_prompt])
    assert "truncated" in caplog.text
    assert ids.shape == (1, 77) and int(ids[0, -1]) == condition.tokenizer.eos_token_id


@pytest.mark.parametrize("bad", [[], [""], ["   "], ["ok", 3], "a string"])
def test_bad_prompts(condition: CLIPTextCondition, bad) -> None:
    with pytest.raises(ValueError):
        condition.encode(bad)


def test_save_load_round_trip_and_missing_dirs(condition: CLIPTextCondition, tmp_path: Path) -> None:
    condition.save_pretrained(tmp_path / "text", tmp_path / "tok")
    loaded = CLIPTextCondition.from_pretrained(tmp_path / "text", tmp_path / "tok", pad_token_id=0)
    assert loaded.pad_token_id == 0 and loaded.hidden_size == 32 and loaded.max_length == 77
    reference = CLIPTextCondition(condition.text_model, condition.tokenizer, pad_token_id=0)
    torch.testing.assert_close(loaded.encode(["a red circle"]), reference.encode(["a red circle"]))
    with pytest.raises(FileNotFoundError):
        CLIPTextCondition.from_pretrained(tmp_path / "nope", tmp_path / "tok")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load"):
        CLIPTextCondition.from_pretrained(tmp_path / "broken", tmp_path / "tok")


def test_empty_prompt_encoding_for_unconditional(condition: CLIPTextCondition) -> None:
    out = condition.encode_unconditional(3)
    ids = condition.tokenize([""])
    with torch.no_grad():
        hidden = condition.text_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, (hidden / hidden.norm(dim=-1, keepdim=True)).expand(3, -1, -1))


def test_null_and_class_conditions() -> None:
    null = LearnedNullCondition(torch.randn(77, 8))
    assert null(4).shape == (4, 77, 8) and torch.equal(null(4)[2], null.embedding)
    with pytest.raises(ValueError):
        LearnedNullCondition(torch.randn(8))
    classes = ClassCondition(10, 8)
    assert classes.encode(torch.tensor([0, 9])).shape == (2, 1, 8)
    torch.testing.assert_close(classes.null(2)[0, 0], classes.embedding.weight[10])
    for bad in [torch.tensor([10]), torch.tensor([-1]), torch.tensor([[1]])]:
        with pytest.raises(ValueError):
            classes.encode(bad)
    with pytest.raises(ValueError, match="null class"):
        ClassCondition(10, 8, learnable_null=False).null(1)
