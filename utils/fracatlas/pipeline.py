"""The FracAtlas pipeline as the generic entry points see it (imported by utils.registry.load_pipeline).

Importing this module registers the FracAtlas dataset, loss and classifier model.
"""

from __future__ import annotations

from utils.fracatlas.folds import fold_inputs
from utils.fracatlas.layout import ID
from utils.fracatlas.preprocess import main as preprocess_main
from utils.registry import PIPELINES, Pipeline

PIPELINE = PIPELINES.register("fracatlas")(
    Pipeline(name="fracatlas", id_col=ID, fold_inputs=fold_inputs, preprocess=preprocess_main)
)
