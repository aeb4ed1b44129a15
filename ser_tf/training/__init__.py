"""Training: speaker-independent protocols and trainers."""
