"""megadalle: train DALL-E-style text-to-image models (discrete VAE + sparse transformer)."""

__version__ = "0.1.0"
