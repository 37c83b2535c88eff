"""Differential-privacy maths (noise calibration, accounting) and each site's privacy ledger."""
