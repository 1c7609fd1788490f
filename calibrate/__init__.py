"""2DQuant post-training quantization: fake quantizers, DOBI, DQC, baselines and QDQ export."""
