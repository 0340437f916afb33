"""Tiny-budget trainers for smoke tests and CI on CPU (learn almost nothing; nnU-Net's own
``nnUNetTrainer_Xepochs`` still run 250 iterations per epoch, minutes each on 2 cores)."""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerSmoke(nnUNetTrainer):
    """2 epochs x 4 training / 2 validation iterations: checks that a dataset trains end to end."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008  (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2
