#!/usr/bin/env bash
# A pipeline's whole recipe, one numbered step per line. Each step skips work already done
# (preprocessing resumes per study, folds are reused, train.py skips finished folds).
#
#   sh train.sh [rsna] [DATA_DIR] [key=value ...]   # or: DATA_DIR=... FOLDS=5 PROFILE=full sh train.sh
#
#   no argument   the RSNA demo recipe on generated synthetic data; `sh train.sh DATA_DIR` = `sh train.sh rsna DATA_DIR`
#
#   DATA_DIR  competition folder (train.csv, train_images/, segmentations/, test.csv, test_images/);
#             unset: the synthetic demo data is generated into data/rsna_demo first
#   PROFILE   full (default with DATA_DIR) | demo (default without): config profile of every stage
#   FOLDS     number of folds (default: n_folds of the profile: 5 full, 3 demo)
#   WORKERS   preprocessing processes (default 2);  PYTHON  interpreter (default .venv/bin/python if present)
#   OUTPUT    output folder (default output); products go to $OUTPUT/rsna/
# Extra arguments after DATA_DIR are passed to every step as key=value overrides.
# Python modules run as `python -m utils.<module>` from the repository root (no install needed).
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
cd "$(dirname "$0")"

PIPELINE=rsna
if [ $# -gt 0 ] && [ -f "config/$1/base.yaml" ]; then PIPELINE="$1"; shift; fi
if [ "$PIPELINE" != rsna ]; then echo "error: sh train.sh $PIPELINE: no recipe for this pipeline yet" >&2; exit 2; fi
DATA_DIR="${DATA_DIR:-}"
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then DATA_DIR="$1"; shift; fi
if [ -z "$DATA_DIR" ]; then
    DATA_DIR=data/rsna_demo
    PROFILE="${PROFILE:-demo}"
fi
PROFILE="${PROFILE:-full}"
WORKERS="${WORKERS:-2}"
OUTPUT="${OUTPUT:-output}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [ -z "${FOLDS:-}" ]; then
    FOLDS=$("$PYTHON" -c "from utils.config import load_config; print(load_config('config/rsna/base.yaml', ['profile=$PROFILE']).n_folds)")
fi
COMMON=(profile="$PROFILE" data_dir="$DATA_DIR" output_dir="$OUTPUT" n_folds="$FOLDS" "$@")
PRODUCTS="$OUTPUT/rsna"
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
T0=$SECONDS

if [ ! -f "$DATA_DIR/train.csv" ]; then
    if [ "$DATA_DIR" != data/rsna_demo ]; then echo "error: $DATA_DIR/train.csv not found" >&2; exit 2; fi
    step "0. generate the synthetic demo data -> $DATA_DIR"
    "$PYTHON" -m utils.rsna.synthetic --out "$DATA_DIR" --preset demo --seed 0 --workers "$WORKERS"
fi

step "1. preprocess: DICOM -> $PRODUCTS/prep (studies.csv, stage1_labels.csv, volumes/)"
"$PYTHON" -m utils.preprocess_data --pipeline rsna --workers "$WORKERS" "${COMMON[@]}"

step "2. folds -> $PRODUCTS/folds.csv ($FOLDS folds)"
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

"$PYTHON" - "$PRODUCTS" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/cv_report.json"))
print(f"\nOOF competition metric ({r['model']}): {r['oof_metric']:.4f}  |  constant-prior baseline: "
      f"{r['baseline_prior']:.4f}  |  ratio {r['ratio_to_prior']:.2f}  |  noisy-OR {r['baseline_noisy_or']:.4f}")
PY
echo "CV report: $PRODUCTS/cv_report.md    submission: $PRODUCTS/submission.csv    ($(( (SECONDS - T0) / 60 )) min)"
