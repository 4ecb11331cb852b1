"""respmotion: respiratory motion synthesis from CT with latent diffusion."""

__version__ = "0.1.0"
