"""STEP (SuperToken and Early-Pruning) for semantic segmentation with plain ViTs."""

__version__ = "0.1.0"
