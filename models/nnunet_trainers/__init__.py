"""Our nnU-Net v2 trainers, found by nnU-Net's own lookup through ``nnUNet_extTrainer``.

utils/nnunet.py points ``nnUNet_extTrainer`` at this folder; ``nnUNetv2_train -tr NAME`` and
``nnUNetv2_predict`` then import every module here (as top-level modules) until one defines
``NAME``. Hence: unique module file names, and every module must import cleanly
(tests/test_nnunet.py imports each one) — one broken module hides the trainers after it.
"""
