"""The FracAtlas pipeline as the generic entry points see it (imported by utils.registry.load_pipeline).

Importing this module registers the FracAtlas dataset, loss and classifier model.
"""

from __future__ import annotations

import models.fracatlas  # noqa: F401  (registers the model)
from utils.fracatlas import datasets, losses  # noqa: F401  (register the dataset and loss)
from utils.fracatlas.folds import fold_inputs
from utils.fracatlas.layout import ID
from utils.fracatlas.preprocess import main as preprocess_main
from utils.fracatlas.report import after_oof
from utils.registry import PIPELINES, Pipeline

PIPELINE = PIPELINES.register("fracatlas")(
    Pipeline(
        name="fracatlas",
        id_col=ID,
        fold_inputs=fold_inputs,
        preprocess=preprocess_main,
        after_oof=after_oof,
    )
)
