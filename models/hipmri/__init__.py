"""HipMRI models: a 2D UNet for the 6-class pelvis segmentation."""

from models.hipmri import unet  # noqa: F401  (registers the models)
