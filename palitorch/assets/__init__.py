"""Files that ship inside the package: the bundled default model and the demo images (easy-VQA test split)."""

from __future__ import annotations

from pathlib import Path

from palitorch.errors import CheckpointError

ASSETS_DIR = Path(__file__).parent
DEFAULT_MODEL_DIR = ASSETS_DIR.parent / "default_model"


def default_model_path() -> Path:
    """The folder of the small PaliGemma trained on easy-VQA that ships with palitorch."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the bundled default model is missing from {DEFAULT_MODEL_DIR}: run `make train-default` or pass --model"
        )
    return DEFAULT_MODEL_DIR
