"""User-facing errors.

Anything a user can cause (a wrong path, a wrong scale, a corrupt file) raises ``EdgeSRError`` with a
sentence that names the file or option, what was expected and what was found. The CLI prints it on
one line and exits non-zero; other exceptions are bugs and keep their traceback.
"""


class EdgeSRError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    exit_code = 2


class MissingDependencyError(EdgeSRError):
    """An optional dependency (tensorrt, pycuda, opencv) is not installed."""

    exit_code = 3
