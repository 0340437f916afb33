"""RSNA 2022 as the generic entry points see it (utils/registry.load_pipeline imports this module).

Importing it registers the RSNA datasets, losses and models.
"""

from __future__ import annotations

import models.rsna  # noqa: F401  (registers the models)
from utils.registry import PIPELINES, Pipeline
from utils.rsna import datasets, folds, losses, preprocess, report, submit  # noqa: F401
from utils.rsna.metric import UID

PIPELINE = PIPELINES.register("rsna")(
    Pipeline(
        name="rsna",
        id_col=UID,
        fold_inputs=folds.fold_inputs,
        preprocess=preprocess.run,
        after_oof=report.after_oof,
        test=submit.submit,
    )
)
