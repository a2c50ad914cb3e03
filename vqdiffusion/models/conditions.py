"""Condition encoders (docs/design.md §1.2, §6.3): what the denoiser's cross-attention reads.

- :class:`CLIPTextCondition`: a frozen CLIP text transformer, prompts -> [B, L, D].
- :class:`LearnedNullCondition`: the learned "null text" [L, D] of classifier-free guidance.
- :class:`EmptyPromptNullCondition`: the null condition of models without a learned one (the empty
  prompt's encoding; diffusers' ``LearnedClassifierFreeSamplingEmbeddings(learnable=False)``).
- :class:`ConditionConfig`: which of these a model uses, with its sizes.

Every null condition is called as ``null(batch_size) -> [B, L, D]`` and has an ``embedding`` [L, D].
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigBase, ConfigError, is_int
from ..io import check_finite, read_weights_header

logger = logging.getLogger(__name__)


class ConditionKind(str, enum.Enum):
    """What a model is conditioned on: ``TEXT`` (cross-attention to a CLIP text sequence [B, L, D]),
    ``CLASS`` (integer labels [B] through the denoiser's label AdaLN table) or ``NONE`` (unconditional).
    The members are strings ("text", "class", "none"), so they compare equal to and serialise as those."""

    TEXT = "text"
    CLASS = "class"
    NONE = "none"


CONDITION_KINDS = tuple(kind.value for kind in ConditionKind)
NULL_KINDS = ("learned", "empty_prompt", "none")
TEXT_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConditionConfig(ConfigBase):
    """The condition part of a model (the condition block of a model folder's index).  The defaults describe
    ITHQ (CLIP ViT-B/32 text, learned null).

    ``kind`` (:class:`ConditionKind`): "text" (CLIP, ``seq_len`` x ``dim``), "class" (``num_labels`` integer
    labels, embedded by the denoiser's label AdaLN table; ``dim`` and ``seq_len`` are None) or "none"
    (unconditional; no sizes).
    ``null``: the unconditional input of classifier-free guidance: "learned" (text: a trained [L, D]
    parameter; class: one extra label row, label ``num_labels``, so the table has ``num_labels + 1`` rows as
    in the published ImageNet model), "empty_prompt" (text only: the encoding of "") or "none" (the model
    cannot be guided).
    ``pad_token_id`` (text only): the id written after the end-of-text token; None keeps the
    tokenizer's padding (``<|endoftext|>`` for transformers' CLIP), 0 is the authors' padding.
    """

    kind: str = "text"
    dim: int | None = 512
    seq_len: int | None = 77
    num_labels: int | None = None
    pad_token_id: int | None = None
    null: str = "learned"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.kind not in CONDITION_KINDS:
            raise ConfigError(f"{name}: kind must be one of {CONDITION_KINDS}, got {self.kind!r}")
        if self.null not in NULL_KINDS:
            raise ConfigError(f"{name}: null must be one of {NULL_KINDS}, got {self.null!r}")
        if self.kind != ConditionKind.TEXT:
            given = {f: getattr(self, f) for f in ("dim", "seq_len", "pad_token_id")}
            if self.kind == ConditionKind.NONE:
                given["num_labels"] = self.num_labels
            given = {f: v for f, v in given.items() if v is not None}
            if given:
                raise ConfigError(f"{name}: a kind={self.kind!r} condition has no text sizes; got {given}")
        if self.kind == ConditionKind.NONE:
            if self.null != "none":
                raise ConfigError(f"{name}: an unconditional model (kind='none') needs null='none', got {self.null!r}")
            return
        if self.kind == ConditionKind.CLASS:
            if not is_int(self.num_labels) or self.num_labels < 1:
                raise ConfigError(f"{name}: kind='class' needs num_labels >= 1, got {self.num_labels!r}")
            if self.null == "empty_prompt":
                raise ConfigError(f"{name}: null='empty_prompt' needs a text condition; use 'learned' or 'none'")
            return
        for field in ("dim", "seq_len"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{name}: {field} must be a positive integer for kind='text', got {value!r}")
        if self.num_labels is not None:
            raise ConfigError(f"{name}: num_labels is for kind='class', not 'text' (got {self.num_labels!r})")
        if self.pad_token_id is not None and (not is_int(self.pad_token_id) or self.pad_token_id < 0):
            raise ConfigError(
                f"{name}: pad_token_id must be None (the tokenizer's padding) or an id >= 0 "
                f"(0 for the authors' models), got {self.pad_token_id!r}"
            )

    @property
    def label_rows(self) -> int | None:
        """Rows of a class model's label table: ``num_labels``, plus one for a learned null label."""
        if self.kind != ConditionKind.CLASS:
            return None
        return self.num_labels + (1 if self.null == "learned" else 0)

    @property
    def null_label(self) -> int | None:
        """The label of the learned null class (``num_labels``), or None."""
        return self.num_labels if self.kind == ConditionKind.CLASS and self.null == "learned" else None


# ---------------------------------------------------------------------------------------------------
# CLIP text
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    """Loading or saving a local model needs no progress bar on stderr."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_text_encoder_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found (a CLIPTextModel folder from save_pretrained)")
    if not any((path / name).is_file() for name in TEXT_WEIGHT_FILES):
        raise FileNotFoundError(f"no text encoder weights in {path}: expected one of {list(TEXT_WEIGHT_FILES)}")


def _check_text_encoder_sizes(path: Path) -> None:
    """The CLIP config's sizes against its safetensors header, before transformers allocates anything: a
    config asking for absurd sizes is refused naming the tensor and both shapes (or the layer count)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = next((path / name for name in TEXT_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None or weights.suffix != ".safetensors":
        return
    header = read_weights_header(weights)
    try:
        config = CLIPTextConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, JSON errors
        raise ValueError(f"cannot read {path / 'config.json'}: {type(err).__name__}: {err}") from None
    layers = getattr(config, "num_hidden_layers", 0)
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= len(header):
        raise ValueError(
            f"{path / 'config.json'}: num_hidden_layers={layers!r}, but {weights} holds {len(header)} tensors; the "
            "config does not describe these weights"
        )
    try:
        with torch.device("meta"), _no_transformers_progress_bars():
            expected = CLIPTextModel(config).state_dict()
    except Exception as err:  # a config transformers cannot build a model from
        raise ValueError(f"{path / 'config.json'}: not a CLIP text model config ({type(err).__name__})") from None
    own = {key.removeprefix("text_model."): tensor for key, tensor in expected.items()}
    for key, tensor in header.items():
        mine = own.get(key.removeprefix("text_model."))
        if mine is not None and tuple(mine.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{weights}: {key} has shape {tuple(tensor.shape)} but {path / 'config.json'} expects "
                f"{tuple(mine.shape)}"
            )
        if mine is not None and mine.is_floating_point() and not tensor.is_floating_point():
            raise ValueError(f"{weights}: {key} is stored as {tensor.dtype}, not as floating point numbers")


def _check_tokenizer_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    has_bpe_files = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not ((path / "tokenizer.json").is_file() or has_bpe_files):
        raise FileNotFoundError(
            f"no CLIP tokenizer files in {path}: expected tokenizer.json or vocab.json + merges.txt"
        )


_SHOWN = 40  # characters of a bad prompt quoted in the error


def check_prompt_text(prompts: str | Sequence[Any] | None, what: str = "prompt") -> None:
    """ValueError when a text prompt holds a character that cannot be written as UTF-8: a lone surrogate, as
    Python gives for bytes that were not valid UTF-8 (a command-line argument ``$'a \\xff'`` or a file in another
    encoding).  Entries that are not strings (class labels, None) are left to the model's own checks."""
    items = [prompts] if isinstance(prompts, str) else prompts if isinstance(prompts, list | tuple) else []
    for i, prompt in enumerate(items):
        if not isinstance(prompt, str):
            continue
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            char = prompt[err.start]
            code = ord(char)
            # Python maps an undecodable byte b to the lone surrogate U+DC00 + b ("surrogateescape")
            byte = f" (the byte 0x{code - 0xDC00:02x}, not valid UTF-8)" if 0xDC80 <= code <= 0xDCFF else ""
            which = f"{what}s[{i}]" if len(items) > 1 else what
            start = max(0, err.start - _SHOWN // 2)
            shown = (
                ("..." if start else "")
                + prompt[start : start + _SHOWN]
                + ("..." if len(prompt) > start + _SHOWN else "")
            )
            raise ValueError(
                f"{which} {shown!r} holds an invalid character {char!r}{byte} at position {err.start} (counting "
                "from 0); give the prompt as UTF-8 text (set the terminal or file to UTF-8) or remove that character"
            ) from None


class PromptIds:
    """Prompts -> CLIP token ids [B, L]: BOS, the prompt's pieces, EOS, then ``padding_id`` up to L =
    ``max_length``.  A prompt longer than L keeps BOS, its first L - 2 pieces and EOS (with a warning unless
    ``warn_truncation`` is off).  Holds only the tokenizer, so it pickles cheaply."""

    def __init__(self, tokenizer: Any, max_length: int, padding_id: int, *, warn_truncation: bool = True) -> None:
        self.tokenizer, self.max_length, self.padding_id = tokenizer, int(max_length), int(padding_id)
        self.warn_truncation = warn_truncation

    def __call__(self, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError(f"a prompt must be a string, got {type(prompt).__name__} {prompt!r}")
        check_prompt_text(list(prompts))
        tok = self.tokenizer
        bos, eos, pad, length = tok.bos_token_id, tok.eos_token_id, self.padding_id, self.max_length
        pieces = tok(list(prompts), add_special_tokens=True, padding=False, truncation=False, verbose=False).input_ids
        rows = []
        for prompt, ids in zip(prompts, pieces, strict=True):
            if len(ids) < 2 or ids[0] != bos or ids[-1] != eos:
                raise ValueError(f"the tokenizer did not wrap {prompt!r} in <|startoftext|> ... <|endoftext|>")
            if len(ids) > length:
                if self.warn_truncation:
                    logger.warning(
                        "prompt truncated: %d tokens with BOS and EOS, CLIP takes %d; kept BOS, %d pieces, EOS: %r",
                        len(ids),
                        length,
                        length - 2,
                        prompt if len(prompt) <= 200 else prompt[:200] + "...",
                    )
                ids = ids[: length - 1] + [eos]
            rows.append(ids + [pad] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=device)


class FrozenTextModel(nn.Module):
    """What the text conditions share: a wrapped ``text_model`` whose device and dtype are the module's, kept in
    eval mode whatever :meth:`train` is given (it is frozen)."""

    text_model: nn.Module

    def _hold(self, text_model: nn.Module, tokenizer: Any) -> None:
        """Keep the frozen ``text_model`` and its ``tokenizer``; ``max_length`` is the shorter of the tokenizer's
        and the model's position limits (77 for CLIP).  The subclasses check both first."""
        self.text_model = text_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = min(int(tokenizer.model_max_length), int(text_model.config.max_position_embeddings))

    @property
    def hidden_size(self) -> int:
        """D, the width of the text model's hidden states (512 for CLIP ViT-B/32, 768 for ViT-L/14)."""
        return int(self.text_model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_model.parameters()).dtype

    def train(self, mode: bool = True) -> FrozenTextModel:
        """The text model is frozen: it stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.text_model.eval()
        return self


class CLIPTextCondition(FrozenTextModel):
    """A frozen CLIP text transformer as the condition: ``encode(prompts) -> [B, L, D]``.

    The output is the text model's ``last_hidden_state`` (the final layer norm's output) at all
    L = ``max_length`` positions (77 for CLIP), each position L2-normalised; the text projection is not
    used.  This is what the published VQ-Diffusion models and diffusers' ``VQDiffusionPipeline`` feed to
    cross-attention.

    Token ids are BOS, the prompt's BPE pieces, EOS, then padding up to L.  Every position feeds
    cross-attention, so the padding id matters: ``pad_token_id`` None pads with the tokenizer's pad
    token (``<|endoftext|>`` = 49407 for transformers' CLIP; what diffusers feeds), 0 reproduces the
    authors' tokenizer.  The text model runs without an attention mask (as in diffusers and the
    authors' code): CLIP's causal mask already keeps the padding from changing any position up to EOS;
    the padded positions themselves depend on the padding id.

    A prompt longer than L tokens keeps BOS, its first L - 2 pieces and EOS (the authors' rule and
    transformers' ``truncation=True``), with a warning.  diffusers instead cuts after L ids, which drops
    EOS; only the last position differs.

    Args:
        text_model: a ``transformers.CLIPTextModel`` (frozen here: eval mode, no gradients).
        tokenizer: a ``transformers.CLIPTokenizer``.
        pad_token_id: the id written after EOS, or None for the tokenizer's own padding.
    """

    def __init__(self, text_model: nn.Module, tokenizer: Any, *, pad_token_id: int | None = None) -> None:
        super().__init__()
        config = text_model.config
        vocab_size = int(config.vocab_size)
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"the tokenizer has no {name}; a CLIP tokenizer has <|startoftext|> and <|endoftext|>")
        if len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text model embeds only {vocab_size}")
        if pad_token_id is None:
            if tokenizer.pad_token_id is None:
                raise ValueError("the tokenizer has no pad token; give pad_token_id (0 for the authors' padding)")
        elif not is_int(pad_token_id) or not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id must be an id in [0, {vocab_size}) or None, got {pad_token_id!r}")
        self._hold(text_model, tokenizer)
        self.pad_token_id = pad_token_id

    # -- properties ---------------------------------------------------------------------------------

    @property
    def padding_id(self) -> int:
        """The id actually written after EOS (``pad_token_id``, else the tokenizer's pad token)."""
        return self.tokenizer.pad_token_id if self.pad_token_id is None else self.pad_token_id

    # -- encoding -----------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """B prompts -> [B, L] long ids: BOS, pieces, EOS, padding (empty prompts allowed here)."""
        return self.prompt_ids()(prompts, device)

    def prompt_ids(self, *, warn_truncation: bool = True) -> PromptIds:
        """The tokenization of :meth:`tokenize` as a small picklable callable (for DataLoader workers)."""
        return PromptIds(self.tokenizer, self.max_length, self.padding_id, warn_truncation=warn_truncation)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] long ids -> [B, L, D] final-layer-norm states, each position L2-normalised.

        The norm is taken in float32 and the result cast back to the model's dtype (bf16 stays bf16).
        """
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be a [B, L] integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
        hidden = self.text_model(input_ids=ids.to(self.device)).last_hidden_state
        states = hidden.float()
        return (states / states.norm(dim=-1, keepdim=True)).to(hidden.dtype)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """A non-empty list of non-empty prompts -> [B, L, D] condition on the model's device and dtype."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is an empty list; give at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] is a {type(prompt).__name__}, not a string")
            if not prompt.strip():
                raise ValueError(
                    f"prompts[{i}] is empty; give some text (unconditional samples come from the null condition)"
                )
        return self.encode_ids(self.tokenize(prompts, device=self.device))

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)

    @torch.no_grad()
    def encode_unconditional(self, batch_size: int) -> torch.Tensor:
        """The empty prompt's encoding expanded to [B, L, D] (diffusers' null text when not learnable)."""
        _check_batch_size(batch_size)
        return self.encode_ids(self.tokenize([""], device=self.device)).expand(batch_size, -1, -1)

    # -- files --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        *,
        pad_token_id: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> CLIPTextCondition:
        """Load a ``CLIPTextModel`` and a ``CLIPTokenizer`` from local folders (never the hub).

        Raises FileNotFoundError for a missing folder or missing files, ValueError for files transformers
        cannot read or weights that leave some parameter uninitialised.
        """
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        _check_text_encoder_dir(text_encoder_dir)
        _check_tokenizer_dir(tokenizer_dir)
        _check_text_encoder_sizes(text_encoder_dir)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, JSON and tokenizers errors
            raise ValueError(f"cannot load a CLIP tokenizer from {tokenizer_dir}: {type(err).__name__}: {err}") from err
        try:
            with _no_transformers_progress_bars():
                model, info = CLIPTextModel.from_pretrained(
                    str(text_encoder_dir), local_files_only=True, output_loading_info=True
                )
        except Exception as err:  # as above, plus safetensors errors for damaged weights
            raise ValueError(
                f"cannot load a CLIP text model from {text_encoder_dir}: {type(err).__name__}: {err}"
            ) from err
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{text_encoder_dir}: the weights lack {len(missing)} parameter(s), e.g. {missing[:3]}")
        check_finite(model.state_dict(), str(text_encoder_dir))
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, tokenizer, pad_token_id=pad_token_id)

    def save_pretrained(self, text_encoder_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> None:
        """Write the text model (config.json + model.safetensors) and the tokenizer files.

        ``pad_token_id`` is not stored there; keep it in the owning model's config.
        """
        with _no_transformers_progress_bars():
            self.text_model.save_pretrained(str(text_encoder_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tokenizer_dir))


# ---------------------------------------------------------------------------------------------------
# Null conditions (classifier-free guidance)
# ---------------------------------------------------------------------------------------------------
def _check_batch_size(batch_size: int) -> None:
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class LearnedNullCondition(nn.Module):
    """The learned null text of Improved VQ-Diffusion (Tang et al. 2022, sec. 3.1): a parameter
    ``embedding`` [L, D] that stands in for the condition on unconditional passes (about 10% of training
    samples; the negative branch of guidance).  diffusers: ``LearnedClassifierFreeSamplingEmbeddings
    .embeddings`` (initialised to zeros, as :meth:`zeros` does)."""

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2 or not embedding.is_floating_point():
            got = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise ValueError(f"a null condition is a float [L, D] tensor, got {got}")
        self.embedding = nn.Parameter(embedding)

    @classmethod
    def zeros(cls, seq_len: int, dim: int) -> LearnedNullCondition:
        """A fresh [seq_len, dim] null condition of zeros (77 x 512 for ITHQ)."""
        return cls(torch.zeros(seq_len, dim))

    def forward(self, batch_size: int) -> torch.Tensor:
        """[B, L, D], an expanded view of ``embedding`` (no copy; gradients reach the parameter)."""
        _check_batch_size(batch_size)
        return self.embedding[None].expand(batch_size, -1, -1)


class EmptyPromptNullCondition(nn.Module):
    """The null condition of text models trained without a learned one: the encoding of the empty prompt
    (BOS, EOS, padding), computed once from ``text`` with its padding and stored as the non-persistent
    buffer ``embedding`` [L, D].  diffusers: ``LearnedClassifierFreeSamplingEmbeddings(learnable=False)``.
    Build a new one if the text encoder or its ``pad_token_id`` changes."""

    def __init__(self, text: CLIPTextCondition) -> None:
        super().__init__()
        self.register_buffer("embedding", text.encode_unconditional(1)[0].clone(), persistent=False)

    def forward(self, batch_size: int) -> torch.Tensor:
        """[B, L, D], an expanded view (no copy)."""
        _check_batch_size(batch_size)
        return self.embedding[None].expand(batch_size, -1, -1)
