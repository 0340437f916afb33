"""Pancreas multi-task pipeline: nnU-Net segmentation (pancreas, lesion) + lesion-subtype classification."""
