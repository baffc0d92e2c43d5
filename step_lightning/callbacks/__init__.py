"""Lightning callbacks and plugins used by the training entry point."""
