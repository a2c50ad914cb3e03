"""Tiny synthetic files in the VQ-Diffusion authors' formats (DiffusionTransformer checkpoints, taming /
PatchVQGAN tokenizers, the YAML configs), with the authors' key names and shapes."""

from __future__ import annotations

import math
from pathlib import Path

import torch

T = 10  # diffusion steps of the tiny models
SIDE = 4  # token grid 4 x 4
DIM, HEADS, LAYERS = 32, 2, 2
CLIP_WIDTH = 64  # OpenAI's rule: heads = width // 64 = 1
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


# ---------------------------------------------------------------------------------------------------
# Synthetic files in the authors' formats
# ---------------------------------------------------------------------------------------------------
def rand(gen: torch.Generator, *shape: int, std: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def alpha1_buffers(steps: int, n: int) -> dict[str, torch.Tensor]:
    """The DiffusionTransformer's schedule buffers, from the alpha1 definition (cumulative linear)."""
    i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    att = 0.99999 + i * (0.000009 - 0.99999)
    ctt = 0.000009 + i * (0.99999 - 0.000009)
    at = att / torch.cat([torch.ones(1, dtype=torch.float64), att[:-1]])
    one_min_ct = (1 - ctt) / torch.cat([torch.ones(1, dtype=torch.float64), 1 - ctt[:-1]])
    ct = 1 - one_min_ct
    bt = (1 - at - ct) / n
    att_, ctt_ = (
        torch.cat([att, torch.ones(1, dtype=torch.float64)]),
        torch.cat([ctt, torch.zeros(1, dtype=torch.float64)]),
    )
    btt = (1 - att_ - ctt_) / n
    out = {
        "log_at": at.log(),
        "log_bt": bt.log(),
        "log_ct": ct.log(),
        "log_cumprod_at": att_.log(),
        "log_cumprod_bt": btt.log(),
        "log_cumprod_ct": ctt_.log(),
        "log_1_min_ct": torch.log(1 - ct + 1e-40),
        "log_1_min_cumprod_ct": torch.log(1 - ctt_ + 1e-40),
    }
    return {k: v.float() for k, v in out.items()}


def transformer_state(variant: str, K: int, gen: torch.Generator, *, classes: int = 0, grid: int = SIDE) -> dict:
    """A DiffusionTransformer state dict (keys relative to it), authors' names and shapes."""
    D = DIM
    s = {
        "transformer.content_emb.emb.weight": rand(gen, K + 1, D),
        "transformer.content_emb.height_emb.weight": rand(gen, grid, D),
        "transformer.content_emb.width_emb.weight": rand(gen, grid, D),
        "transformer.to_logits.0.weight": 1 + rand(gen, D, std=0.1),
        "transformer.to_logits.0.bias": rand(gen, D, std=0.1),
        "transformer.to_logits.1.weight": rand(gen, K, D),
        "transformer.to_logits.1.bias": rand(gen, K, std=0.1),
    }

    def lin(name: str, out: int, inp: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = rand(gen, out, inp, std=1 / math.sqrt(inp)), rand(gen, out, std=0.1)

    def ada(name: str, rows: int) -> None:
        s[f"{name}.emb.weight"] = rand(gen, rows, D, std=1.0)
        lin(f"{name}.linear", 2 * D, D)

    for i in range(LAYERS):
        p = f"transformer.blocks.{i}"
        ada(f"{p}.ln1", T)
        attns = ["attn1", "attn2"] if variant == "text" else ["attn"]
        for a in attns:
            for proj in ("key", "query", "value", "proj"):
                lin(f"{p}.{a}.{proj}", D, CLIP_WIDTH if a == "attn2" and proj in ("key", "value") else D)
        if variant == "text":
            ada(f"{p}.ln1_1", T)
            s[f"{p}.attn2.mask"] = torch.tril(torch.ones(SIDE * SIDE, SIDE * SIDE)).view(1, 1, SIDE**2, SIDE**2)
        if variant == "class":
            ada(f"{p}.ln2", classes)
        else:
            s[f"{p}.ln2.weight"], s[f"{p}.ln2.bias"] = 1 + rand(gen, D, std=0.1), rand(gen, D, std=0.1)
        if variant == "text":
            lin(f"{p}.mlp.0", 4 * D, D)
            lin(f"{p}.mlp.2", D, 4 * D)
        else:
            s[f"{p}.mlp.conv1.weight"], s[f"{p}.mlp.conv1.bias"] = rand(gen, 4 * D, D, 3, 3, std=0.05), rand(gen, 4 * D)
            s[f"{p}.mlp.conv2.weight"], s[f"{p}.mlp.conv2.bias"] = rand(gen, D, 4 * D, 3, 3, std=0.03), rand(gen, D)
    s.update(alpha1_buffers(T, K))
    s["Lt_history"], s["Lt_count"] = torch.rand(T, generator=gen), torch.full((T,), 20.0)
    return s


def clip_state(vocab: int, gen: torch.Generator, layers: int = 1) -> dict:
    """OpenAI CLIP's text tower (model.py names) as stored under ``condition_emb.``."""
    W = CLIP_WIDTH
    s = {
        "token_embedding.weight": rand(gen, vocab, W, std=0.5),
        "positional_embedding": rand(gen, 77, W, std=0.1),
        "ln_final.weight": 1 + rand(gen, W, std=0.1),
        "ln_final.bias": rand(gen, W, std=0.1),
        "text_projection": rand(gen, W, W),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"] = rand(gen, 3 * W, W, std=0.15), rand(gen, 3 * W)
        s[f"{p}.attn.out_proj.weight"], s[f"{p}.attn.out_proj.bias"] = rand(gen, W, W, std=0.15), rand(gen, W)
        for ln in ("ln_1", "ln_2"):
            s[f"{p}.{ln}.weight"], s[f"{p}.{ln}.bias"] = 1 + rand(gen, W, std=0.1), rand(gen, W, std=0.1)
        s[f"{p}.mlp.c_fc.weight"], s[f"{p}.mlp.c_fc.bias"] = rand(gen, 4 * W, W, std=0.15), rand(gen, 4 * W)
        s[f"{p}.mlp.c_proj.weight"], s[f"{p}.mlp.c_proj.bias"] = rand(gen, W, 4 * W, std=0.08), rand(gen, W)
    return s


def taming_state(n_embed: int, gen: torch.Generator, *, quantizer: str = "ema") -> dict:
    """A taming / PatchVQGAN encoder-decoder (ch 32, ch_mult (1, 2), 1 res block, attention at the 4x4 level)."""
    s: dict[str, torch.Tensor] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (
            rand(gen, out, inp, k, k, std=0.5 / math.sqrt(inp * k * k)),
            rand(gen, out, std=0.05),
        )

    def norm(name: str, c: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = 1 + rand(gen, c, std=0.1), rand(gen, c, std=0.1)

    def res(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    conv("encoder.conv_in", 32, 3, 3)
    res("encoder.down.0.block.0", 32, 32)
    conv("encoder.down.0.downsample.conv", 32, 32, 3)
    res("encoder.down.1.block.0", 32, 64)
    attn("encoder.down.1.attn.0", 64)
    for part in ("encoder", "decoder"):
        res(f"{part}.mid.block_1", 64, 64)
        attn(f"{part}.mid.attn_1", 64)
        res(f"{part}.mid.block_2", 64, 64)
    norm("encoder.norm_out", 64)
    conv("encoder.conv_out", 32, 64, 3)
    conv("quant_conv", 16, 32, 1)
    conv("post_quant_conv", 32, 16, 1)
    conv("decoder.conv_in", 64, 32, 3)
    for j in range(2):
        res(f"decoder.up.1.block.{j}", 64, 64)
        attn(f"decoder.up.1.attn.{j}", 64)
    conv("decoder.up.1.upsample.conv", 64, 64, 3)
    res("decoder.up.0.block.0", 64, 32)
    res("decoder.up.0.block.1", 32, 32)
    norm("decoder.norm_out", 32)
    conv("decoder.conv_out", 3, 32, 3)
    codebook = rand(gen, n_embed, 16, std=1.0)
    if quantizer == "ema":
        s["quantize.embedding"] = codebook
        s["quantize.cluster_size"], s["quantize.embedding_avg"] = torch.rand(n_embed, generator=gen), codebook.clone()
    elif quantizer == "vq":
        s["quantize.embedding.weight"] = codebook
    else:  # gumbel
        s["quantize.embed.weight"] = codebook
        conv("quantize.proj", n_embed, 32, 1)
    return s


BPE_VOCAB = 512 + len(MERGES) + 2


def write_yaml(path: Path, variant: str, K: int, *, codec: str, classes: int = 1000, grid: int = SIDE, **extra) -> Path:
    """An authors' YAML (the ``!!python/tuple`` tag included), with ``extra`` overriding transformer params."""
    target = {
        "text": "Text2ImageTransformer",
        "class": "Condition2ImageTransformer",
        "none": "UnCondition2ImageTransformer",
    }
    tparams = {
        "attn_type": {"text": "selfcross", "class": "selfcondition", "none": "self"}[variant],
        "n_layer": LAYERS,
        "content_seq_len": SIDE * SIDE,
        "content_spatial_size": [SIDE, SIDE],
        "n_embd": DIM,
        "n_head": HEADS,
        "attn_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "block_activate": "GELU2",
        "timestep_type": "adalayernorm",
        "mlp_hidden_times": 4,
    }
    if variant == "text":
        tparams.update(condition_seq_len=77, condition_dim=CLIP_WIDTH)
    else:
        tparams["mlp_type"] = "conv_mlp"
    if variant == "class":
        tparams.update(class_type="adalayernorm", class_number=classes)
    tparams.update(extra)
    import yaml

    diffusion = {
        "diffusion_step": T,
        "alpha_init_type": "alpha1",
        "auxiliary_loss_weight": 5.0e-4,
        "adaptive_auxiliary_loss": True,
        "mask_weight": [1, 1],
        "learnable_cf": variant == "text",
        "transformer_config": {
            "target": f"image_synthesis.modeling.transformers.transformer_utils.{target[variant]}",
            "params": tparams,
        },
        "content_emb_config": {
            "target": "image_synthesis.modeling.embeddings.dalle_mask_image_embedding.DalleMaskImageEmbedding",
            "params": {"num_embed": K, "spatial_size": "@TUPLE@", "embed_dim": DIM, "trainable": True},
        },
    }
    if variant == "text":
        diffusion["condition_emb_config"] = {
            "target": "image_synthesis.modeling.embeddings.clip_text_embedding.CLIPTextEmbedding",
            "params": {
                "clip_name": "ViT-B/32",
                "num_embed": 49408,
                "normalize": True,
                "pick_last_embedding": False,
                "keep_seq_len_dim": False,
                "additional_last_embedding": False,
                "embed_dim": 512,
            },
        }
    model = {
        "content_info": {"key": "image"},
        "content_codec_config": {
            "target": f"image_synthesis.modeling.codecs.image_codec.{codec}",
            "params": {
                "trainable": False,
                "token_shape": [SIDE, SIDE],
                "quantize_number": K if "Taming" in codec else 0,
            },
        },
        "diffusion_config": {
            "target": "image_synthesis.modeling.transformers.diffusion_transformer.DiffusionTransformer",
            "params": diffusion,
        },
    }
    if variant == "text":
        model["condition_codec_config"] = {"params": {"pad_value": 0, "context_length": 77}}
    text = yaml.safe_dump({"model": {"target": "x", "params": model}}, sort_keys=False)
    text = text.replace("'@TUPLE@'", f"!!python/tuple [{grid}, {grid}]")
    path.write_text(text)
    return path


def save_checkpoint(path: Path, transformer: dict, ema: dict | None, codec: dict | None = None, **extra) -> Path:
    model = {f"transformer.{k}": v for k, v in transformer.items()}
    if codec:
        model.update(codec)
    ckpt = {"last_epoch": 3, "last_iter": 999, "model": model, **extra}
    if ema is not None:
        ckpt["ema"] = ema
    ckpt.setdefault(
        "optimizer_and_scheduler",
        {"transformer": {"optimizer": {"module": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.96)}]}}}},
    )
    torch.save(ckpt, path)
    return path


def ema_of(state: dict, gen: torch.Generator) -> dict:
    """An EMA copy that differs from the raw weights (float parameters perturbed, buffers kept)."""
    out = {}
    for k, v in state.items():
        if k.startswith("transformer.") and not k.endswith(".mask"):
            out[k] = v + 0.05 * torch.randn(v.shape, generator=gen)
        else:
            out[k] = v.clone()
    return out


def codec_copy(vq: dict) -> dict:
    """The VQ-VAE as DALLE stores it: content_codec.enc.{encoder,quant_conv,quantize} and .dec.{...}."""
    out = {}
    for k, v in vq.items():
        part = k.split(".")[0]
        if part in ("encoder", "quant_conv"):
            out[f"content_codec.enc.{k}"] = v
        elif part in ("decoder", "post_quant_conv"):
            out[f"content_codec.dec.{k}"] = v
        else:  # quantize: one module, saved under both
            out[f"content_codec.enc.{k}"] = v
            out[f"content_codec.dec.{k}"] = v.clone()
    return out
