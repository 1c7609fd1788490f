"""Accuracy bench: FP / MinMax / Percentile / DOBI / 2DQuant-fast, drop from FP beside the
published drops (2DQuant's Table 3, docs/anchors.md).

Two model families: ``--family swinir`` (the reference SwinIR-light checkpoints, x2/x3/x4,
results/accuracy/, docs/results/accuracy.md) and ``--family ngswin`` (the official NGswin
checkpoints, x2/x3, results/accuracy_ngswin/, docs/results/ngswin_accuracy.md).

Resumable: each (scale, bits, method, set) cell is one JSON and is skipped when present;
calibration files are cached under calib/. A cell scores image by image into ``<cell>.parts/``,
so an interrupted cell resumes at its next image, and a worker with nothing of its own left helps
score the images of cells that other workers are running. Each cell is calibrated by
``calibrate.api.calibrate_model``, the API under ``edge-sr calibrate`` (same data, same options).
Order: scales as given, Set5 before Set14; the wide rows (B100, Urban100 at 4 and 2 bits) last.
``--table`` only rewrites the table.

Modules: ``plan`` (methods, published tables, families, cells), ``claims`` (the work queue),
``run`` (calibrate and score), ``report`` (tables and plot), ``__main__`` (the command).

    nice python -m benchmarks.accuracy [--family swinir] [--scales 2,4,3] [--bits 4,2,3] [--table]
"""
