"""Data in: calibration samples, streamed and sharded activation statistics, models shipped in
wheels."""
