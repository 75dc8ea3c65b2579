"""palitorch: Google's PaliGemma 1 and 2 vision-language models, written from scratch in PyTorch.

    import palitorch
    pipe = palitorch.load("path/to/paligemma-checkpoint")    # or palitorch.load() for the bundled model
    pipe.generate(image, "caption en").text                  # an answer: a Result (text, token ids, logprobs)
    pipe.score(image, "caption en", "a cat on a bench")      # log-probabilities of an answer: a ScoreResult
"""

from typing import TYPE_CHECKING

from palitorch.assets import default_model_path
from palitorch.config import PaliGemmaConfig, TextConfig, VisionConfig, preset
from palitorch.errors import CheckpointError, ConfigError, InputError, NumericsError, PalitorchError

if TYPE_CHECKING:
    from palitorch.inference import GenerationOptions, Pipeline, Result, ScoreResult, Stream, load

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import palitorch` does not import torch, so the command line starts at once and
# a Ctrl-C while torch loads ends it quietly (palitorch.entry).
_INFERENCE = {"GenerationOptions", "Pipeline", "Result", "ScoreResult", "Stream", "load"}


_SUBPACKAGES = {"checkpoint", "cli", "inference", "model", "native", "server", "tasks", "train"}


def __dir__():
    return sorted({*globals(), *_INFERENCE})


def __getattr__(name: str):
    if name in _INFERENCE:
        import palitorch.inference

        return getattr(palitorch.inference, name)
    if name in _SUBPACKAGES:  # `palitorch.model.kernels...` after a plain `import palitorch`, as before
        import importlib

        return importlib.import_module(f"palitorch.{name}")
    raise AttributeError(f"module 'palitorch' has no attribute {name!r}")

__all__ = [
    "CheckpointError", "ConfigError", "GenerationOptions", "InputError", "NumericsError", "PaliGemmaConfig",
    "PalitorchError", "Pipeline", "Result", "ScoreResult", "Stream", "TextConfig", "VisionConfig",
    "default_model_path", "load", "preset",
]
