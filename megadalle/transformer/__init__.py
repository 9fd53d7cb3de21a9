"""Stage 2: the sparse transformer over text + image tokens, its masks, backends and sampler."""

from megadalle.transformer.model import DALLETransformer, count_parameters, default_resblock_runner
from megadalle.transformer.sampling import generate

__all__ = ["DALLETransformer", "count_parameters", "default_resblock_runner", "generate"]
