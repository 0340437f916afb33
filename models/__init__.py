"""Model registry: configs name a model (``model.name``) and its constructor params (``model.params``).

Every model takes a batch dict and returns a dict of named tensors (no loss inside: losses live in
utils/losses.py, so inference never needs targets).
"""

from utils.registry import Registry

MODELS = Registry("model")

# Importing the modules registers their models.
from models import fracture_seq, patient_head, vertebra  # noqa: E402,F401


def build_model(cfg):
    """The model named by ``cfg.model.name`` built with ``cfg.model.params``.

    ``in_chans`` is taken from the dataset params when the dataset declares it, so the number of
    stacked slices is configured once and really reaches the timm backbone.
    """
    extra = {}
    if "in_chans" in cfg["dataset"]["params"]:
        extra["in_chans"] = cfg["dataset"]["params"]["in_chans"]
    return MODELS.build(cfg["model"]["name"], cfg["model"]["params"], **extra)
