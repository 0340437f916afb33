"""FracAtlas models: the fracture classifier (plain or mask-guided, by its input channels)."""

from models.fracatlas import classifier  # noqa: F401  (registers the models)
