"""Text-to-image generation around the transformer's KV-cached sampler: batching, dVAE
decoding, reranking, and writing images, grids and a JSON report (`megadalle sample`)."""
