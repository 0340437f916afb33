"""RSNA 2022 models: stage 1 (vertebra box + ratios), stage 2 (fracture sequence), patient head."""

from models.rsna import fracture_seq, patient_head, vertebra  # noqa: F401  (registers the models)
