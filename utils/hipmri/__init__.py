"""HipMRI 2D slice segmentation (6 pelvic classes): layout, conversion, data, losses, reports."""
