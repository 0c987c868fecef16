"""lmprune: train LLaMA-style decoders and prune them during or after training."""

__version__ = "0.1.0"
