#!/usr/bin/env bash
# A pipeline's whole recipe, one numbered step per line. Each step skips work already done
# (preprocessing resumes per case, folds are reused, train.py skips finished folds).
#
#   sh train.sh [PIPELINE] [DATA_DIR] [key=value ...]   # or: DATA_DIR=... FOLDS=5 PROFILE=full sh train.sh
#
#   PIPELINE  rsna (default) | hipmri | fracatlas | pancreas. `sh train.sh` alone is the RSNA demo; `sh train.sh DATA_DIR` = `sh train.sh rsna DATA_DIR`
#   DATA_DIR  the data set's folder in its published layout (RSNA: train.csv, train_images/, segmentations/,
#             test.csv, test_images/; HipMRI: keras_slices_{train,validate,test}/ + keras_slices_seg_*/;
#             FracAtlas: the unzipped download with images/, Annotations/COCO JSON/, dataset.csv, Utilities/;
#             pancreas: train/subtype<k>/, validation/subtype<k>/, test/);
#             unset: the synthetic demo data is generated into data/<pipeline>_demo first
#   PROFILE   full (default with DATA_DIR) | demo (default without): config profile of every stage
#   FOLDS     number of folds (default: n_folds of the profile)
#   WORKERS   preprocessing processes (default 2);  PYTHON  interpreter (default .venv/bin/python if present)
#   OUTPUT    output folder (default output); products go to $OUTPUT/<pipeline>/
# Extra arguments after DATA_DIR are passed to every step as key=value overrides.
# Python modules run as `python -m utils.<module>` from the repository root (no install needed).
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
cd "$(dirname "$0")"

