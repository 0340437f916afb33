"""FracAtlas demo trainer: a short nnU-Net schedule for the CPU demo (the full recipe uses the
stock ``nnUNetTrainer``)."""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_FracAtlasDemo(nnUNetTrainer):
    """16 epochs x 24 training / 4 validation iterations, initial lr 0.02 (PolyLR decays it).

    About 2.5 min per fold at 160x128 px on 2 CPU cores: enough to learn the synthetic breaks
    roughly, far from converged (nnU-Net's default is 1000 x 250 iterations).
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008  (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 16
        self.num_iterations_per_epoch = 24
        self.num_val_iterations_per_epoch = 4
        self.initial_lr = 2e-2
