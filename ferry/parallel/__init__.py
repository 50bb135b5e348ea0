"""Launching parallel workers (spawned or under torchrun) and checking that a layout fits the model."""
