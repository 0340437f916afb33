"""Short-schedule trainers for CPU demos, smoke tests and CI: nnU-Net's own
``nnUNetTrainer_Xepochs`` still run 250 iterations per epoch (minutes each on a CPU).

Each trainer is one line of constants on :class:`nnUNetTrainerShort`.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerShort(nnUNetTrainer):
    """nnU-Net's trainer with the schedule set by class constants (the lr still decays by PolyLR)."""

    EPOCHS = 10
    ITERATIONS = 25  # training iterations per epoch
    VAL_ITERATIONS = 5  # validation iterations per epoch
    INITIAL_LR: float | None = None  # None: nnU-Net's 1e-2

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008  (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.EPOCHS
        self.num_iterations_per_epoch = self.ITERATIONS
        self.num_val_iterations_per_epoch = self.VAL_ITERATIONS
        if self.INITIAL_LR is not None:
            self.initial_lr = self.INITIAL_LR


class nnUNetTrainerSmoke(nnUNetTrainerShort):
    """2 epochs x 4 training / 2 validation iterations: checks that a dataset trains end to end."""

    EPOCHS, ITERATIONS, VAL_ITERATIONS = 2, 4, 2


class nnUNetTrainerCheck(nnUNetTrainerShort):
    """1 epoch x 2 training / 1 validation iterations: a full-size plan trained just far enough
    to run every later step (bench/check_full.py)."""

    EPOCHS, ITERATIONS, VAL_ITERATIONS = 1, 2, 1


class nnUNetTrainer_FracAtlasDemo(nnUNetTrainerShort):
    """FracAtlas demo: 15 epochs x 24 / 2 iterations at lr 0.02 (the full recipe uses the stock
    ``nnUNetTrainer``): far from converged (nnU-Net's default is 1000 epochs x 250 iterations);
    its time per fold is in docs/benchmarks.md."""

    EPOCHS, ITERATIONS, VAL_ITERATIONS, INITIAL_LR = 15, 24, 2, 2e-2
