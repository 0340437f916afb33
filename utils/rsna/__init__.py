"""RSNA 2022 Cervical Spine Fracture Detection: format knowledge, conversion, datasets, chain.

``pipeline.py`` registers it; ``layout.py`` holds its paths; ``dicom.py`` / ``nifti.py`` read the
competition files; ``preprocess.py`` builds the cache; ``synthetic.py`` writes demo data in the
Kaggle layout; ``datasets.py``, ``losses.py`` and ``models/rsna/`` are the stages; ``localize.py``
links stage 1 to stage 2; ``chain.py`` holds the reports and the test-time chain; ``metric.py``
is the competition metric.
"""
