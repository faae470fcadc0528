"""The seed's three entry points, kept as thin aliases over ``lazyllama.open``."""

from __future__ import annotations

import os

from .config import LlamaConfig
from .model import LazyModel, open

__all__ = ["MultiFileSafeTensorsLoader", "SafeTensorsModelLoader", "load_llama3_from_safetensors"]


class SafeTensorsModelLoader:
    """A checkpoint by path: ``load_config()`` and ``load_weights_f16()`` (a lazy mapping)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.model: LazyModel = open(path, dtype="float16")

    def load_config(self) -> LlamaConfig:
        return self.model.config

    def load_weights_f16(self) -> LazyModel:
        """Name → ``LazyTensor``: nothing is read until a tensor is loaded."""
        return self.model

    def close(self) -> None:
        self.model.close()


class MultiFileSafeTensorsLoader(SafeTensorsModelLoader):
    """The same loader; sharded checkpoints are found by the one discovery rule."""


def load_llama3_from_safetensors(path: str | os.PathLike[str]) -> tuple[LlamaConfig, LazyModel]:
    """``(config, weights)`` of a checkpoint, ``weights`` a lazy mapping of name → LazyTensor."""
    model = open(path, dtype="float16")
    return model.config, model
