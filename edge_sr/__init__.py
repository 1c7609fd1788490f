"""edge-sr: low-bit SwinIR-light / NGswin super-resolution for edge devices.

The core package holds the models, checkpoints, data, metrics and the CLI. Calibration lives in
the sibling package ``calibrate`` and deployment in ``runtime``.
"""

__version__ = "0.1.0"
