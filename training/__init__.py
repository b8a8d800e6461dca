"""Training package: the model (``training.model``), metrics, losses, data, loops and export."""