PIPELINE=rsna
if [ $# -gt 0 ] && [ -f "config/$1/base.yaml" ]; then PIPELINE="$1"; shift; fi
DATA_DIR="${DATA_DIR:-}"
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then DATA_DIR="$1"; shift; fi
DEMO_DIR="data/${PIPELINE}_demo"
if [ -z "$DATA_DIR" ]; then
    DATA_DIR="$DEMO_DIR"
    PROFILE="${PROFILE:-demo}"
fi
PROFILE="${PROFILE:-full}"
WORKERS="${WORKERS:-2}"
OUTPUT="${OUTPUT:-output}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
COMMON=(profile="$PROFILE" data_dir="$DATA_DIR" output_dir="$OUTPUT" ${FOLDS:+n_folds="$FOLDS"} "$@")
PRODUCTS="$OUTPUT/$PIPELINE"
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
T0=$SECONDS

# Generates the demo data into DATA_DIR when MARKER is missing there (only for the demo folder).
need_data() {
    local marker="$1"; shift
    if [ ! -e "$DATA_DIR/$marker" ]; then
        if [ "$DATA_DIR" != "$DEMO_DIR" ]; then echo "error: $DATA_DIR/$marker not found" >&2; exit 2; fi
        step "0. generate the synthetic demo data -> $DATA_DIR"
        "$PYTHON" -m "utils.$PIPELINE.synthetic" --out "$DATA_DIR" --preset demo --seed 0 "$@"
    fi
}

rsna() {
    need_data train.csv --workers "$WORKERS"

    step "1. preprocess: DICOM -> $PRODUCTS/prep (studies.csv, stage1_labels.csv, volumes/)"
    "$PYTHON" -m utils.preprocess_data --pipeline rsna --workers "$WORKERS" "${COMMON[@]}"

    step "2. folds -> $PRODUCTS/folds.csv"
    "$PYTHON" -m utils.fold_split --CFG config/rsna/base.yaml "${COMMON[@]}"

    step "3. stage 1 (vertebra box + ratios), all folds"
    "$PYTHON" train.py --CFG config/rsna/stage1_vertebra.yaml --fold all "${COMMON[@]}"

    step "4. stage-1 OOF predictions on every train study"
    "$PYTHON" inference.py --CFG config/rsna/stage1_vertebra.yaml --split oof "${COMMON[@]}"

    step "5. stage-2 labels: per-vertebra slice ranges and study boxes"
    "$PYTHON" -m utils.rsna.localize --CFG config/rsna/stage2_fracture.yaml "${COMMON[@]}"

    step "6. stage 2 (per-vertebra sequence fracture classifier), all folds"
    "$PYTHON" train.py --CFG config/rsna/stage2_fracture.yaml --fold all "${COMMON[@]}"

    step "7. stage-2 OOF predictions"
    "$PYTHON" inference.py --CFG config/rsna/stage2_fracture.yaml --split oof "${COMMON[@]}"

    step "8. patient head (patient_overall from all seven vertebrae), all folds"
    "$PYTHON" train.py --CFG config/rsna/patient_head.yaml --fold all "${COMMON[@]}"

    step "9. OOF CV report"
    "$PYTHON" inference.py --CFG config/rsna/patient_head.yaml --split oof "${COMMON[@]}"

    step "10. submission on $DATA_DIR/test.csv"
    "$PYTHON" inference.py --CFG config/rsna/patient_head.yaml --split test --out "$PRODUCTS/submission.csv" "${COMMON[@]}"

    if [ "$DATA_DIR" = "$DEMO_DIR" ]; then
        local unseen=data/rsna_unseen phantom=data/rsna_phantom
        step "11. cross-style check: the chain on studies of a style the demo never trained on ($unseen)"
        [ -e "$unseen/test.csv" ] || "$PYTHON" -m utils.rsna.synthetic --out "$unseen" --preset unseen --seed 0 --workers "$WORKERS" --overwrite
        "$PYTHON" -m utils.rsna.cross_style --CFG config/rsna/patient_head.yaml --data-dir "$unseen" "${COMMON[@]}"
        step "12. independent phantom: the chain on 24 studies of a generator the project did not train on ($phantom)"
        [ -e "$phantom/test.csv" ] || "$PYTHON" -m utils.rsna.synthetic.phantom --out "$phantom" --studies 24 --seed 2022 --size 256 --workers "$WORKERS" --overwrite
        "$PYTHON" -m utils.rsna.cross_style --CFG config/rsna/patient_head.yaml --data-dir "$phantom" --name phantom "${COMMON[@]}"
    fi

    echo
    "$PYTHON" -m utils.rsna.report --CFG config/rsna/patient_head.yaml "${COMMON[@]}"
    echo "CV report: $PRODUCTS/cv_report.md    submission: $PRODUCTS/submission.csv    ($(( (SECONDS - T0) / 60 )) min)"
}

hipmri() {
    # One torch thread unless told otherwise: on a small shared machine several OpenMP threads
    # per process stall each other (measured: docs/benchmarks.md).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    need_data keras_slices_train

    step "1. pair images and masks by name -> $PRODUCTS/prep/slices.csv"
    "$PYTHON" -m utils.preprocess_data --pipeline hipmri "${COMMON[@]}"

    step "2. folds -> $PRODUCTS/folds.csv"
    "$PYTHON" -m utils.fold_split --CFG config/hipmri/base.yaml "${COMMON[@]}"

    # split: given trains fold 0 (train patients, validated on the validate patients); split: folds every fold.
    step "3. 2D UNet"
    "$PYTHON" train.py --CFG config/hipmri/unet.yaml --fold all "${COMMON[@]}"

    step "4. test masks and per-class Dice on $DATA_DIR/keras_slices_test"
    "$PYTHON" inference.py --CFG config/hipmri/unet.yaml --split test --out "$PRODUCTS/test_masks" "${COMMON[@]}"
    echo "report: $PRODUCTS/cv_report.md    overlays: $PRODUCTS/test_overlays/    ($(( (SECONDS - T0) / 60 )) min)"
}

fracatlas() {
    # One torch thread per process on the shared 2-core machine (see hipmri); nnU-Net's own
    # worker counts come from nnunet.n_proc / n_proc_da (utils/nnunet.py).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    local cfg=config/fracatlas/base.yaml
    need_data dataset.csv

    step "1. convert: JPG + COCO polygons -> nnU-Net raw dataset + cases.csv under $PRODUCTS/nnunet/raw"
    "$PYTHON" -m utils.preprocess_data --pipeline fracatlas "${COMMON[@]}"

    step "2. folds (stratified, shared by nnU-Net and both classifiers) -> $PRODUCTS/folds.csv"
    "$PYTHON" -m utils.fold_split --CFG "$cfg" "${COMMON[@]}"

    step "3. nnU-Net: plan and preprocess (nnUNetv2_plan_and_preprocess), splits_final.json from the fold file"
    "$PYTHON" -m utils.nnunet --CFG "$cfg" plan "${COMMON[@]}"
    "$PYTHON" -m utils.fracatlas.segment --CFG "$cfg" splits "${COMMON[@]}"

    step "4. nnU-Net: train every fold (nnUNetv2_train)"
    "$PYTHON" -m utils.nnunet --CFG "$cfg" train all "${COMMON[@]}"

    step "5. nnU-Net: OOF predictions + maps on every training image, test predictions (fold ensemble), evaluation"
    "$PYTHON" -m utils.fracatlas.segment --CFG "$cfg" oof "${COMMON[@]}"
    "$PYTHON" -m utils.fracatlas.segment --CFG "$cfg" test "${COMMON[@]}"

    local stage
    for stage in classifier classifier_guided; do
        step "6. $stage: all folds, OOF predictions, test predictions"
        "$PYTHON" train.py --CFG "config/fracatlas/$stage.yaml" --fold all "${COMMON[@]}"
        "$PYTHON" inference.py --CFG "config/fracatlas/$stage.yaml" --split oof "${COMMON[@]}"
        "$PYTHON" inference.py --CFG "config/fracatlas/$stage.yaml" --split test "${COMMON[@]}"
    done

    step "7. CV report"
    "$PYTHON" -m utils.fracatlas.report --CFG "$cfg" "${COMMON[@]}"
    echo "report: $PRODUCTS/cv_report.md    ROC: $PRODUCTS/cv_roc.png    overlays: $PRODUCTS/overlays/    ($(( (SECONDS - T0) / 60 )) min)"
}

pancreas() {
    local cfg=config/pancreas/base.yaml trainer
    need_data train

    step "1. convert to the nnU-Net raw dataset (labels rounded, case-label CSV) -> $PRODUCTS/nnunet/raw"
    "$PYTHON" -m utils.preprocess_data --pipeline pancreas "${COMMON[@]}"

    step "2. folds: the given split (validation = fold 0) -> $PRODUCTS/folds.csv + nnU-Net's splits_final.json"
    eval "$("$PYTHON" -m utils.nnunet --CFG "$cfg" env "${COMMON[@]}")"
    "$PYTHON" -m utils.fold_split --CFG "$cfg" --nnunet-splits "$NNUNET_SPLITS" "${COMMON[@]}"

    step "3. nnU-Net plan + preprocess"
    "$PYTHON" -m utils.nnunet --CFG "$cfg" plan "${COMMON[@]}"

    # The report compares every trainer of report.trainers: each one is trained (finished folds skipped).
    for trainer in $("$PYTHON" -m utils.config --CFG "$cfg" --get report.trainers "${COMMON[@]}"); do
        step "4. train $trainer (fold 0: train/ -> validation/)"
        "$PYTHON" -m utils.nnunet --CFG "$cfg" train "${COMMON[@]}" nnunet.trainer="$trainer"
    done

    step "5. validation report: masks + subtypes per trainer, DSC, macro-F1, s/case"
    "$PYTHON" -m utils.pancreas.report --CFG "$cfg" "${COMMON[@]}"

    step "6. test masks + subtype_results.csv on $DATA_DIR/test ($NNUNET_TRAINER)"
    "$PYTHON" -m utils.pancreas.submit --CFG "$cfg" --input "$DATA_DIR/test" --out "$PRODUCTS/predictions/test" "${COMMON[@]}"
    echo "report: $PRODUCTS/cv_report.md    test: $PRODUCTS/predictions/test/subtype_results.csv    ($(( (SECONDS - T0) / 60 )) min)"
}

step "pre-flight: pretrained encoder weights of every stage (python -m utils.weights fetch --all on a machine with internet)"
"$PYTHON" -m utils.weights check --pipeline "$PIPELINE" "${COMMON[@]}"

case "$PIPELINE" in
    rsna | hipmri | fracatlas | pancreas) "$PIPELINE" ;;
    *) echo "error: sh train.sh $PIPELINE: no recipe for this pipeline yet (rsna, hipmri, fracatlas, pancreas)" >&2; exit 2 ;;
esac
