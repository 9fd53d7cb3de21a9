"""Stage 1: the discrete VAE (model, objective, schedules, weights on disk, OpenAI import)."""

from megadalle.dvae.io import load_dvae, save_dvae
from megadalle.dvae.model import DiscreteVAE

__all__ = ["DiscreteVAE", "load_dvae", "save_dvae"]
