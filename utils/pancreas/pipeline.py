"""The pancreas pipeline as the generic entry points see it (imported by utils.registry.load_pipeline)."""

from __future__ import annotations

from utils.pancreas.convert import main as convert_main
from utils.pancreas.folds import fold_inputs
from utils.pancreas.layout import ID
from utils.registry import PIPELINES, Pipeline

PIPELINE = PIPELINES.register("pancreas")(
    Pipeline(name="pancreas", id_col=ID, fold_inputs=fold_inputs, preprocess=convert_main)
)
