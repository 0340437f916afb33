"""Multi-task nnU-Net v2 trainers: segmentation + a case-level classification (pancreas lesion subtype).

One implementation, three variants that differ only in how the classifier sees the encoder:

- ``nnUNetTrainerPancreasHead``: a conv block on the deepest encoder stage, pooled by average and max;
- ``nnUNetTrainerPancreasLesionScaled``: the same features scaled by the lesion map before pooling
  (ground-truth lesion in training, the network's own lesion probability at inference);
- ``nnUNetTrainerPancreasAttnEnc``: an attention-gated classification encoder fed by every encoder
  stage, pooled with the lesion map.

Loss = nnU-Net's segmentation loss + ``cls_weight`` x (focal | CE) classification loss with optional
class weights. The network's ``forward`` returns exactly the stock segmentation output, so nnU-Net's
loss, validation, sliding-window prediction and export run unchanged; the class logits of the last
forward are kept on the network (``last_logits``) for the train/validation steps and for our
predictor (utils/pancreas/submit.py), which averages them over tiles, mirrors and folds.

Options come from ``NNUNET_TRAINER_OPTIONS`` (JSON of ``nnunet.trainer_options``, exported by
utils/nnunet.py): nnU-Net constructs trainers with a fixed signature. A case's class is looked up by
case id in the CSV named by ``case_labels`` beside the raw ``dataset.json`` (never parsed from a
file name). Classification metrics (loss, macro-F1, per-class recall; scikit-learn) are logged with
nnU-Net's logger every epoch. Found by nnU-Net's lookup through ``nnUNet_extTrainer``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from sklearn.metrics import f1_score, recall_score
from torch import autocast, nn

OPTIONS_ENV = "NNUNET_TRAINER_OPTIONS"
LESION_FLOOR = (
    0.05  # added to the lesion map: a missed lesion degrades to global pooling, not to zeros
)
# Keys our trainers add to nnU-Net's LocalLogger (2.7+ asserts a key is registered before logging it).
LOG_KEYS = ("train_cls_losses", "val_cls_losses", "val_macro_f1", "val_recall_per_class")


@dataclass(frozen=True)
class MultitaskOptions:
    """``nnunet.trainer_options`` (config/pancreas/base.yaml documents each key)."""

    case_labels: str
    num_classes: int
    lesion_label: int
    cls_weight: float
    cls_loss: str
    focal_gamma: float
    class_weights: str | list[float] | None
    cls_momentum: float
    cls_norm: str
    epochs: int
    iterations: int
    val_iterations: int


def load_options() -> MultitaskOptions:
    """The options from ``NNUNET_TRAINER_OPTIONS``; RuntimeError naming what is wrong."""
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        raise RuntimeError(
            f"{OPTIONS_ENV} is not set: run nnU-Net through python -m utils.nnunet, which exports "
            "nnunet.trainer_options of the config"
        )
    given = json.loads(raw)
    names = {f.name for f in fields(MultitaskOptions)}
    if set(given) != names:
        raise RuntimeError(
            f"{OPTIONS_ENV}: missing {sorted(names - set(given))}, unknown {sorted(set(given) - names)}"
        )
    opts = MultitaskOptions(**given)
    if opts.cls_loss not in ("focal", "ce"):
        raise RuntimeError(f"{OPTIONS_ENV}: cls_loss must be focal or ce, got {opts.cls_loss!r}")
    if opts.cls_norm not in NORMS:
        raise RuntimeError(
            f"{OPTIONS_ENV}: cls_norm must be one of {sorted(NORMS)}, got {opts.cls_norm!r}"
        )
    return opts


def class_weights(opts: MultitaskOptions, train_labels: np.ndarray) -> torch.Tensor | None:
    """Per-class loss weights (num_classes,): none, given, or inverse frequency of ``train_labels``.

    ``balanced`` weights are n / (k * count_c) (sklearn's convention), so a majority-only
    classifier no longer minimises the loss; a class absent from training gets weight 0.
    """
    if opts.class_weights is None:
        return None
    if opts.class_weights == "balanced":
        counts = np.bincount(train_labels, minlength=opts.num_classes).astype(float)
        weights = np.where(
            counts > 0, counts.sum() / (opts.num_classes * np.maximum(counts, 1)), 0.0
        )
        return torch.tensor(weights, dtype=torch.float32)
    if isinstance(opts.class_weights, list) and len(opts.class_weights) == opts.num_classes:
        return torch.tensor(opts.class_weights, dtype=torch.float32)
    raise RuntimeError(
        f"{OPTIONS_ENV}: class_weights must be balanced, null or {opts.num_classes} numbers, "
        f"got {opts.class_weights!r}"
    )


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017) with optional class weights; gamma 0 = weighted CE.

    logits (B, K), target (B,) int64 -> scalar: sum_i w_yi (1 - p_i)^gamma CE_i / sum_i w_yi.
    """

    def __init__(self, gamma: float, weight: torch.Tensor | None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None])[:, 0]
        w = self.weight[target] if self.weight is not None else torch.ones_like(log_p)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p * w
        return loss.sum() / w.sum().clamp_min(1e-8)


