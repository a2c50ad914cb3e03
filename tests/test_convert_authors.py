"""The authors' checkpoints (microsoft/VQ-Diffusion .pth + YAML) -> our pipeline.

No published file can be downloaded here, so tiny synthetic checkpoints are built with the authors' key names,
layouts and buffers (Solver.save's dict, DALLE / DiffusionTransformer / Text2Image-, Condition2Image- and
UnCondition2ImageTransformer, OpenAI CLIP, PatchVQGAN and taming VQGANs).  Converted models are checked against
a direct re-implementation of the authors' forward passes written from those keys (``ref_*`` below).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.authors import (
    BPE_VOCAB,
    CLIP_WIDTH,
    DIM,
    HEADS,
    LAYERS,
    MERGES,
    SIDE,
    T,
    clip_state,
    codec_copy,
    ema_of,
    save_checkpoint,
    taming_state,
    transformer_state,
    write_yaml,
)
from support.tokenizers import write_authors_bpe

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.cli import main
from vqdiffusion.config import ConfigError
from vqdiffusion.convert.authors import convert_authors_checkpoint, write_authors_conversion
from vqdiffusion.formats.keymap import ConversionError
from vqdiffusion.sampling import SamplingOptions, guided_predictor, sample_tokens

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------
# Independent re-implementations of the authors' forward passes (from their keys)
# ---------------------------------------------------------------------------------------------------
def ref_logits(sd: dict, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, variant: str) -> torch.Tensor:
    """Text2Image / Condition2Image / UnCondition2ImageTransformer: x [B, N] -> log p(x0) [B, K, N]."""
    B, N = x.shape
    D = DIM

    def lin(v, name):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def ada(v, name, idx):
        table = sd[f"{name}.emb.weight"]
        e = table.mean(0, keepdim=True).repeat(B, 1) if idx[0] >= table.shape[0] else table[idx]
        scale, shift = lin(F.silu(e), f"{name}.linear").unsqueeze(1).chunk(2, dim=2)
        return F.layer_norm(v, (D,)) * (1 + scale) + shift

    def attention(q_in, kv_in, name):
        hd = D // HEADS

        def heads(v):
            return v.view(B, v.shape[1], HEADS, hd).transpose(1, 2)

        q, k, v = (
            heads(lin(q_in, f"{name}.query")),
            heads(lin(kv_in, f"{name}.key")),
            heads(lin(kv_in, f"{name}.value")),
        )
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        return lin((att @ v).transpose(1, 2).reshape(B, N, D), f"{name}.proj")

    def gelu2(v):
        return v * torch.sigmoid(1.702 * v)

    emb = sd["transformer.content_emb.emb.weight"][x]
    H, W = sd["transformer.content_emb.height_emb.weight"], sd["transformer.content_emb.width_emb.weight"]
    pos = (H[:, None, :] + W[None, :, :]).reshape(-1, D)
    h = emb + pos[:N]
    for i in range(LAYERS):
        p = f"transformer.blocks.{i}"
        if variant == "text":
            h = h + attention(ada(h, f"{p}.ln1", t), ada(h, f"{p}.ln1", t), f"{p}.attn1")
            h = h + attention(ada(h, f"{p}.ln1_1", t), cond, f"{p}.attn2")
        else:
            a = ada(h, f"{p}.ln1", t)
            h = h + attention(a, a, f"{p}.attn")
        if variant == "class":
            m = ada(h, f"{p}.ln2", cond)
        else:
            m = F.layer_norm(h, (D,), sd[f"{p}.ln2.weight"], sd[f"{p}.ln2.bias"])
        if variant == "text":
            h = h + lin(gelu2(lin(m, f"{p}.mlp.0")), f"{p}.mlp.2")
        else:
            side = int(math.sqrt(N))
            g = m.transpose(1, 2).reshape(B, D, side, side)
            g = F.conv2d(g, sd[f"{p}.mlp.conv1.weight"], sd[f"{p}.mlp.conv1.bias"], padding=1)
            g = F.conv2d(gelu2(g), sd[f"{p}.mlp.conv2.weight"], sd[f"{p}.mlp.conv2.bias"], padding=1)
            h = h + g.reshape(B, D, N).transpose(1, 2)
    h = F.layer_norm(h, (D,), sd["transformer.to_logits.0.weight"], sd["transformer.to_logits.0.bias"])
    logits = lin(h, "transformer.to_logits.1")
    return torch.log_softmax(logits.double(), dim=-1).float().transpose(1, 2)


def ref_clip(sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP text tower (causal, QuickGELU), final LN at every position, L2-normalised."""
    W = CLIP_WIDTH
    heads = W // 64
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    L = ids.shape[1]
    causal = torch.full((L, L), float("-inf")).triu(1)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{i}"
        y = F.layer_norm(x, (W,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
        q, k, v = (y @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
        split = [z.view(z.shape[0], L, heads, W // heads).transpose(1, 2) for z in (q, k, v)]
        att = torch.softmax(split[0] @ split[1].transpose(-2, -1) / math.sqrt(W // heads) + causal, dim=-1)
        y = (att @ split[2]).transpose(1, 2).reshape(x.shape)
        x = x + y @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
        y = F.layer_norm(x, (W,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
        y = y @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
        y = y * torch.sigmoid(1.702 * y)
        x = x + y @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]
        i += 1
    x = F.layer_norm(x, (W,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x / x.norm(dim=-1, keepdim=True)


def _ref_res(sd, p, x):
    h = F.conv2d(
        F.silu(F.group_norm(x, 32, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)),
        sd[f"{p}.conv1.weight"],
        sd[f"{p}.conv1.bias"],
        padding=1,
    )
    h = F.conv2d(
        F.silu(F.group_norm(h, 32, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)),
        sd[f"{p}.conv2.weight"],
        sd[f"{p}.conv2.bias"],
        padding=1,
    )
    if f"{p}.nin_shortcut.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.nin_shortcut.weight"], sd[f"{p}.nin_shortcut.bias"])
    return x + h


def _ref_attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = F.group_norm(x, 32, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-6)
    q, k, v = (F.conv2d(h, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]).reshape(b, c, -1) for n in "qkv")
    w_ = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c**-0.5, dim=2)
    h = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + F.conv2d(h, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])


def ref_decode(sd: dict, z: torch.Tensor) -> torch.Tensor:
    """taming's Decoder(post_quant_conv(z)), clamped and mapped to [0, 1] like the authors' codec."""
    h = F.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    h = F.conv2d(h, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = _ref_res(sd, "decoder.mid.block_2", _ref_attn(sd, "decoder.mid.attn_1", _ref_res(sd, "decoder.mid.block_1", h)))
    for level in (1, 0):
        for j in range(2):
            h = _ref_res(sd, f"decoder.up.{level}.block.{j}", h)
            if f"decoder.up.{level}.attn.{j}.q.weight" in sd:
                h = _ref_attn(sd, f"decoder.up.{level}.attn.{j}", h)
        if level == 1:
            h = F.conv2d(
                F.interpolate(h, scale_factor=2.0, mode="nearest"),
                sd["decoder.up.1.upsample.conv.weight"],
                sd["decoder.up.1.upsample.conv.bias"],
                padding=1,
            )
    h = F.silu(F.group_norm(h, 32, sd["decoder.norm_out.weight"], sd["decoder.norm_out.bias"], 1e-6))
    h = F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)
    return (h.clamp(-1, 1) + 1) / 2


def ref_encode(sd: dict, images01: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """PatchVQGAN encoder + nearest code (euclidean) on images in [0, 1]: [B, h * w] indices."""
    h = F.conv2d(2 * images01 - 1, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], padding=1)
    h = _ref_res(sd, "encoder.down.0.block.0", h)
    h = F.conv2d(
        F.pad(h, (0, 1, 0, 1)),
        sd["encoder.down.0.downsample.conv.weight"],
        sd["encoder.down.0.downsample.conv.bias"],
        stride=2,
    )
    h = _ref_attn(sd, "encoder.down.1.attn.0", _ref_res(sd, "encoder.down.1.block.0", h))
    h = _ref_res(sd, "encoder.mid.block_2", _ref_attn(sd, "encoder.mid.attn_1", _ref_res(sd, "encoder.mid.block_1", h)))
    h = F.silu(F.group_norm(h, 32, sd["encoder.norm_out.weight"], sd["encoder.norm_out.bias"], 1e-6))
    h = F.conv2d(h, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"], padding=1)
    z = F.conv2d(h, sd["quant_conv.weight"], sd["quant_conv.bias"]).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    d = (z**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * z @ codebook.T
    return d.argmin(1).view(images01.shape[0], -1)


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors_text")
    gen = torch.Generator().manual_seed(0)
    K = 12
    raw = transformer_state("text", K, gen)
    raw.update({f"condition_emb.{k}": v for k, v in clip_state(BPE_VOCAB, gen).items()})
    raw["empty_text_embed"] = torch.randn(77, CLIP_WIDTH, generator=gen, dtype=torch.float64)
    vq = taming_state(K, gen, quantizer="ema")
    ema = ema_of(raw, gen)
    files = {
        "ckpt": save_checkpoint(root / "ithq_learnable.pth", raw, ema, codec_copy(vq)),
        "yaml": write_yaml(root / "ithq.yaml", "text", K, codec="ema_vqvae.PatchVQVAE"),
        "bpe": write_authors_bpe(root / "bpe_simple_vocab_16e6.txt.gz", MERGES),
        "root": root,
    }
    return files, raw, ema, vq


def _x_t(K: int, B: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, K + 1, (B, SIDE * SIDE), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Text-conditional
# ---------------------------------------------------------------------------------------------------
def test_text_checkpoint_matches_the_authors_computation(text_files, tmp_path) -> None:
    files, raw, ema, vq = text_files
    conv = convert_authors_checkpoint(files["ckpt"], files["yaml"], tokenizer=files["bpe"])
    pipe = conv.pipeline
    assert conv.record["weights"] == "ema"
    # the CLIP condition: ids from the BPE, then the OpenAI tower
    ids = pipe.text_encoder.tokenize(["a red cat", "dog"])
    a_word = 256 + ord("a") - ord("!")  # byte symbol "a" with </w>
    assert ids[0, :5].tolist() == [BPE_VOCAB - 2, a_word, 512 + 5, 512 + 1, BPE_VOCAB - 1]  # red, cat: merged
    assert ids[1, :3].tolist() == [BPE_VOCAB - 2, 512 + 3, BPE_VOCAB - 1] and ids[1, 3:].eq(0).all()
    clip = {k[len("condition_emb.") :]: v for k, v in ema.items() if k.startswith("condition_emb.")}
    cond = pipe.text_encoder.encode_ids(ids)
    torch.testing.assert_close(cond, ref_clip(clip, ids), rtol=0, atol=2e-5)
    # the denoiser on the EMA weights
    x_t, t = _x_t(12), torch.tensor([0, 4, T - 1])
    cond3 = torch.cat([cond, cond[:1]])
    with torch.no_grad():
        ours = pipe.denoiser(x_t, t, cond3)
    torch.testing.assert_close(ours, ref_logits(ema, x_t, t, cond3, "text"), rtol=0, atol=2e-4)
    # learned null text, schedule, defaults, decoding and encoding
    torch.testing.assert_close(pipe.null_embeddings(2)[0], raw["empty_text_embed"].float())
    assert pipe.schedule.num_timesteps == T and pipe.schedule.num_classes == 12
    assert (pipe.defaults.guidance_scale, pipe.defaults.truncation_rate) == (5.0, 1.0)
    tokens = torch.randint(0, 12, (2, SIDE, SIDE), generator=torch.Generator().manual_seed(2))
    z = vq["quantize.embedding"][tokens].permute(0, 3, 1, 2)
    torch.testing.assert_close(pipe.decode(tokens), ref_decode(vq, z), rtol=0, atol=1e-5)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pipe.vqvae.encode(images * 2 - 1).flatten(1), ref_encode(vq, images, vq["quantize.embedding"]))
    # the record: training settings and every ignored key with a reason
    assert conv.record["training"]["aux_weight"] == 5e-4 and conv.record["training"]["mask_weight"] == [1.0, 1.0]
    reasons = conv.record["ignored"]["checkpoint"]
    assert {
        "optimizer and learning-rate scheduler state",
        "step counter",
        "raw weights (the EMA weights are used)",
    } <= set(reasons)
    assert reasons["causal mask buffer of the cross-attention (never used)"]["count"] == LAYERS
    # our layout round trip
    write_authors_conversion(conv, tmp_path / "ours")
    back = VQDiffusionPipeline.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back.denoiser(x_t, t, cond3), ours, rtol=0, atol=0)
    assert back.text_encoder.pad_token_id == 0
    assert json.loads((tmp_path / "ours" / "authors_source.json").read_text())["variant"] == "text"


def test_raw_weights_on_request(text_files) -> None:
    files, raw, ema, _ = text_files
    conv = convert_authors_checkpoint(files["ckpt"], files["yaml"], tokenizer=files["bpe"], use_ema=False)
    assert conv.record["weights"] == "raw"
    x_t, t = _x_t(12), torch.tensor([1, 2, 3])
    cond = torch.randn(3, 77, CLIP_WIDTH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = conv.pipeline.denoiser(x_t, t, cond)
    torch.testing.assert_close(out, ref_logits(raw, x_t, t, cond, "text"), rtol=0, atol=2e-4)


def test_text_export_to_diffusers_round_trip_and_step_by_step(text_files, tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    files, _, _, _ = text_files
    conv = convert_authors_checkpoint(files["ckpt"], files["yaml"], tokenizer=files["bpe"])
    write_authors_conversion(conv, tmp_path / "ours")
    ours = VQDiffusionPipeline.from_pretrained(tmp_path / "ours")
    write_authors_conversion(conv, tmp_path / "diff", to="diffusers")
    back = VQDiffusionPipeline.from_pretrained(tmp_path / "diff")
    for name, module in ours.modules().items():
        theirs = back.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, theirs[key]), (name, key)
    ref = diffusers.VQDiffusionPipeline.from_pretrained(str(tmp_path / "diff"))
    cond = torch.cat([ours.null_embeddings(2), ours.encode_prompt(["a red cat", "dog"])])
    torch.testing.assert_close(
        ref.learned_classifier_free_sampling_embeddings.embeddings, ours.null_condition.embedding
    )
    x_t = torch.cat([_x_t(12, 2)] * 2)
    for step in (T - 1, 3, 0):
        with torch.no_grad():
            theirs = ref.transformer(x_t, encoder_hidden_states=cond, timestep=torch.tensor(step)).sample
            mine = ours.denoiser(x_t, step, cond)
            post_ref = torch.softmax(ref.scheduler.q_posterior(theirs, x_t, torch.tensor(step)), 1)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=2e-5)
        torch.testing.assert_close(
            ours.schedule.posterior_log_probs(mine, x_t, step).exp(), post_ref, rtol=0, atol=2e-5
        )


# ---------------------------------------------------------------------------------------------------
# Class-conditional (ImageNet) with a separate, remapped taming VQGAN
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [5, 4], ids=["learnable_null", "pretrained_mean_null"])
def test_class_checkpoint_matches_the_authors_computation(tmp_path, rows: int) -> None:
    gen = torch.Generator().manual_seed(10 + rows)
    K, full, classes = 12, 20, 4
    raw = transformer_state("class", K, gen, classes=rows, grid=8)  # content_emb spatial 8 x 8 > the 4 x 4 grid
    ckpt = save_checkpoint(tmp_path / "imagenet.pth", raw, ema_of(raw, gen))
    yaml_path = write_yaml(
        tmp_path / "imagenet.yaml", "class", K, codec="taming_gumbel_vqvae.TamingVQVAE", classes=classes, grid=8
    )
    vq = taming_state(full, gen, quantizer="vq")
    vq_file = {"state_dict": {**vq, "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}, "global_step": 7}
    torch.save(vq_file, tmp_path / "vqgan_imagenet_f16_16384.pth")
    full_to_used = torch.tensor(
        [0, 0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0, 0, 3, 1]
    )  # first codes: 0 2 3 5 ...
    torch.save(full_to_used, tmp_path / "taming_vqvae_12.pt")
    conv = convert_authors_checkpoint(
        ckpt, yaml_path, vqvae=tmp_path / "vqgan_imagenet_f16_16384.pth", codes_map=tmp_path / "taming_vqvae_12.pt"
    )
    pipe = conv.pipeline
    ema = torch.load(ckpt, weights_only=True)["ema"]
    assert pipe.condition_kind == "class" and pipe.num_class_labels == classes and pipe.null_class_label == classes
    x_t, t = _x_t(K, 4), torch.tensor([0, 5, 9, 2])
    labels = torch.tensor([0, 3, 1, classes])  # the last one is the null class
    with torch.no_grad():
        ours = pipe.denoiser(x_t, t, labels)
    want = torch.cat([ref_logits(ema, x_t[i : i + 1], t[i : i + 1], labels[i : i + 1], "class") for i in range(4)])
    torch.testing.assert_close(ours, want, rtol=0, atol=2e-4)
    assert conv.record["null"] == ("learned class" if rows == classes + 1 else "mean of the class rows")
    # decoding goes through the first full code of each token
    tokens = torch.randint(0, K, (2, SIDE, SIDE), generator=torch.Generator().manual_seed(5))
    first = torch.tensor([0, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15])
    z = vq["quantize.embedding.weight"][first[tokens]].permute(0, 3, 1, 2)
    torch.testing.assert_close(pipe.decode(tokens), ref_decode(vq, z), rtol=0, atol=1e-5)
    assert "training loss (discriminator / perceptual network)" in conv.record["ignored"]["vqvae"]
    # sampling with guidance through the pipeline; our layout round trip; no diffusers export
    out = pipe(
        [1, 2],
        num_inference_steps=3,
        guidance_scale=1.5,
        output_type="tokens",
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.tokens.shape == (2, SIDE, SIDE) and int(out.tokens.max()) < K
    write_authors_conversion(conv, tmp_path / "ours")
    back = VQDiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert back.null_class_label == classes
    assert main(["info", str(tmp_path / "ours")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(back.denoiser(x_t, t, labels), ours, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="class-conditional"):
        write_authors_conversion(conv, tmp_path / "diff", to="diffusers")
    with pytest.raises(ValueError, match="class labels"):
        pipe([classes], num_inference_steps=1, output_type="tokens", progress=False)


# ---------------------------------------------------------------------------------------------------
# Unconditional (FFHQ) with taming's Net2NetTransformer file; Gumbel VQ
# ---------------------------------------------------------------------------------------------------
def test_unconditional_checkpoint_with_ffhq_vqgan_file(tmp_path) -> None:
    gen = torch.Generator().manual_seed(20)
    K = 16
    raw = transformer_state("none", K, gen, grid=8)
    ckpt = save_checkpoint(tmp_path / "ffhq.pth", raw, ema_of(raw, gen))
    yaml_path = write_yaml(tmp_path / "ffhq.yaml", "none", K, codec="taming_gumbel_vqvae.TamingFFHQVQVAE", grid=8)
    text = yaml_path.read_text().replace(f"quantize_number: {K}", "quantize_number: 0")
    yaml_path.write_text(text)
    vq = taming_state(K, gen, quantizer="vq")
    net2net = {f"first_stage_model.{k}": v for k, v in vq.items()}
    net2net["transformer.tok_emb.weight"] = torch.zeros(K, 8)
    torch.save({"state_dict": net2net}, tmp_path / "vqgan_ffhq_f16_1024.pth")
    conv = convert_authors_checkpoint(ckpt, yaml_path, vqvae=tmp_path / "vqgan_ffhq_f16_1024.pth")
    pipe = conv.pipeline
    ema = torch.load(ckpt, weights_only=True)["ema"]
    x_t, t = _x_t(K, 2), torch.tensor([T - 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(pipe.denoiser(x_t, t), ref_logits(ema, x_t, t, None, "none"), rtol=0, atol=2e-4)
    tokens = sample_tokens(
        guided_predictor(pipe.denoiser, None, None, 1.0),
        pipe.schedule,
        2,
        SIDE * SIDE,
        SamplingOptions(num_inference_steps=3, guidance_scale=1.0),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    images = pipe.decode(tokens.view(2, SIDE, SIDE))
    assert images.shape == (2, 3, 8, 8)
    write_authors_conversion(conv, tmp_path / "ours")
    loaded = VQDiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert loaded.condition_kind == "none"
    # the pipeline call: prompt None, same tokens as the loop above with the same generator
    out = loaded(None, num_inference_steps=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt", progress=False)  # fmt: skip
    assert torch.equal(out.tokens.view(2, -1), tokens) and out.images.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        loaded("a face", num_inference_steps=3, progress=False)
    with pytest.raises(ValueError, match="guidance"):
        loaded(None, num_inference_steps=3, guidance_scale=3.0, progress=False)
    with pytest.raises(ConfigError, match="unconditional"):
        write_authors_conversion(conv, tmp_path / "diff", to="diffusers")


def test_gumbel_vqgan_decodes_exactly(tmp_path, text_files) -> None:
    files, raw, ema, _ = text_files
    gen = torch.Generator().manual_seed(30)
    full = 20
    vq = taming_state(full, gen, quantizer="gumbel")
    torch.save({"state_dict": vq}, tmp_path / "taming_f8_8192_openimages_last.pth")
    torch.save(torch.arange(full) % 12, tmp_path / "taming_vqvae_12.pt")
    yaml_path = write_yaml(tmp_path / "config_text.yaml", "text", 12, codec="taming_gumbel_vqvae.TamingGumbelVQVAE")
    conv = convert_authors_checkpoint(
        files["ckpt"],
        yaml_path,
        vqvae=tmp_path / "taming_f8_8192_openimages_last.pth",
        codes_map=tmp_path / "taming_vqvae_12.pt",
        tokenizer=files["bpe"],
    )
    tokens = torch.randint(0, 12, (1, SIDE, SIDE), generator=torch.Generator().manual_seed(6))
    z = vq["quantize.embed.weight"][tokens].permute(0, 3, 1, 2)  # tokens 0..11 -> first full codes 0..11
    torch.testing.assert_close(conv.pipeline.decode(tokens), ref_decode(vq, z), rtol=0, atol=1e-5)
    assert any("Gumbel" in reason for reason in conv.record["ignored"]["vqvae"])
    assert conv.record["ignored"]["checkpoint"]["tokenizer copy in the checkpoint (replaced by --vqvae)"]["count"] > 0
    assert (conv.pipeline.defaults.guidance_scale, conv.pipeline.defaults.truncation_rate) == (3.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Errors and safety
# ---------------------------------------------------------------------------------------------------
def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def test_mismatches_stop_with_the_key_and_shapes(text_files, tmp_path) -> None:
    files, _, _, _ = text_files
    bpe, yaml_path = files["bpe"], files["yaml"]

    def extra(ck):
        ck["ema"]["transformer.blocks.0.attn1.rotary"] = torch.zeros(3)

    with pytest.raises(ConversionError, match=r"transformer\.blocks\.0\.attn1\.rotary"):
        convert_authors_checkpoint(_edit_checkpoint(files["ckpt"], tmp_path / "a.pth", extra), yaml_path, tokenizer=bpe)

    def missing(ck):
        del ck["ema"]["transformer.blocks.1.ln2.bias"]

    with pytest.raises(ConversionError, match=r"missing.*transformer\.blocks\.1\.ln2\.bias"):
        convert_authors_checkpoint(
            _edit_checkpoint(files["ckpt"], tmp_path / "b.pth", missing), yaml_path, tokenizer=bpe
        )

    def shape(ck):
        ck["ema"]["transformer.blocks.0.mlp.0.weight"] = torch.zeros(4 * DIM, DIM + 1)

    with pytest.raises(ConversionError, match=r"mlp\.0\.weight.*\(128, 33\) vs expected \(128, 32\)"):
        convert_authors_checkpoint(_edit_checkpoint(files["ckpt"], tmp_path / "c.pth", shape), yaml_path, tokenizer=bpe)

    def top(ck):
        ck["amp_scaler"] = {"scale": torch.tensor(1.0)}

    with pytest.raises(ConversionError, match="amp_scaler"):
        convert_authors_checkpoint(_edit_checkpoint(files["ckpt"], tmp_path / "d.pth", top), yaml_path, tokenizer=bpe)
    # a config that does not match the checkpoint: more layers, other T
    three = write_yaml(tmp_path / "three.yaml", "text", 12, codec="ema_vqvae.PatchVQVAE", n_layer=3)
    with pytest.raises(ConversionError, match=r"transformer\.blocks\.2\."):
        convert_authors_checkpoint(files["ckpt"], three, tokenizer=bpe)
    steps = tmp_path / "steps.yaml"
    steps.write_text(yaml_path.read_text().replace(f"diffusion_step: {T}", "diffusion_step: 12"))
    with pytest.raises(ConversionError, match=r"log_cumprod_at has shape \(11,\).*T=12"):
        convert_authors_checkpoint(files["ckpt"], steps, tokenizer=bpe)
    with pytest.raises(ValueError, match="--tokenizer"):
        convert_authors_checkpoint(files["ckpt"], yaml_path)


class _Opaque:
    """A non-tensor object in a checkpoint (like an optimizer wrapper); unpickling it must run nothing."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Opaque.ran = True
    return None


def test_non_tensor_objects_are_never_executed(text_files, tmp_path, caplog) -> None:
    files, _, _, _ = text_files

    def add(ck):
        ck["clip_grad_norm"] = _Opaque()

    path = _edit_checkpoint(files["ckpt"], tmp_path / "objects.pth", add)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    conv = convert_authors_checkpoint(path, files["yaml"], tokenizer=files["bpe"])
    assert not _Opaque.ran
    assert "placeholders" in caplog.text and "_mark_ran" in caplog.text
    assert conv.record["ignored"]["checkpoint"]["gradient-clipping state"]["count"] == 1


def test_cli_converts_an_authors_checkpoint(text_files, tmp_path, capsys) -> None:
    files, _, _, _ = text_files
    out = tmp_path / "converted"
    assert (
        main(
            ["convert", str(files["ckpt"]), str(out), "--config", str(files["yaml"]), "--tokenizer", str(files["bpe"])]
        )
        == 0
    )
    assert (out / "vqdiffusion.json").is_file() and (out / "authors_source.json").is_file()
    capsys.readouterr()
    assert main(["convert", str(files["ckpt"]), str(tmp_path / "other")]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["convert", str(out), str(tmp_path / "again"), "--no-ema"]) == 2
    assert "only apply to an authors' checkpoint" in capsys.readouterr().err
