"""megadalle: train DALL-E-style text-to-image models (discrete VAE + sparse transformer)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from megadalle import Pipeline` without importing torch & co. for `import megadalle`.
    if name == "Pipeline":
        from megadalle.generate.api import Pipeline

        return Pipeline
    raise AttributeError(f"module 'megadalle' has no attribute {name!r}")
