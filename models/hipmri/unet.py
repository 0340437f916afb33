"""2D UNet for HipMRI slices: nnU-Net's ``PlainConvUNet`` (dynamic_network_architectures)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from utils.hipmri.metric import CLASSES
from utils.registry import MODELS

NORMS = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}


@MODELS.register("hipmri_unet")
class HipUNet(nn.Module):
    """``image`` (B, in_chans, H, W) -> ``logits`` (B, 6, H, W); H and W divisible by 2**(stages-1).

    ``features``: channels per resolution stage (its length is the number of stages, each
    halving the resolution); ``n_conv``: 3x3 conv-norm-LeakyReLU blocks per stage (encoder and
    decoder); ``norm``: ``batch`` (faster on CPU) or ``instance`` (nnU-Net's choice);
    ``scale``: the UNet runs on the image resized by this factor (area) and its logits are
    resized back (bilinear), so 0.5 costs a quarter of the compute (the CPU demo) and the
    outputs keep the input's size.
    """

    def __init__(
        self,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        n_conv: int = 2,
        norm: str = "batch",
        scale: float = 1.0,
        in_chans: int = 1,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        stages = len(features)
        self.divisor = 2 ** (stages - 1)
        self.scale = scale
        self.net = PlainConvUNet(
            input_channels=in_chans,
            n_stages=stages,
            features_per_stage=list(features),
            conv_op=nn.Conv2d,
            kernel_sizes=3,
            strides=[1] + [2] * (stages - 1),
            n_conv_per_stage=n_conv,
            num_classes=len(CLASSES),
            n_conv_per_stage_decoder=n_conv,
            conv_bias=True,
            norm_op=NORMS[norm],
            norm_op_kwargs={"affine": True},
            nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True},
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        size = image.shape[-2:]
        if self.scale != 1.0:
            image = F.interpolate(image, scale_factor=self.scale, mode="area")
        if image.shape[-2] % self.divisor or image.shape[-1] % self.divisor:
            raise ValueError(
                f"image {tuple(size)} x scale {self.scale} = {tuple(image.shape[-2:])} must be "
                f"divisible by {self.divisor} (dataset.params.image_size, model.params.scale)"
            )
        logits = self.net(image)
        if self.scale != 1.0:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return {"logits": logits}
