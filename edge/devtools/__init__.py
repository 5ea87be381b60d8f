"""Making and checking models and this package: synthetic slides, metrics, calibration, INT8, parity, speed."""
