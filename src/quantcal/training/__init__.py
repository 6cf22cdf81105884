"""Data and training: datasets and splits, which images each stage reads, the training loop
and its objectives."""
