"""Evaluation: held-out loss and task accuracy, generation, scaling-law fits."""
