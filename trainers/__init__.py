"""Thin absl apps over the ser_tf library (train, attack, tune, predict)."""
