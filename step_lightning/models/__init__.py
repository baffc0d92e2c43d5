"""Segmenters: ViT encoder, tokenizers, ATM heads, early exit, loss, inference, factory and checkpoints."""
