"""Backends behind one small interface (``runtime.backends.base.Backend``).

Optional heavy dependencies (tensorrt, pycuda, CUDA) are imported inside their backend module's
functions, never at package import.
"""
