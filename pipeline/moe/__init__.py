"""The transformers side: loading checkpoints, finding a model's routers, the table of supported families."""
