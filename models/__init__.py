"""Models, one sub-package per pipeline (``models/<pipeline>/``) plus the shared encoder.

Configs name a model (``model.name``, registered in ``utils.registry.MODELS``) and its
constructor params (``model.params``); ``utils.registry.build_model(cfg)`` builds it. Every
model takes a batch dict and returns a dict of named tensors (no loss inside: losses live in
``utils/<pipeline>/losses.py``, so inference never needs targets).
"""
