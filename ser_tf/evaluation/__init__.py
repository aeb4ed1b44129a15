"""Evaluation: metrics (accuracy, UAR, per-class, per-group), prediction, reports and plots."""
