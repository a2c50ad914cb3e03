"""vqdiffusion: VQ-Diffusion and Improved VQ-Diffusion for text-to-image synthesis."""

__version__ = "0.1.0"
