"""FracAtlas demo trainer: a short nnU-Net schedule for the CPU demo (the full recipe uses the
stock ``nnUNetTrainer``)."""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_FracAtlasDemo(nnUNetTrainer):
    """15 epochs x 24 training / 2 validation iterations, initial lr 0.02 (PolyLR decays it).

    About 3 min per fold at 112 x 128 px patches (batch 7, 0.45 s / iteration) on 2 CPU cores:
    far from converged (nnU-Net's default is 1000 epochs x 250 iterations).
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
        self.num_epochs = 15
        self.num_iterations_per_epoch = 24
        self.num_val_iterations_per_epoch = 2
        self.initial_lr = 2e-2
