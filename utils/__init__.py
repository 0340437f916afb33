"""Shared building blocks: config, paths, data readers, preprocessing, folds, metric, I/O."""
