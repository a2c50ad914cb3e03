"""The memory a sampling run needs per image, derived from the model configs in one place, next to the
networks it describes (the pipeline plans its batches with it: :meth:`VQDiffusionPipeline.plan_batches`).

The counts are rough upper estimates in float32 elements, checked against the tensors a real forward pass
makes (tests/test_memory.py).
"""

from __future__ import annotations

from .denoiser import DenoiserConfig
from .uvit import UVitConfig
from .vqvae import VQVAEConfig

FLOAT_BYTES = 4
TOKEN_BYTES = 8  # int64 token ids


def denoiser_activation_elements(config: DenoiserConfig, context_length: int) -> int:
    """Elements live during one denoiser forward pass of one image (N = h * w positions, D = dim): about
    eight [N, D] residual-stream tensors (input, norms, attention outputs), two [N, W] MLP hidden tensors
    (W = max(D, D * mlp_ratio)), the self- and cross-attention maps 2 H N (N + L) (L = ``context_length``)
    and the [N, K] output logits."""
    n = config.height * config.width
    hidden = max(config.dim, int(config.dim * config.mlp_ratio))
    attention = 2 * config.num_heads * n * (n + context_length)
    return 8 * n * config.dim + 2 * n * hidden + attention + n * config.num_classes


def uvit_activation_elements(config: UVitConfig, context_length: int) -> int:
    """Elements live during one aMUSEd U-ViT forward pass of one image: the same counts as
    :func:`denoiser_activation_elements` at the transformer's grid (halved per side with ``downsample``),
    plus eight [N, C] maps of the conv stages and two [N, K] float32 logit tensors at the full grid."""
    n_full = config.height * config.width
    n = n_full // 4 if config.downsample else n_full
    attention = 2 * config.num_attention_heads * n * (n + context_length)
    stages = 8 * n_full * config.block_out_channels
    transformer = 8 * n * config.hidden_size + 2 * n * config.intermediate_size + attention
    return transformer + stages + 2 * n_full * config.num_classes


def decoder_activation_elements(config: VQVAEConfig, token_shape: tuple[int, int]) -> int:
    """Elements of the VQ decoder's full-resolution activations for one image: about six feature maps of its
    widest block (C = max(block_out_channels)) at the output size H x W."""
    height = token_shape[0] * config.downsample_factor
    width = token_shape[1] * config.downsample_factor
    return 6 * max(config.block_out_channels) * height * width


def step_elements(config: DenoiserConfig) -> int:
    """Elements of one sampling step's [K + 1, N] float32 tensors (log-probabilities, posterior, noise): eight."""
    return 8 * (config.num_classes + 1) * config.height * config.width


def sampling_memory_per_image(
    denoiser: DenoiserConfig | UVitConfig,
    vqvae: VQVAEConfig,
    context_length: int,
    output_type: str = "pil",
    guidance: bool = True,
) -> tuple[int, int]:
    """Rough upper estimates, in bytes per image: (working memory of one reverse-chain run and its decoding,
    the results kept until the call returns).

    Working memory counts one step's tensors (:func:`step_elements`), the denoiser's activations (twice with
    guidance: the null condition runs in the same batch) and the VQ decoder's; results are the tokens plus
    the images of ``output_type`` ("pil": uint8, "np" / "pt": float32, "tokens": none).
    """
    passes = 2 if guidance else 1
    model_elements = uvit_activation_elements if isinstance(denoiser, UVitConfig) else denoiser_activation_elements
    token_shape = (denoiser.height, denoiser.width)
    working = FLOAT_BYTES * (
        step_elements(denoiser)
        + passes * model_elements(denoiser, context_length)
        + decoder_activation_elements(vqvae, token_shape)
    )
    pixels = 3 * token_shape[0] * token_shape[1] * vqvae.downsample_factor**2
    images = {"pil": pixels, "np": FLOAT_BYTES * pixels, "pt": FLOAT_BYTES * pixels, "tokens": 0}[output_type]
    return working, TOKEN_BYTES * token_shape[0] * token_shape[1] + images
