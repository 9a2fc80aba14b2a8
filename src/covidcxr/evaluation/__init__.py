"""Metrics with patient-bootstrap CIs, threshold choice, calibration and metric reports (no torch)."""
