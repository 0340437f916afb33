"""Train-time augmentation every image stage builds from: one albumentations pipeline whose
strengths each stage sets (a stage's own function says why its numbers are what they are).

Order: [horizontal flip], affine warp, brightness/contrast, [gamma], noise, [blur]; all ranges
scale with ``strength`` (0 = off). Deterministic per sample: the caller seeds the pipeline with
``set_random_seed`` from the dataset's per-row random stream.
"""

from __future__ import annotations

import albumentations as A
import cv2


def augmentation(
    strength: float,
    *,
    rotate: float,
    translate: float,
    contrast: float,
    noise: float,
    flip: bool = True,
    p_affine: float = 0.7,
    replicate_border: bool = False,
    linear_mask: bool = False,
    acquisition: bool = False,
    bboxes: bool = False,
) -> A.Compose:
    """The pipeline at ``strength``.

    ``rotate`` (degrees), ``translate`` (share of the side), ``contrast`` (brightness and contrast
    limit) and ``noise`` (std as a share of the range) are the values at strength 1; the scale
    range is always 1 +- 0.1 * strength. ``replicate_border``: fill warped-in edges from the image
    (else 0); ``linear_mask``: a ``mask`` that is a probability map is warped with linear
    interpolation (else nearest: labels); ``acquisition``: gamma and blur too (scanner looks);
    ``bboxes``: boxes in albumentations format travel with the image (``box_labels`` field).
    """
    border = {"border_mode": cv2.BORDER_REPLICATE if replicate_border else cv2.BORDER_CONSTANT}
    if linear_mask:
        border["mask_interpolation"] = cv2.INTER_LINEAR
    ops = [A.HorizontalFlip(p=0.5)] if flip else []
    ops.append(
        A.Affine(
            scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
            translate_percent=(-translate * strength, translate * strength),
            rotate=(-rotate * strength, rotate * strength),
            p=p_affine,
            **border,
        )
    )
    ops.append(A.RandomBrightnessContrast(contrast * strength, contrast * strength, p=0.5))
    if acquisition:
        ops.append(A.RandomGamma((100 - 20 * strength, 100 + 20 * strength), p=0.3))
    ops.append(A.GaussNoise(std_range=(0.0, noise * strength), p=0.3))
    if acquisition:
        ops.append(A.GaussianBlur(sigma_limit=(0.1, 0.1 + 0.8 * strength), p=0.2))  # px
    bbox = (
        A.BboxParams(format="albumentations", label_fields=["box_labels"], clip=True)
        if bboxes
        else None
    )
    return A.Compose(ops, bbox_params=bbox, seed=0)
