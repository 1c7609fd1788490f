"""The pieces of the QDQ export (``calibrate.export_qdq``): trace, grid maths, Q/DQ emission,
graph tidying, ORT inspection and fidelity checks."""
