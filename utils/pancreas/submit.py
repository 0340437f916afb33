"""The pancreas test hook: masks + ``subtype_results.csv`` in one pass.

Usage: ``python -m utils.pancreas.submit --CFG config/pancreas/base.yaml --input DIR --out DIR``.

Every ``*_0000.nii.gz`` of ``--input`` is preprocessed, predicted by the fold ensemble of one
trainer (``--trainer``, default ``nnunet.trainer``; ``nnunet.folds``) and written as
``OUT/<case>.nii.gz`` (uint8, the input's geometry). Its subtype is the argmax of the class
probabilities averaged over every forward pass (sliding-window tiles, TTA mirrors, folds). The
tables are written at the end, atomically:

- ``subtype_results.csv``: ``Names,Subtype`` (``Names`` = the mask file name, the quiz's contract);
- ``cases.csv``: ``Names,Subtype,seconds,p0..pK-1`` (seconds = preprocess + predict + export).

TTA (mirroring) is off with ``nnunet.disable_tta=true``. An unreadable image is logged with its
path and skipped; its row is missing from both tables.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from nnunetv2.inference.export_prediction import (
    convert_predicted_logits_to_segmentation_with_correct_shape,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from utils import cli, nnunet, paths
from utils.errors import InputError
from utils.io import atomic_path, write_csv
from utils.pancreas import layout

log = logging.getLogger(__name__)
RESULTS_CSV = "subtype_results.csv"
CASES_CSV = "cases.csv"


class MultitaskPredictor(nnUNetPredictor):
    """nnU-Net's predictor plus the class logits of every forward pass of our multi-task network.

    A forward hook collects ``network.last_logits`` (1, K) per call, so the stock sliding window,
    mirroring and fold loop run unchanged; :meth:`predict_case` averages their softmax.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._logits: list[torch.Tensor] = []

    def _collect(self, module, args, output) -> None:
        self._logits.append(module.last_logits.detach().float().cpu())

    def initialize_from_trained_model_folder(
        self, model_dir: str, use_folds, checkpoint_name: str = "checkpoint_final.pth"
    ):
        # load_state_dict fails when the network built from today's trainer options differs
        try:
            super().initialize_from_trained_model_folder(model_dir, use_folds, checkpoint_name)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            raise InputError(
                f"{model_dir}: the checkpoint does not fit the network of the current "
                "nnunet.trainer_options (e.g. cls_norm); predict with the options it was trained with"
            ) from err
        net = getattr(self.network, "_orig_mod", self.network)
        if not hasattr(net, "last_logits"):
            raise InputError(
                f"{model_dir}: trainer {self.trainer_name} has no classifier (not a multi-task model)"
            )
        net.register_forward_hook(self._collect)

    def predict_case(self, image: Path, out_file: Path) -> tuple[np.ndarray, float]:
        """Write the mask of ``image`` to ``out_file`` atomically; (class probabilities (K,), seconds)."""
        start = time.perf_counter()
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, _, props = preprocessor.run_case(
            [str(image)], None, self.plans_manager, self.configuration_manager, self.dataset_json
        )
        self._logits.clear()
        logits = self.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, props
        )
        writer = self.plans_manager.image_reader_writer_class()
        with atomic_path(out_file) as tmp:
            # the writer picks the format from the suffix: write <tmp>.nii.gz, then move onto tmp
            named = tmp.with_name(tmp.name + layout.MASK_SUFFIX)
            writer.write_seg(seg, str(named), props)
            os.replace(named, tmp)
        probs = torch.softmax(torch.cat(self._logits), dim=1).mean(0).numpy()
        return probs, time.perf_counter() - start


def load_predictor(cfg, trainer: str) -> MultitaskPredictor:
    """The fold ensemble ``nnunet.folds`` of ``trainer``, on the config's device, TTA per config."""
    os.environ.update(nnunet.environment(cfg))  # roots, trainer folder and trainer options
    kind, _ = nnunet.device(cfg)
    predictor = MultitaskPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=not cfg["nnunet"]["disable_tta"],
        perform_everything_on_device=kind == "cuda",
        device=torch.device(kind),
        allow_tqdm=False,
    )
    model_dir = paths.nnunet_model_dir(cfg, trainer)
    folds = nnunet.folds(cfg)
    missing = [f for f in folds if not (model_dir / f"fold_{f}" / "checkpoint_final.pth").is_file()]
    if missing:
        raise InputError(f"{model_dir}: no checkpoint_final.pth for folds {missing}; train first")
    predictor.initialize_from_trained_model_folder(str(model_dir), tuple(folds))
    return predictor


def predict_images(cfg, trainer: str, images: Sequence[Path], out_dir: Path) -> pd.DataFrame:
    """Masks of ``images`` in ``out_dir`` plus ``subtype_results.csv`` and ``cases.csv``; returns cases."""
    predictor = load_predictor(cfg, trainer)
    num_classes = int(cfg["nnunet"]["trainer_options"]["num_classes"])
    rows = []
    for image in images:
        name = layout.mask_name(
            layout.case_of_image(image) or image.name[: -len(layout.IMAGE_SUFFIX)]
        )
        problem = unreadable(image)
        if problem:
            log.warning("skipping %s: unreadable image (%s)", image, problem)
            continue
        probs, seconds = predictor.predict_case(image, out_dir / name)
        rows.append(
            {
                "Names": name,
                "Subtype": int(probs.argmax()),
                "seconds": round(seconds, 3),
                **{f"p{k}": round(float(probs[k]), 4) for k in range(num_classes)},
            }
        )
        log.info("%s: subtype %d in %.2f s", name, rows[-1]["Subtype"], seconds)
    table = pd.DataFrame(
        rows, columns=["Names", "Subtype", "seconds", *[f"p{k}" for k in range(num_classes)]]
    )
    write_csv(table, out_dir / CASES_CSV)
    write_csv(table[["Names", "Subtype"]], out_dir / RESULTS_CSV)
    return table


def unreadable(image: Path) -> str | None:
    """Why nibabel cannot read ``image``'s voxels (a truncated or foreign file), None if it can."""
    try:
        np.asarray(nib.load(image).dataobj)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def input_images(folder: Path) -> list[Path]:
    """Every ``*_0000.nii.gz`` of ``folder`` (sorted); InputError when there is none."""
    images = sorted(p for p in Path(folder).glob("*" + layout.IMAGE_SUFFIX) if p.is_file())
    if not images:
        raise InputError(f"{folder}: no *{layout.IMAGE_SUFFIX} images to predict")
    return images


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg="config/pancreas/base.yaml")
    parser.add_argument("--input", type=Path, required=True, help="folder of *_0000.nii.gz images")
    parser.add_argument("--out", type=Path, required=True, help="folder for masks and the CSVs")
    parser.add_argument("--trainer", help="trainer whose model predicts (default: nnunet.trainer)")
    args = parser.parse_args(argv)
    with cli.running():
        cfg = cli.load(args)
        table = predict_images(
            cfg, args.trainer or cfg["nnunet"]["trainer"], input_images(args.input), args.out
        )
        if table.empty:
            raise InputError(f"no image of {args.input} could be predicted (see the log)")
    print(
        f"wrote {len(table)} masks and {args.out / RESULTS_CSV} ({table['seconds'].mean():.2f} s per case)"
    )


if __name__ == "__main__":
    main()
