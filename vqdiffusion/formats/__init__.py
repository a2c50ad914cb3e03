"""Model folders on disk: one module per layout, each reading into and writing from
:class:`~vqdiffusion.formats.components.PipelineComponents` (ours: :mod:`~vqdiffusion.formats.ours`; diffusers':
:mod:`~vqdiffusion.formats.diffusers` with the key maps :mod:`~vqdiffusion.formats.diffusers_vqvae` and
:mod:`~vqdiffusion.formats.diffusers_denoiser`; generic key-map helpers: :mod:`~vqdiffusion.formats.keymap`).
aMUSEd checkpoints in diffusers' layout: :mod:`~vqdiffusion.formats.amused`, read into its ``AmusedComponents``."""
