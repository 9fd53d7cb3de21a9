"""The contrastive reranker: model, loss, reranking, and the optional open_clip loader."""
