"""HipMRI as the generic entry points see it (utils/registry.load_pipeline imports this module).

Importing it registers the slice dataset, its loss and the UNet.
"""

from __future__ import annotations

import models.hipmri  # noqa: F401  (registers the model)
from utils.hipmri import datasets, folds, layout, losses, preprocess, submit  # noqa: F401
from utils.registry import PIPELINES, Pipeline

PIPELINE = PIPELINES.register("hipmri")(
    Pipeline(
        name="hipmri",
        id_col=layout.ID,
        fold_inputs=folds.fold_inputs,
        preprocess=preprocess.run,
        train_folds=folds.train_folds,
        test=submit.test_chain,
    )
)
