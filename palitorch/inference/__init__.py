"""Processor, generation and the Pipeline that ties them to a loaded model."""

from palitorch.inference.pipeline import Pipeline, ScoreResult, load
from palitorch.inference.processor import Processor, load_image

__all__ = ["Pipeline", "Processor", "ScoreResult", "load", "load_image"]
