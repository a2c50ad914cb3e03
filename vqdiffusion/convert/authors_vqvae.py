"""The authors' image tokenizers -> our :class:`~vqdiffusion.models.vqvae.VQVAE`.

Sources (all share the taming-transformers encoder/decoder key layout):

* the ITHQ ``PatchVQGAN`` (``ithq_vqvae.pth``, weights under ``"model"``; EMA codebook buffer
  ``quantize.embedding`` with its statistics ``quantize.cluster_size`` / ``quantize.embedding_avg``);
* taming's ``VQModel`` (``vqgan_imagenet_f16_16384.pth``; ``"state_dict"``, codebook
  ``quantize.embedding.weight``, training losses under ``loss.``);
* taming's ``GumbelVQ`` (``taming_f8_8192_openimages_last.pth``; codebook ``quantize.embed.weight``);
* taming's ``Net2NetTransformer`` (``vqgan_ffhq_f16_1024.pth``; the VQGAN under ``first_stage_model.``);
* the copy inside a VQ-Diffusion checkpoint (``content_codec.enc.*`` / ``content_codec.dec.*``).

They are first normalised to one canonical layout (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*`` and the codebook), then renamed through an explicit key map with shape checks.
The architecture is read from the tensor shapes (the YAML of these models fixes nothing the shapes do not,
except the GroupNorm group count, which is 32 in both code bases).

Remapping (``quantize_number`` in the authors' configs): the text and ImageNet models use only the codes
listed in a statistics file (e.g. 2887 of 8192, 974 of 16384): ``full_to_quantize[code]`` gives the
token of a full code, and a token decodes through the first full code that maps to it.  The converted
codebook keeps exactly those rows, in token order, so decoding is exact.  Encoding picks the nearest of
the kept rows, whereas the authors pick the nearest of all codes and then map it (unused codes map to
token 0): the two differ only where an unused code is the nearest.  For the Gumbel VQ, encoding is the
argmax of a learned projection with Gumbel noise (``quantize.proj``), which nearest-code search does not
reproduce: decoding is exact, encoding is an approximation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..formats.keymap import ConversionError, convert_state_dict
from ..models.vqvae import VQVAE, VQVAEConfig
from .authors_files import StateDict

logger = logging.getLogger(__name__)

GROUPS = 32  # GroupNorm groups of taming's and the authors' Normalize()


@dataclass
class VQVAESource:
    """A tokenizer state dict in the canonical layout plus the keys dropped on the way (with reasons)."""

    state: StateDict
    kind: str  # "ema" (PatchVQGAN), "vq" (taming VQModel) or "gumbel"
    ignored: dict[str, str] = field(default_factory=dict)


_CODEBOOK_KEYS = {"quantize.embedding": "ema", "quantize.embedding.weight": "vq", "quantize.embed.weight": "gumbel"}
_IGNORED_QUANTIZER = {
    "quantize.cluster_size": "EMA codebook statistics (training only)",
    "quantize.embedding_avg": "EMA codebook statistics (training only)",
    "quantize.proj.weight": "Gumbel encoder logits (not representable by nearest-code search; decoding is exact)",
    "quantize.proj.bias": "Gumbel encoder logits (not representable by nearest-code search; decoding is exact)",
}


def canonical_vqvae_state(state: Mapping[str, torch.Tensor], where: str) -> VQVAESource:
    """Normalise any of the layouts above to ``encoder.* decoder.* quant_conv.* post_quant_conv.* quantize.*``.

    Keys that are not part of the tokenizer (training losses, the FFHQ file's GPT) are recorded in
    ``ignored``; anything else unexpected is left in ``state`` for the strict key map to reject.
    """
    ignored: dict[str, str] = {}
    if any(k.startswith("content_codec.") for k in state):
        enc = {k[len("content_codec.enc.") :]: v for k, v in state.items() if k.startswith("content_codec.enc.")}
        dec = {k[len("content_codec.dec.") :]: v for k, v in state.items() if k.startswith("content_codec.dec.")}
        out: StateDict = {}
        for key, value in enc.items():
            if key.split(".")[0] not in ("encoder", "quant_conv", "quantize"):
                raise ConversionError(f"{where}: unexpected tokenizer key 'content_codec.enc.{key}'")
            out[key] = value
        for key, value in dec.items():
            if key.startswith("quantize."):  # the same module as enc.quantize, saved twice
                if key not in enc or not torch.equal(enc[key], value):
                    raise ConversionError(
                        f"{where}: content_codec.dec.{key} differs from content_codec.enc.{key}; the encoder and "
                        "decoder must share one quantizer"
                    )
                ignored[f"content_codec.dec.{key}"] = "duplicate of content_codec.enc." + key
                continue
            if key.split(".")[0] not in ("decoder", "post_quant_conv"):
                raise ConversionError(f"{where}: unexpected tokenizer key 'content_codec.dec.{key}'")
            out[key] = value
        others = [k for k in state if not k.startswith(("content_codec.enc.", "content_codec.dec."))]
        if any(k.startswith("content_codec.") for k in others):
            bad = [k for k in others if k.startswith("content_codec.")]
            raise ConversionError(f"{where}: unexpected tokenizer key(s) {bad[:3]}")
        state = out
    elif any(k.startswith("first_stage_model.") for k in state):  # taming Net2NetTransformer (FFHQ)
        for key in state:
            if not key.startswith("first_stage_model."):
                ignored[key] = "taming's autoregressive transformer / conditioning stage (not the tokenizer)"
        state = {k[len("first_stage_model.") :]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    out = {}
    kinds = [kind for key, kind in _CODEBOOK_KEYS.items() if key in state]
    if len(kinds) != 1:
        raise ConversionError(
            f"{where}: expected exactly one codebook tensor ({' / '.join(_CODEBOOK_KEYS)}), found {len(kinds)}"
        )
    for key, value in state.items():
        if key.startswith("loss."):
            ignored[key] = "training loss (discriminator / perceptual network)"
        elif key in _IGNORED_QUANTIZER:
            ignored[key] = _IGNORED_QUANTIZER[key]
        else:
            out[key] = value
    if kinds[0] == "gumbel":
        logger.warning(
            "%s: Gumbel VQ tokenizer: decoding is exact; encoding with nearest-code search is not the authors' "
            "Gumbel argmax (their quantize.proj is dropped)",
            where,
        )
    return VQVAESource(out, kinds[0], ignored)


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _shape(state: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Size:
    if key not in state:
        raise ConversionError(f"{where}: expected key {key!r} is missing")
    return state[key].shape


def vqvae_config_from_taming_state(
    state: Mapping[str, torch.Tensor], *, num_embeddings: int, sample_size: int, where: str
) -> VQVAEConfig:
    """The :class:`VQVAEConfig` of a canonical taming-layout state dict, read from its tensor shapes."""
    ch = _shape(state, "encoder.conv_in.weight", where)[0]
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    if levels == 0:
        raise ConversionError(f"{where}: no encoder.down.* keys; not a taming-layout VQ-VAE")
    blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = tuple(int(_shape(state, f"encoder.down.{i}.block.0.conv1.weight", where)[0]) for i in range(levels))
    if channels[0] != ch:
        raise ConversionError(
            f"{where}: encoder.conv_in has {ch} output channels but the first level {channels[0]}; ch_mult must "
            "start with 1 (as in every published tokenizer)"
        )
    return VQVAEConfig(
        block_out_channels=channels,
        latent_channels=int(_shape(state, "encoder.conv_out.weight", where)[0]),
        embed_dim=int(_shape(state, "quant_conv.weight", where)[0]),
        num_embeddings=num_embeddings,
        encoder_attention=tuple(f"encoder.down.{i}.attn.0.q.weight" in state for i in range(levels)),
        decoder_attention=tuple(f"decoder.up.{i}.attn.0.q.weight" in state for i in range(levels)),
        in_channels=int(_shape(state, "encoder.conv_in.weight", where)[1]),
        out_channels=int(_shape(state, "decoder.conv_out.weight", where)[0]),
        layers_per_block=blocks,
        mid_attention="encoder.mid.attn_1.q.weight" in state,
        norm_num_groups=GROUPS,
        norm_eps=1e-6,
        sample_size=sample_size,
    )


def _pair(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"}


def _res(src: str, dst: str, shortcut: bool) -> dict[str, str]:
    out = {**_pair(f"{src}.norm1", f"{dst}.in_norm"), **_pair(f"{src}.conv1", f"{dst}.in_conv")}
    out.update({**_pair(f"{src}.norm2", f"{dst}.out_norm"), **_pair(f"{src}.conv2", f"{dst}.out_conv")})
    if shortcut:
        out.update(_pair(f"{src}.nin_shortcut", f"{dst}.shortcut"))
    return out


def _attn(src: str, dst: str) -> dict[str, str]:
    out = _pair(f"{src}.norm", f"{dst}.norm")
    for theirs, ours in (("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "proj")):
        out.update(_pair(f"{src}.{theirs}", f"{dst}.{ours}"))
    return out


def taming_to_vqvae_key_map(config: VQVAEConfig, codebook_key: str) -> dict[str, str]:
    """Explicit canonical-taming key -> our key map (levels are numbered by resolution on both sides)."""
    ch, levels = config.block_out_channels, config.num_levels
    km: dict[str, str] = {**_pair("encoder.conv_in", "encoder.stem")}
    for i in range(levels):
        for j in range(config.layers_per_block):
            cin = ch[max(i - 1, 0)] if j == 0 else ch[i]
            km.update(_res(f"encoder.down.{i}.block.{j}", f"encoder.levels.{i}.res_blocks.{j}", cin != ch[i]))
            if config.encoder_attention[i]:
                km.update(_attn(f"encoder.down.{i}.attn.{j}", f"encoder.levels.{i}.attn_blocks.{j}"))
        if i < levels - 1:
            km.update(_pair(f"encoder.down.{i}.downsample.conv", f"encoder.levels.{i}.resample.conv"))
        for j in range(config.layers_per_block + 1):
            cin = ch[min(i + 1, levels - 1)] if j == 0 else ch[i]
            km.update(_res(f"decoder.up.{i}.block.{j}", f"decoder.levels.{i}.res_blocks.{j}", cin != ch[i]))
            if config.decoder_attention[i]:
                km.update(_attn(f"decoder.up.{i}.attn.{j}", f"decoder.levels.{i}.attn_blocks.{j}"))
        if i > 0:
            km.update(_pair(f"decoder.up.{i}.upsample.conv", f"decoder.levels.{i}.resample.conv"))
    for part in ("encoder", "decoder"):
        km.update(_res(f"{part}.mid.block_1", f"{part}.mid.res_a", False))
        km.update(_res(f"{part}.mid.block_2", f"{part}.mid.res_b", False))
        if config.mid_attention:
            km.update(_attn(f"{part}.mid.attn_1", f"{part}.mid.attn"))
        km.update(_pair(f"{part}.norm_out", f"{part}.out_norm"))
        km.update(_pair(f"{part}.conv_out", f"{part}.out_conv"))
    km.update(_pair("decoder.conv_in", "decoder.stem"))
    km.update(_pair("quant_conv", "quant_proj"))
    km.update(_pair("post_quant_conv", "post_quant_proj"))
    km[codebook_key] = "codebook.weight"
    return km


def used_code_table(full_to_quantize: torch.Tensor, num_codes: int, where: str) -> torch.Tensor:
    """The statistics file's ``full_to_quantize`` [num_codes] -> ``quantize_to_full`` [Q] (first full code
    of each token, the authors' rule).  Every token 0..Q-1 must occur."""
    table = full_to_quantize
    if not isinstance(table, torch.Tensor) or table.ndim != 1 or table.is_floating_point():
        raise ConversionError(f"{where}: expected a 1-d integer tensor (full code -> token), got {type(table)}")
    if table.numel() != num_codes:
        raise ConversionError(
            f"{where}: the map has {table.numel()} entries but the codebook has {num_codes} codes; it belongs to "
            "another tokenizer"
        )
    table = table.long()
    if int(table.min()) < 0:
        raise ConversionError(f"{where}: negative token {int(table.min())} in the map")
    used = int(table.max()) + 1
    first = torch.full((used,), num_codes, dtype=torch.long)
    first = first.scatter_reduce(0, table, torch.arange(num_codes), reduce="amin")  # the smallest full code
    if bool((first == num_codes).any()):
        missing = (first == num_codes).nonzero().flatten()[:5].tolist()
        raise ConversionError(f"{where}: tokens {missing} never occur in the map; it is not a full-to-used map")
    return first


def vqvae_from_taming(
    source: VQVAESource,
    *,
    sample_size: int,
    used_codes: torch.Tensor | None = None,
    where: str,
) -> VQVAE:
    """Build our VQVAE from a canonical state (see :func:`canonical_vqvae_state`).

    ``used_codes``: the ``quantize_to_full`` table of :func:`used_code_table` (K = its length), or None to
    keep the whole codebook.
    """
    codebook_key = next(k for k in _CODEBOOK_KEYS if k in source.state)
    codebook = source.state[codebook_key]
    if codebook.ndim != 2:
        raise ConversionError(f"{where}: codebook {codebook_key!r} has shape {tuple(codebook.shape)}, expected [n, d]")
    state = dict(source.state)
    if used_codes is not None:
        state[codebook_key] = codebook[used_codes]
    num = int(state[codebook_key].shape[0])
    config = vqvae_config_from_taming_state(state, num_embeddings=num, sample_size=sample_size, where=where)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VQVAE(config).state_dict().items()}
    key_map = taming_to_vqvae_key_map(config, codebook_key)
    # taming's attention projections are 1x1 convolutions; ours are Linear layers.
    transforms = {k: _squeeze_1x1 for k in key_map if re.search(r"\.(q|k|v|proj_out)\.weight$", k)}
    converted = convert_state_dict(state, key_map, shapes, transforms=transforms, source_name=where)
    model = VQVAE(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _squeeze_1x1(weight: torch.Tensor) -> torch.Tensor:
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        return weight[:, :, 0, 0]
    return weight  # the shape check then names the unexpected shape
