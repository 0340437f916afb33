"""The RSNA 2022 pipeline as the generic entry points see it (imported by utils.registry.load_pipeline).

Importing this module registers the RSNA datasets, losses and models.
"""

from __future__ import annotations

import models.rsna  # noqa: F401  (registers the models)
from utils.registry import PIPELINES, Pipeline
from utils.rsna import chain, datasets, losses  # noqa: F401  (register datasets and losses)
from utils.rsna.folds import fold_inputs
from utils.rsna.metric import UID
from utils.rsna.preprocess import main as preprocess_main

PIPELINE = PIPELINES.register("rsna")(
    Pipeline(
        name="rsna",
        id_col=UID,
        fold_inputs=fold_inputs,
        preprocess=preprocess_main,
        after_oof=chain.after_oof,
        test=chain.submit,
    )
)
