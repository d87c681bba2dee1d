"""Calibration: data (``data``), the statistics tap (``collect``) and the saved statistics (``stats``)."""

from moecompress.calib.data import CalibBatch, CalibSpec, load_calibration

__all__ = ["CalibBatch", "CalibSpec", "load_calibration"]
