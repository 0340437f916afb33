"""The pancreas pipeline as the generic entry points see it (utils/registry.load_pipeline).

No torch stage: nnU-Net trains and predicts through its own CLI with our trainers
(models/nnunet_trainers/pancreas_multitask.py); report.py and submit.py are its steps.
"""

from __future__ import annotations

from utils.pancreas import folds, layout, preprocess
from utils.registry import PIPELINES, Pipeline

PIPELINE = PIPELINES.register("pancreas")(
    Pipeline(
        name="pancreas", id_col=layout.ID, fold_inputs=folds.fold_inputs, preprocess=preprocess.run
    )
)
