"""Deployment: backends (ONNX Runtime, TensorRT, CUDA), engine build, tiling, upscale, profiling."""
