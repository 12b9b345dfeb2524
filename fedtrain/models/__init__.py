"""Llama-style decoder and size presets."""

from fedtrain.models.llama import Llama, build_model, count_parameters
from fedtrain.models.presets import PRESETS, ModelShape

__all__ = ["PRESETS", "Llama", "ModelShape", "build_model", "count_parameters"]
