"""Synthetic RSNA 2022 data in the competition's on-disk format, for the demo, tests and benchmarks.

Nothing here runs on real data: ``generator`` draws the demo / test data sets
(``python -m utils.rsna.synthetic``), ``writers`` writes DICOM CT slices and segmentation NIfTI
files the way the competition stores them.
"""
