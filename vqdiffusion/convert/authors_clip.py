"""The authors' CLIP text model: OpenAI's CLIP layout (``condition_emb.*`` of a text checkpoint) mapped onto
transformers' ``CLIPTextModel``, and the CLIP tokenizer from OpenAI's BPE file or a tokenizer folder."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..formats.keymap import ConversionError, convert_state_dict
from .authors_files import StateDict

logger = logging.getLogger(__name__)


def _openai_clip_key_map(layers: int) -> dict[str, str]:
    km = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            km[f"{src}.ln_1.{p}"] = f"{dst}.layer_norm1.{p}"
            km[f"{src}.ln_2.{p}"] = f"{dst}.layer_norm2.{p}"
            km[f"{src}.attn.out_proj.{p}"] = f"{dst}.self_attn.out_proj.{p}"
            km[f"{src}.mlp.c_fc.{p}"] = f"{dst}.mlp.fc1.{p}"
            km[f"{src}.mlp.c_proj.{p}"] = f"{dst}.mlp.fc2.{p}"
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                # the fused in_proj is split into q, k, v below (pseudo keys "...in_proj_{p}#j")
                km[f"{src}.attn.in_proj_{p}#{j}"] = f"{dst}.self_attn.{name}.{p}"
    return km


def clip_text_model_from_openai(state: StateDict, tokenizer: Any, where: str) -> torch.nn.Module:
    """The OpenAI-layout CLIP text tower (``condition_emb.*`` with the prefix removed) -> ``CLIPTextModel``.

    ``text_projection`` is not used (the condition is the final layer norm's output at every position).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    state = dict(state)
    state.pop("text_projection", None)
    width = int(state["token_embedding.weight"].shape[1]) if "token_embedding.weight" in state else 0
    if not width:
        raise ConversionError(f"{where}: token_embedding.weight is missing; not a CLIP text encoder")
    layers = len({m.group(1) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    for i in range(layers):
        for p in ("weight", "bias"):
            key = f"transformer.resblocks.{i}.attn.in_proj_{p}"
            if key not in state:
                raise ConversionError(f"{where}: expected key {key!r} is missing")
            fused = state.pop(key)
            if fused.shape[0] != 3 * width:
                raise ConversionError(f"{where}: {key} has shape {tuple(fused.shape)}, expected [{3 * width}, ...]")
            for j, part in enumerate(fused.chunk(3)):
                state[f"{key}#{j}"] = part
    vocab, positions = int(state["token_embedding.weight"].shape[0]), int(state["positional_embedding"].shape[0])
    if len(tokenizer) != vocab:
        raise ConversionError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's CLIP embeds {vocab}; give "
            "the tokenizer the model was trained with (OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz)"
        )
    c_fc = "transformer.resblocks.0.mlp.c_fc.weight"
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(state[c_fc].shape[0]) if c_fc in state else 4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),  # OpenAI's rule: heads = width / 64
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    own = model.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    key_map = {k: prefix + v for k, v in _openai_clip_key_map(layers).items()}
    shapes = {k: v.shape for k, v in own.items() if k in set(key_map.values())}
    converted = convert_state_dict(state, key_map, shapes, source_name=where)
    missing = sorted(set(own) - set(converted) - {k for k in own if k.endswith("position_ids")})
    if missing:
        raise ConversionError(f"{where}: CLIPTextModel keys not produced: {missing[:5]}")
    model.load_state_dict({**own, **{k: v.float() for k, v in converted.items()}}, strict=True)
    return model.eval()


#: The first bytes of every gzip file.
_GZIP_MAGIC = b"\x1f\x8b"


def check_tokenizer_path(path: str | os.PathLike) -> None:
    """``--tokenizer`` must be a folder (a CLIPTokenizer) or a gzip file (OpenAI's BPE merges), checked
    before a checkpoint is loaded: FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (a CLIPTokenizer folder or bpe_simple_vocab_16e6.txt.gz)")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != _GZIP_MAGIC:
        raise ValueError(
            f"--tokenizer {path} is not a gzip file: give a CLIPTokenizer folder (e.g. the tokenizer/ of "
            "microsoft/vq-diffusion-ithq) or OpenAI's bpe_simple_vocab_16e6.txt.gz"
        )


def load_clip_tokenizer(path: str | os.PathLike) -> Any:
    """A ``CLIPTokenizer`` from a local tokenizer folder, or built from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
    (the file the authors ship in ``image_synthesis/modeling/modules/clip/``): the vocabulary is the 256
    byte symbols, the same with ``</w>``, one token per merge (the first 49152 - 256 - 2), then
    ``<|startoftext|>`` and ``<|endoftext|>``, exactly as OpenAI's SimpleTokenizer builds it."""
    from transformers import CLIPTokenizer

    path = Path(path)
    if path.is_dir():
        try:
            return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise ValueError(f"cannot load a CLIP tokenizer from {path}: {err}") from None
    check_tokenizer_path(path)
    try:
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"--tokenizer {path}: not a readable gzipped BPE merges file ({err})") from None
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1] if line.strip()]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not a BPE merges file (each line after the first must hold two symbols)")
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=77
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> character table: printable bytes keep their character (listed first),
    the others get 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
