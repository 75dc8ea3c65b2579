"""Processor, generation and the Pipeline that ties them to a loaded model."""

from palitorch.inference.answer import Result
from palitorch.inference.images import load_image
from palitorch.inference.pipeline import Pipeline, ScoreResult, Stream, load
from palitorch.inference.processor import Processor
from palitorch.inference.sampling import GenerationOptions

__all__ = ["GenerationOptions", "Pipeline", "Processor", "Result", "ScoreResult", "Stream", "load", "load_image"]
