"""Llama-style decoder, size presets and held-out evaluation."""

from fedtrain.models.evaluate import evaluate_loss
from fedtrain.models.llama import Llama, build_model, count_parameters
from fedtrain.models.presets import PRESETS, ModelShape

__all__ = ["PRESETS", "Llama", "ModelShape", "build_model", "count_parameters", "evaluate_loss"]
