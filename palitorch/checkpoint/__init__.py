"""Hub checkpoint folders in and out. The only package that knows Hugging Face weight names."""

from palitorch.checkpoint.adapter import merge_adapter, read_adapter
from palitorch.checkpoint.io import CheckpointError, load_model, read_config, resolve_dtype, save_model

__all__ = ["CheckpointError", "load_model", "merge_adapter", "read_adapter", "read_config", "resolve_dtype",
           "save_model"]
