"""The HipMRI pipeline as the generic entry points see it (imported by utils.registry.load_pipeline).

Importing this module registers the HipMRI dataset, loss and model.
"""

from __future__ import annotations

import models.hipmri  # noqa: F401  (registers the models)
from utils.hipmri import datasets, losses  # noqa: F401  (register the dataset and loss)
from utils.hipmri.folds import fold_inputs
from utils.hipmri.layout import ID
from utils.hipmri.preprocess import main as preprocess_main
from utils.hipmri.report import test_chain
from utils.registry import PIPELINES, Pipeline

PIPELINE = PIPELINES.register("hipmri")(
    Pipeline(
        name="hipmri",
        id_col=ID,
        fold_inputs=fold_inputs,
        preprocess=preprocess_main,
        test=test_chain,
    )
)
