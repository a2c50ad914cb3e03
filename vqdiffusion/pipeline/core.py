"""The text-to-image pipeline: condition encoder -> discrete diffusion over VQ tokens -> VQ decoder
(generation, saving and loading; the editing methods come from :class:`~vqdiffusion.pipeline.editing.EditingMixin`,
the options and batching by memory from :class:`~vqdiffusion.pipeline.options.OptionsMixin`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..config import ConfigError, read_json_object
from ..devices import resolve_device
from ..diffusion import Generator, MaskReplaceSchedule, check_generators
from ..editing import DEFAULT_KNOWN_TOKEN_MODE
from ..formats import diffusers as diffusers_format
from ..formats import ours as ours_format
from ..formats.components import PipelineComponents
from ..formats.paths import resolve_model_path
from ..image_outputs import OutputType, join_outputs, to_output_type
from ..models.conditions import CLIPTextCondition, ConditionKind, LearnedNullCondition, check_prompt_text
from ..models.denoiser import Denoiser
from ..models.vqvae import VQVAE
from ..samplers import Sampler
from ..sampling import SamplingOptions, guided_predictor, sample_tokens
from .checks import (
    check_condition,
    check_condition_parts,
    check_dtype,
    check_images_per_prompt,
    decoder_error,
    log_probs_error,
)
from .editing import EditingMixin, EditRows
from .options import OptionsMixin
from .output import PipelineOutput, batch_callback

# Per-model default sampling settings (``defaults.json``), used for every knob a call does not give.
PipelineDefaults = SamplingOptions


class VQDiffusionPipeline(EditingMixin, OptionsMixin):
    """VQ-Diffusion text-to-image sampling (Gu et al. 2022; Tang et al. 2022).

    Components: ``vqvae`` (tokens <-> pixels), ``denoiser`` ((x_t, t, cond) -> log p(x0)), ``schedule``
    (the mask-and-replace process and its posterior), ``text_encoder`` (CLIP text condition) and
    ``null_condition`` (the learned null text for classifier-free guidance; None means the encoding of
    the empty prompt is used, as diffusers does for non-learnable models).

    Class-conditional models (the authors' ImageNet transformer) have no text encoder: their "prompts" are
    integer class labels, embedded inside the denoiser, and ``null_class_label`` (the last label row, if
    the model has one) is the unconditional input of guidance.  Unconditional models (FFHQ) have neither.

    :meth:`from_pretrained` also reads the other model kinds, returning the subclass that handles them
    (:class:`~vqdiffusion.pipeline.amused.AmusedPipeline` for aMUSEd folders, a time-agnostic masked model).
    """

    # The pipelines of other model kinds by the ``_class_name`` of the diffusers index they read (a subclass
    # that sets ``index_class_name`` registers itself, so this module imports none of them).
    index_class_name: ClassVar[str | None] = None
    _kinds: ClassVar[dict[str, type[VQDiffusionPipeline]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.index_class_name is not None:
            VQDiffusionPipeline._kinds[cls.index_class_name] = cls

    def __init__(
        self,
        *,
        vqvae: VQVAE,
        denoiser: Denoiser,
        schedule: MaskReplaceSchedule,
        text_encoder: CLIPTextCondition | None = None,
        null_condition: LearnedNullCondition | None = None,
        defaults: PipelineDefaults | None = None,
        null_class_label: int | None = None,
    ) -> None:
        cfg = denoiser.config
        if schedule.num_classes != cfg.num_classes:
            raise ConfigError(f"schedule has K={schedule.num_classes} but the denoiser has K={cfg.num_classes}")
        if schedule.num_timesteps != cfg.num_timesteps:
            raise ConfigError(
                f"schedule has T={schedule.num_timesteps} but the denoiser embeds {cfg.num_timesteps} steps"
            )
        if vqvae.config.num_embeddings != cfg.num_classes:
            raise ConfigError(
                f"VQ-VAE codebook has {vqvae.config.num_embeddings} entries but the denoiser has K={cfg.num_classes}"
            )
        check_condition_parts(cfg, text_encoder, null_condition, null_class_label)
        if text_encoder is not None and text_encoder.hidden_size != cfg.cond_dim:
            raise ConfigError(f"text encoder width {text_encoder.hidden_size} != denoiser cond_dim {cfg.cond_dim}")
        if null_condition is not None and tuple(null_condition.embedding.shape) != (
            text_encoder.max_length,
            text_encoder.hidden_size,
        ):
            raise ConfigError(
                f"null condition has shape {tuple(null_condition.embedding.shape)}, expected "
                f"({text_encoder.max_length}, {text_encoder.hidden_size})"
            )
        self.vqvae = vqvae.eval()
        self.denoiser = denoiser.eval()
        self.schedule = schedule
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.null_condition = null_condition.eval() if null_condition is not None else None
        self.null_class_label = null_class_label
        # Without defaults: the library's, with at most T steps (a model of fewer steps gets all of its T).
        self.defaults = defaults or PipelineDefaults(
            num_inference_steps=min(PipelineDefaults.num_inference_steps, schedule.num_timesteps)
        )
        try:
            self.defaults.validate(schedule.num_timesteps)
        except ValueError as err:
            raise ConfigError(f"the default sampling settings do not fit the model: {err}") from None

    # -- device and dtype -------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"vqvae": self.vqvae, "denoiser": self.denoiser}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder
        if self.null_condition is not None:
            out["null_condition"] = self.null_condition
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VQDiffusionPipeline:
        """Move every component; ``dtype`` applies to the denoiser (bf16 sampling keeps log-probs in float32),
        the VQ decoder (float32 for float16 unless its config's ``force_upcast`` is false: ``VQVAE.dtype_for``)
        and the null condition; the text encoder stays in float32 on CPU for exactness unless the device is
        CUDA.  ``device`` is checked first (:func:`vqdiffusion.devices.resolve_device`:
        DeviceError, a ValueError, for a name this machine cannot run on; ``"auto"`` picks CUDA if present),
        and ``dtype`` must be a floating dtype (:data:`~vqdiffusion.pipeline.checks.FLOAT_DTYPES`)."""
        check_dtype(dtype)
        if device is not None:
            device = resolve_device(device)
        for name, module in self.modules().items():
            target_dtype = dtype
            if name == "text_encoder" and dtype is not None and torch.device(device or self.device).type == "cpu":
                target_dtype = None
            if name == "vqvae" and dtype is not None:
                target_dtype = self.vqvae.dtype_for(dtype)
            module.to(device=device, dtype=target_dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # -- conditions -------------------------------------------------------------------------------------
    @property
    def condition_kind(self) -> ConditionKind:
        """The condition kind: "text", "class" (prompts are integer labels) or "none" (unconditional)."""
        return self.denoiser.config.condition_kind

    @property
    def num_class_labels(self) -> int | None:
        """Valid class labels of a class-conditional model, [0, n) (the null label excluded)."""
        labels = self.denoiser.config.num_class_labels
        if labels is None:
            return None
        return labels - (1 if self.null_class_label is not None else 0)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | list[int]) -> torch.Tensor:
        """CLIP text condition [B, L, D] (final layer norm output, L2-normalised per position); for a
        class-conditional model, the integer labels as a [B] long tensor."""
        kind = self.condition_kind
        if kind == ConditionKind.CLASS:
            n = self.num_class_labels
            bad = [p for p in prompts if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n]
            if bad:
                raise ValueError(
                    f"this model is class-conditional: prompts must be class labels in [0, {n}), got {bad[:3]}"
                )
            return torch.tensor(list(prompts), dtype=torch.long, device=self.device)
        if kind == ConditionKind.NONE:
            raise ValueError("this model is unconditional: it takes no prompt (sample with cond=None)")
        check_prompt_text(prompts)
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    @torch.no_grad()
    def null_embeddings(self, batch_size: int) -> torch.Tensor:
        """The unconditional input for guidance [B, L, D]: the learned null text, else the empty prompt;
        for a class-conditional model, the null label [B] (an error if the model has none)."""
        if self.condition_kind == ConditionKind.CLASS:
            if self.null_class_label is None:
                raise ValueError("this class-conditional model has no null class; use guidance_scale=1")
            return torch.full((batch_size,), self.null_class_label, dtype=torch.long, device=self.device)
        if self.null_condition is not None:
            return self.null_condition(batch_size).to(self.device, self.dtype)
        return self.text_encoder.encode_unconditional(batch_size).to(self.device, self.dtype)

    # -- sampling ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | list[int] | None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        truncation_rate: float | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: OutputType = "pil",
        progress: bool = True,
        *,
        sampler: str | Sampler | None = None,
        spacing: str | None = None,
        temperature: float | None = None,
        batch_size: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        **sampler_settings: Any,
    ) -> PipelineOutput:
        """Generate images for ``prompt``: one string or a list (text models), a list of class labels
        (class-conditional models), or None (unconditional models: ``num_images_per_prompt`` images).

        Every sampling knob left at None takes the model's default (``self.defaults``); see
        :class:`~vqdiffusion.sampling.SamplingOptions` for their meaning.

        Args:
            num_inference_steps: 1..T steps (exact skip-step posterior below T).
            guidance_scale: classifier-free guidance scale; 1.0 costs one forward pass per step.
            truncation_rate: keep the most likely classes up to this mass, in (0, 1].
            sampler: a strategy object (``Purity(prior_weight=1.0)``, :mod:`vqdiffusion.samplers`) or the
                name of one in the registry :data:`vqdiffusion.samplers.SAMPLERS`.
            sampler_settings: the chosen strategy's own settings as flat keywords, e.g.
                ``sampler="purity", prior_weight=1.0`` or ``tokens_per_call=8`` (see its class).
            spacing: "uniform" or "quadratic" step indices.
            temperature: temperature of p(x0 | x_t).
            num_images_per_prompt: images per prompt (prompt-major order).
            generator: a ``torch.Generator`` (or one per image) for reproducible sampling.
            output_type: "pil", "np" ([B, H, W, 3] float in [0, 1]), "pt" ([B, 3, H, W] in [0, 1]) or
                "tokens" (no decoding).
            progress: show a progress bar.
            batch_size: images per reverse-chain run (None: all at once, or as many as fit in the device's
                free memory; see :meth:`plan_batches`).  With one ``generator`` the samples depend on it; with
                a list of generators, one per image, they do not.
            callback: called as ``callback(done, total)`` after each sampling step, counted over all batches
                of the call (``total`` = steps x batches), e.g. to drive a progress bar of a user interface.
        """
        given = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "truncation_rate": truncation_rate,
            "sampler": sampler,
            "spacing": spacing,
            "temperature": temperature,
        }
        condition = self._split_condition(sampler_settings)
        given.update(sampler_settings)
        return self._generate(
            prompt, given, num_images_per_prompt, generator, output_type, progress, batch_size, callback,
            condition=condition,
        )  # fmt: skip

    def _generate(
        self,
        prompt: str | list[str] | list[int] | None,
        sampling: dict[str, Any] | SamplingOptions,
        num_images_per_prompt: int,
        generator: Generator,
        output_type: OutputType,
        progress: bool,
        batch_size: int | None,
        callback: Callable[[int, int], None] | None,
        edit: EditRows | None = None,
        condition: dict[str, Any] | None = None,
    ) -> PipelineOutput:
        """:meth:`__call__` with the sampling settings ``sampling`` (the keywords, None = the model's default,
        resolved here by :meth:`call_options`; or the options an editing method resolved already) and, for
        the editing methods, ``edit(rows, options, generator)``: the extra :func:`sample_tokens` keywords
        (known tokens, start state, steps) of the image rows ``rows`` ([b] long) of one chain run; ``condition``:
        the model's extra condition keywords of :meth:`encode_prompt` and :meth:`null_embeddings` (aMUSEd's
        micro-conditions, also taken out of ``sampling`` when it is a dict)."""
        if not isinstance(sampling, SamplingOptions):
            sampling = dict(sampling)
            condition = {**(condition or {}), **self._split_condition(sampling)}
        condition = condition or {}
        unconditional = self.condition_kind == ConditionKind.NONE
        if unconditional and prompt is not None:
            raise ValueError("this model is unconditional: pass prompt=None and num_images_per_prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not unconditional and (not isinstance(prompts, list) or not prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of strings")
        check_prompt_text(prompts)
        check_images_per_prompt(num_images_per_prompt)
        if output_type not in ("pil", "np", "pt", "tokens"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'tokens', got {output_type!r}")
        options = sampling if isinstance(sampling, SamplingOptions) else self.call_options(**sampling)

        batch = num_images_per_prompt * (1 if unconditional else len(prompts))
        check_generators(generator, batch)
        chunks = self.plan_batches(batch, output_type, options.uses_guidance, batch_size)
        encoded = None if unconditional else self.encode_prompt(prompts, **condition)  # [P, ...]: a row per prompt
        check_condition(encoded, self.text_encoder)  # once per call, before any sampling
        per_image = isinstance(generator, (list, tuple))
        cfg = self.denoiser.config
        token_parts, image_parts = [], []
        for chunk_index, (start, stop) in enumerate(chunks):
            n = stop - start
            cond = None
            if encoded is not None:  # prompt-major: row r is prompt r // num_images_per_prompt
                cond = self._condition_rows(encoded, torch.arange(start, stop) // num_images_per_prompt)
            null_cond = self.null_embeddings(n, **condition) if options.uses_guidance else None
            predict = self._predictor(cond, null_cond, options.guidance_scale, not options.sampler.reads_logits)
            rows_generator = generator[start:stop] if per_image else generator
            extra = {} if edit is None else edit(torch.arange(start, stop), options, rows_generator)
            tokens = sample_tokens(
                predict,
                self.schedule,
                n,
                cfg.height * cfg.width,
                options,
                generator=rows_generator,
                device=self.device,
                progress=progress,
                callback=batch_callback(callback, chunk_index, len(chunks)),
                token_shape=(cfg.height, cfg.width),
                time_agnostic=self.time_agnostic,
                non_finite=partial(log_probs_error, self, cond, null_cond, guidance_scale=options.guidance_scale),
                **extra,
            ).view(n, cfg.height, cfg.width)
            token_parts.append(tokens)
            if output_type != "tokens":
                image_parts.append(to_output_type(self.decode(tokens), output_type))
        tokens = token_parts[0] if len(token_parts) == 1 else torch.cat(token_parts)
        if output_type == "tokens":
            return PipelineOutput(images=None, tokens=tokens)
        return PipelineOutput(images=join_outputs(image_parts, output_type), tokens=tokens)

    @property
    def time_agnostic(self) -> bool:
        """The model kind: True for a masked model that predicts x0 from x_t without t (aMUSEd; samplers that
        ``needs_timestep`` are refused), False for a denoiser trained on its schedule's timestep chain."""
        return bool(getattr(self.denoiser, "time_agnostic", False))

    # The model's own condition keywords of a call (aMUSEd's micro-conditions); a VQ-Diffusion model has none.
    condition_keywords: ClassVar[tuple[str, ...]] = ()

    def _split_condition(self, keywords: dict[str, Any]) -> dict[str, Any]:
        """Take the model's own condition keywords (:attr:`condition_keywords`) out of a call's ``keywords``."""
        return {name: keywords.pop(name) for name in self.condition_keywords if name in keywords}

    def condition_settings(self, **given: Any) -> dict[str, Any]:
        """The model's own condition keywords of a call, checked, with its defaults filled in: {} here."""
        if given:
            raise ValueError(f"{', '.join(given)}: this model takes no micro-conditions (aMUSEd models do); drop them")
        return {}

    # The known-token mode of an inpainting call that does not give one (docs/design.md §10.1).
    default_known_tokens: ClassVar[str] = DEFAULT_KNOWN_TOKEN_MODE

    def _condition_rows(self, encoded: Any, rows: torch.Tensor) -> Any:
        """The rows ``rows`` of an :meth:`encode_prompt` result."""
        return encoded[rows.to(encoded.device)]

    def _predictor(
        self, cond: Any, null_cond: Any, guidance_scale: float, normalize: bool = True
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """x_t, t -> guided log p(x0 | x_t) for one chain run (:func:`guided_predictor`; ``normalize=False``:
        the guided logits, for a sampler that reads only their softmax)."""
        return guided_predictor(self.denoiser, cond, null_cond, guidance_scale, normalize)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h, w] tokens -> [B, 3, H, W] float32 images in [0, 1].

        Raises :class:`~vqdiffusion.pipeline.checks.NonFiniteError` (a ValueError naming the VQ-VAE decoder)
        when a pixel is NaN or infinite: one check of the decoded batch, never an image of garbage."""
        images = self.vqvae.decode_tokens(tokens, clamp=False)
        if not bool(torch.isfinite(images).all()):
            raise decoder_error(self.vqvae, images.dtype)
        return ((images.float() + 1) / 2).clamp(0, 1)

    # -- components and persistence -------------------------------------------------------------------
    @property
    def components(self) -> PipelineComponents:
        """The parts of this pipeline (what the model folder readers and writers exchange)."""
        return PipelineComponents(
            vqvae=self.vqvae,
            denoiser=self.denoiser,
            schedule=self.schedule,
            text_encoder=self.text_encoder,
            null_condition=self.null_condition,
            defaults=self.defaults,
            null_class_label=self.null_class_label,
        )

    @classmethod
    def from_components(cls, components: PipelineComponents) -> VQDiffusionPipeline:
        """A pipeline of ``components`` (checked to fit together)."""
        return cls(**{f.name: getattr(components, f.name) for f in dataclasses.fields(components)})

    def save_pretrained(self, path: str | os.PathLike, *, weights_dtype: torch.dtype | None = None) -> None:
        """Write our layout (:func:`vqdiffusion.formats.ours.save_ours`): ``vqdiffusion.json`` index, JSON
        configs and safetensors weights.

        ``weights_dtype`` (e.g. ``torch.float16``) stores the VQ-VAE, denoiser and null-condition floating
        point weights in that dtype (half the size); loading casts them back to the modules' dtype.  The
        text encoder is always stored as it is.
        """
        ours_format.save_ours(self.components, path, weights_dtype=weights_dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        text_pad_token_id: int | None | Literal["auto"] = "auto",
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        variant: str | None = None,
    ) -> VQDiffusionPipeline:
        """Load a model directory: ours (``vqdiffusion.json``) or diffusers' (``model_index.json``), a
        model shipped with the package, ``"builtin:shapes"``, or a Hugging Face Hub id such as
        ``"microsoft/vq-diffusion-ithq"`` (see :func:`resolve_model_path`).

        Hub ids are downloaded into (or, with ``local_files_only`` or ``HF_HUB_OFFLINE=1``, only read from)
        the Hugging Face cache (``cache_dir``, default the user's), at ``revision`` (a branch, tag or commit;
        default ``"main"``; ``"fp16"`` is the published models' half-precision branch), fetching only the
        files the pipeline reads (:func:`vqdiffusion.formats.hub.download_model`).  ``torch_dtype`` is
        diffusers' name for ``dtype``.

        ``text_pad_token_id`` overrides the id that pads prompts after the end-of-text token ("auto":
        what the model was trained with; for a diffusers-layout directory that is the authors' 0, since the
        published models were trained with the authors' tokenizer, not diffusers' ``<|endoftext|>``
        padding; None: the tokenizer's own padding).

        A diffusers index naming another pipeline kind (``AmusedPipeline``: aMUSEd) returns that kind's
        pipeline (:class:`~vqdiffusion.pipeline.amused.AmusedPipeline`); ``variant`` (e.g. ``"fp16"``) then
        prefers its ``<stem>.<variant>.safetensors`` weights.
        """
        dtype = _one_dtype(dtype, torch_dtype)
        if device is not None:
            device = resolve_device(device)  # before anything is read
        root = resolve_model_path(
            path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, variant=variant
        )
        if not root.exists():
            raise FileNotFoundError(f"model directory not found: {root}")
        if not root.is_dir():
            raise ValueError(f"{root} is a file, not a model directory")
        kind = _index_class_name(root)
        if kind in cls._kinds and not (root / ours_format.INDEX_FILE).is_file():
            return cls._kinds[kind].from_folder(root, device=device, dtype=dtype, variant=variant)
        if cls.index_class_name is not None:
            raise ValueError(
                f"{root} is not an {cls.index_class_name} folder; load it with VQDiffusionPipeline.from_pretrained"
            )
        if variant is not None:
            raise ValueError(f"variant={variant!r} applies to aMUSEd folders only; {root} is a VQ-Diffusion model")
        if (root / ours_format.INDEX_FILE).is_file():
            components = ours_format.load_ours(root, text_pad_token_id=text_pad_token_id)
        elif (root / diffusers_format.INDEX_FILE).is_file():
            components = diffusers_format.load_diffusers(root, text_pad_token_id=text_pad_token_id)
        else:
            raise ValueError(
                f"{root} is not a model directory: expected {ours_format.INDEX_FILE} (vqdiffusion layout) or "
                f"{diffusers_format.INDEX_FILE} (diffusers layout)"
            )
        pipe = cls.from_components(components)
        if device is not None or dtype is not None:
            pipe.to(device, dtype)
        return pipe


def _index_class_name(root: os.PathLike) -> str | None:
    """The ``_class_name`` of a diffusers index ``model_index.json`` in ``root`` (None without one)."""
    index = Path(root) / diffusers_format.INDEX_FILE
    if not index.is_file():
        return None
    name = read_json_object(index).get("_class_name")
    return name if isinstance(name, str) else None


def _one_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` or its diffusers spelling ``torch_dtype`` (ValueError if both are given and differ, or if one
    is not a floating dtype the pipeline runs in)."""
    for name, value in (("dtype", dtype), ("torch_dtype", torch_dtype)):
        check_dtype(value, name)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them (they are the same)")
    return dtype if dtype is not None else torch_dtype
