"""FracAtlas as the generic entry points see it (utils/registry.load_pipeline imports this module).

Importing it registers the image dataset, its loss and the classifier model; the nnU-Net stage
runs through nnU-Net's own CLI (utils/nnunet.py, utils/fracatlas/segment.py).
"""

from __future__ import annotations

import models.fracatlas  # noqa: F401  (registers the model)
from utils.fracatlas import datasets, folds, layout, losses, preprocess, report  # noqa: F401
from utils.registry import PIPELINES, Pipeline

PIPELINE = PIPELINES.register("fracatlas")(
    Pipeline(
        name="fracatlas",
        id_col=layout.ID,
        fold_inputs=folds.fold_inputs,
        preprocess=preprocess.run,
        after_oof=report.after_oof,
    )
)
