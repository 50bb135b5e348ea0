"""Checkpoint readers. Each is a WeightSource: tensors fetched by Hugging Face name, optionally one slice."""

from ferry.model.weights.source import WeightSource

__all__ = ["WeightSource"]
