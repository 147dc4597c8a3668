"""medsd: Medical Stable Diffusion as a Ray-distributed batch synthesis service."""

__version__ = "0.1.0"