def global_pool(features: torch.Tensor) -> torch.Tensor:
    """Average and max over space: features (B, C, *S) -> (B, 2C).

    The max matters: nnU-Net's encoder stages end in instance norm, so a plain spatial mean of
    their features is nearly the same for every case.
    """
    flat = features.flatten(2)
    return torch.cat([flat.mean(2), flat.amax(2)], 1)


def lesion_pool(features: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """Features scaled by the lesion map, pooled: [sum(f * w) / sum(w), max(f * w)], w = map + floor.

    features (B, C, *S); lesion (B, 1, *S') in [0, 1] at any resolution -> (B, 2C).
    """
    pool = F.adaptive_avg_pool3d if lesion.ndim == 5 else F.adaptive_avg_pool2d
    w = (pool(lesion, features.shape[2:]) + LESION_FLOOR).flatten(2)
    scaled = features.flatten(2) * w
    return torch.cat([scaled.sum(2) / w.sum(2), scaled.amax(2)], 1)


def _conv_block(encoder: nn.Module, c_in: int, c_out: int, stride) -> nn.Sequential:
    """conv (kernel 3, the encoder's conv/norm/nonlinearity) -> norm -> nonlinearity."""
    return nn.Sequential(
        encoder.conv_op(c_in, c_out, 3, stride=stride, padding=1, bias=True),
        encoder.norm_op(c_out, **(encoder.norm_op_kwargs or {})),
        encoder.nonlin(**(encoder.nonlin_kwargs or {})),
    )


class DeepestFeatures(nn.Module):
    """One conv block on the deepest encoder stage: skips -> (B, C_last, *S_last)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        width = encoder.output_channels[-1]
        self.block = _conv_block(encoder, width, width, 1)
        self.out_channels = width

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.block(skips[-1])


class AttentionGate(nn.Module):
    """Gate classification features by the segmentation encoder's: f_cls * sigmoid(psi(f_enc + f_cls)).

    f_enc (B, C_enc, *S), f_cls (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, encoder: nn.Module, c_enc: int, c_cls: int):
        super().__init__()
        conv = encoder.conv_op
        self.enc = conv(c_enc, c_cls, 1)
        self.psi = nn.Sequential(nn.LeakyReLU(0.01), conv(c_cls, 1, 1), nn.Sigmoid())

    def forward(self, f_enc: torch.Tensor, f_cls: torch.Tensor) -> torch.Tensor:
        return f_cls * self.psi(self.enc(f_enc) + f_cls)


class AttentionClsEncoder(nn.Module):
    """A classification encoder beside the segmentation one, gated by every encoder stage.

    Stage i: conv block with the encoder's stride of stage i (so shapes match the skips), then
    the attention gate with skip i. Half the segmentation encoder's width (CPU cost; the gate, not
    capacity, carries the segmentation features). skips -> (B, C_last / 2, *S_last).
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        widths = [max(c // 2, 8) for c in encoder.output_channels]
        ins = [encoder.output_channels[0], *widths[:-1]]
        self.stages = nn.ModuleList(
            _conv_block(encoder, c_in, c, s if i else 1)
            for i, (c_in, c, s) in enumerate(zip(ins, widths, encoder.strides, strict=True))
        )
        self.gates = nn.ModuleList(
            AttentionGate(encoder, c_enc, c)
            for c_enc, c in zip(encoder.output_channels, widths, strict=True)
        )
        self.out_channels = widths[-1]

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        f = skips[0]
        for stage, gate, skip in zip(self.stages, self.gates, skips, strict=True):
            f = gate(skip, stage(f))
        return f


# How the classifier standardises its pooled features (B, C): across the batch (batch norm,
# running statistics at evaluation) or per case over its C features (layer norm, the same
# computation in training and evaluation, independent of the batch size).
NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


class ClassifierMLP(nn.Module):
    """(B, C) pooled features -> (B, num_classes) logits.

    Normalisation first (``norm``: a key of NORMS): the pooled features differ little between
    cases, and standardising them keeps the logits from being all bias (the classifier otherwise
    predicts one class for every case).
    """

    def __init__(
        self,
        c_in: int,
        num_classes: int,
        hidden: int = 128,
        dropout: float = 0.3,
        norm: str = "batch",
    ):
        super().__init__()
        self.net = nn.Sequential(
            NORMS[norm](c_in),
            nn.Linear(c_in, hidden),
            nn.LeakyReLU(0.01),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultitaskNet(nn.Module):
    """nnU-Net's encoder-decoder plus a classifier on the encoder's skips.

    ``forward(x (B, C_in, *P), lesion (B, 1, *P) | None)`` returns the stock segmentation output
    (a list with deep supervision, highest resolution first) and stores the class logits (B, K)
    in ``last_logits``. With ``lesion_label`` set, pooling is weighted by ``lesion`` (training:
    the ground truth) or, when None, by the detached softmax probability of that label.
    """

    def __init__(
        self,
        unet: nn.Module,
        features: nn.Module,
        num_classes: int,
        lesion_label: int | None,
        norm: str = "batch",
    ):
        super().__init__()
        self.encoder, self.decoder = (
            unet.encoder,
            unet.decoder,
        )  # nnU-Net toggles decoder.deep_supervision
        self.features = features
        self.classifier = ClassifierMLP(2 * features.out_channels, num_classes, norm=norm)
        self.lesion_label = lesion_label
        self.last_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, lesion: torch.Tensor | None = None):
        skips = self.encoder(x)
        seg = self.decoder(skips)
        feats = self.features(skips)
        if self.lesion_label is None:
            pooled = global_pool(feats)
        else:
            if lesion is None:
                top = seg[0] if isinstance(seg, (list, tuple)) else seg
                lesion = torch.softmax(top.detach().float(), 1)[
                    :, self.lesion_label : self.lesion_label + 1
                ]
            pooled = lesion_pool(feats, lesion.to(feats.dtype))
        self.last_logits = self.classifier(pooled)
        return seg


class nnUNetTrainerPancreasHead(nnUNetTrainer):
    """(a) Classification head on the deepest encoder stage; the shared multi-task implementation."""

    uses_lesion_map = False

    @staticmethod
    def build_features(encoder: nn.Module) -> nn.Module:
        return DeepestFeatures(encoder)

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008  (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.options = load_options()
        self.num_epochs = self.options.epochs
        self.num_iterations_per_epoch = self.options.iterations
        self.num_val_iterations_per_epoch = self.options.val_iterations
        self.case_classes: dict[str, int] = {}
        self.cls_loss: nn.Module | None = None

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """nnU-Net's network for the plans wrapped with this variant's classifier (also at inference)."""
        unet = nnUNetTrainer.build_network_architecture(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
        )
        opts = load_options()
        lesion = opts.lesion_label if cls.uses_lesion_map else None
        return MultitaskNet(
            unet, cls.build_features(unet.encoder), opts.num_classes, lesion, opts.cls_norm
        )

    def configure_optimizers(self):
        """nnU-Net's SGD + poly schedule; the classifier's parameters get ``cls_momentum``.

        nnU-Net's momentum 0.99 suits the segmentation network; on the small classifier it makes
        the logits swing from one class to another between epochs.
        """
        net = self._net()
        cls_params = [*net.features.parameters(), *net.classifier.parameters()]
        ids = {id(p) for p in cls_params}
        seg_params = [p for p in self.network.parameters() if id(p) not in ids]
        groups = [
            {"params": seg_params},
            {"params": cls_params, "momentum": self.options.cls_momentum},
        ]
        optimizer = torch.optim.SGD(
            groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---- set-up -------------------------------------------------------------------------------
    def case_labels_path(self) -> Path:
        return Path(nnUNet_raw) / self.plans_manager.dataset_name / self.options.case_labels

    def _read_case_classes(self) -> dict[str, int]:
        path = self.case_labels_path()
        if not path.is_file():
            raise RuntimeError(
                f"{path} not found: convert the data set first (it writes the case labels)"
            )
        table = pd.read_csv(path, dtype={"case_id": str})
        bad = table[(table["subtype"] < 0) | (table["subtype"] >= self.options.num_classes)]
        if len(bad):
            raise RuntimeError(
                f"{path}: subtype of {bad['case_id'].iloc[0]} outside 0..{self.options.num_classes - 1}"
            )
        return dict(zip(table["case_id"], table["subtype"].astype(int), strict=True))

    def initialize(self):
        super().initialize()
        self.case_classes = self._read_case_classes()
        train_keys, _ = self.do_split()
        labels = np.array([self.case_class(k) for k in train_keys])
        weight = class_weights(self.options, labels)
        gamma = self.options.focal_gamma if self.options.cls_loss == "focal" else 0.0
        self.cls_loss = FocalLoss(gamma, weight).to(self.device)
        counts = np.bincount(labels, minlength=self.options.num_classes).tolist()
        self.print_to_log_file(
            f"classification: training cases per class {counts}, class weights "
            f"{None if weight is None else np.round(weight.numpy(), 3).tolist()}, "
            f"{self.options.cls_loss} loss x {self.options.cls_weight}"
        )
        for key in LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    def case_class(self, key: str) -> int:
        if key not in self.case_classes:
            raise RuntimeError(f"case {key} has no class in {self.case_labels_path()}")
        return self.case_classes[key]

    def _net(self) -> MultitaskNet:
        """The MultitaskNet under a DDP or torch.compile wrapper."""
        net = getattr(self.network, "module", self.network)
        return getattr(net, "_orig_mod", net)

    def _batch_classes(self, batch: dict) -> torch.Tensor:
        return torch.tensor([self.case_class(k) for k in batch["keys"]], device=self.device)

    # ---- steps --------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = (
            [t.to(self.device, non_blocking=True) for t in batch["target"]]
            if isinstance(batch["target"], list)
            else batch["target"].to(self.device, non_blocking=True)
        )
        top = target[0] if isinstance(target, list) else target
        lesion = (top == self.options.lesion_label).float() if self.uses_lesion_map else None
        classes = self._batch_classes(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with (
            autocast(self.device.type, enabled=True)
            if self.device.type == "cuda"
            else dummy_context()
        ):
            output = self.network(data, lesion)
            seg_loss = self.loss(output, target)
            cls_loss = self.cls_loss(self._net().last_logits, classes)
            loss = seg_loss + self.options.cls_weight * cls_loss
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy(), "cls_loss": cls_loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self.logger.log(
            "train_cls_losses",
            float(np.mean(collate_outputs(train_outputs)["cls_loss"])),
            self.current_epoch,
        )

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)  # segmentation loss and Dice counts, stock
        logits = self._net().last_logits
        classes = self._batch_classes(batch)
        out["cls_loss"] = self.cls_loss(logits, classes).detach().cpu().numpy()
        out["cls_pred"] = logits.argmax(1).cpu().tolist()
        out["cls_true"] = classes.cpu().tolist()
        return out

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        out = collate_outputs(val_outputs)
        labels = list(range(self.options.num_classes))
        macro_f1 = f1_score(
            out["cls_true"], out["cls_pred"], labels=labels, average="macro", zero_division=0
        )
        recall = recall_score(
            out["cls_true"], out["cls_pred"], labels=labels, average=None, zero_division=0
        )
        self.logger.log("val_cls_losses", float(np.mean(out["cls_loss"])), self.current_epoch)
        self.logger.log("val_macro_f1", float(macro_f1), self.current_epoch)
        self.logger.log("val_recall_per_class", [float(r) for r in recall], self.current_epoch)
        self.print_to_log_file(
            f"val classification: loss {np.mean(out['cls_loss']):.4f}, macro-F1 {macro_f1:.3f}, "
            f"recall per class {np.round(recall, 3).tolist()} "
            f"(predicted counts {np.bincount(out['cls_pred'], minlength=len(labels)).tolist()})"
        )


class nnUNetTrainerPancreasLesionScaled(nnUNetTrainerPancreasHead):
    """(b) Deepest-stage features scaled by the lesion map (GT in training, prediction at inference)."""

    uses_lesion_map = True


class nnUNetTrainerPancreasAttnEnc(nnUNetTrainerPancreasHead):
    """(c) Attention-gated classification encoder fed by every encoder stage, lesion-map pooled."""

    uses_lesion_map = True

    @staticmethod
    def build_features(encoder: nn.Module) -> nn.Module:
        return AttentionClsEncoder(encoder)
