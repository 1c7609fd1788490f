"""NGswin (CVPR 2023): a converged window-attention SR transformer, loadable from the official
checkpoints. The registry picks up ``ARCHITECTURE`` and ``CHECKPOINTS`` from here."""

from edge_sr.models.ngswin.loading import ARCHITECTURE, CHECKPOINTS, build, detect, load_file
from edge_sr.models.ngswin.model import NGswin, pad_symmetric

__all__ = ["ARCHITECTURE", "CHECKPOINTS", "NGswin", "build", "detect", "load_file",
           "pad_symmetric"]
