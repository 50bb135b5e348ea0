"""Hugging Face checkpoint folders: config.json plus one or many *.safetensors, memory-mapped.

Tensors are fetched by name through safetensors' slices, so a rank reads only the bytes of its shard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ferry.errors import ModelNotFoundError


class SafetensorsWeights:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"{self.folder}: no *.safetensors files in this folder")
        self._handles = {f: self._open(f) for f in files}
        self._where: dict[str, Path] = {}
        for f, handle in self._handles.items():
            for key in handle.keys():
                self._where[key] = f

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise ModelNotFoundError(f"{path}: not a readable safetensors file ({exc})") from None

    @property
    def tensor_names(self) -> set[str]:
        return set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name not in self._where:
            raise ModelNotFoundError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        handle = self._handles[self._where[name]]
        if dim is None:
            return handle.get_tensor(name)
        view = handle.get_slice(name)
        index = [slice(None)] * len(view.get_shape())
        index[dim] = slice(start, stop)
        return view[tuple(index)]
