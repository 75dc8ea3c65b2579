"""Checked reads of a Hub `config.json` (`Keys`), and the defaults transformers fills in for fields a checkpoint
leaves out: the helpers of `PaliGemmaConfig.from_hf`."""

from __future__ import annotations

import json
import math

from palitorch.errors import ConfigError

# transformers' defaults: PaliGemmaConfig's own sub-config defaults (used when a sub-config is absent) and the
# GemmaConfig / Gemma2Config class defaults (used for fields a present sub-config leaves out).
PG_VISION_DEFAULTS = {
    "intermediate_size": 4096, "hidden_size": 1152, "patch_size": 14, "image_size": 224,
    "num_hidden_layers": 27, "num_attention_heads": 16,
}
PG_TEXT_DEFAULTS = {
    "hidden_size": 2048, "num_hidden_layers": 18, "intermediate_size": 16384, "num_attention_heads": 8,
    "num_key_value_heads": 1, "vocab_size": 257152,
}
GEMMA_DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 16,
}
GEMMA2_DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4,
}


# Those model/siglip.py runs: transformers' names for GELU's tanh approximation, and for GELU itself.
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast", "gelu_accurate", "gelu", "gelu_python")
LAYER_TYPES = ("sliding_attention", "full_attention")


class Keys:
    """Checked reads from one object of config.json: a wrong type or a value out of range raises a ConfigError
    naming the key as config.json spells it (`text_config.num_hidden_layers`)."""

    def __init__(self, d: dict, where: str = ""):
        self.d, self.where = d, where

    def section(self, key: str, defaults: dict) -> Keys:
        """The object at `key`; an absent or null one reads as `defaults`, an empty one as an object with no fields
        (as transformers reads them: PaliGemma's own defaults, or those of the sub-model's config class)."""
        x = self.d.get(key)
        if x is not None and not isinstance(x, dict):
            self.fail(key, x, "a JSON object")
        return Keys(dict(defaults) if x is None else x, f"{self.where}{key}.")

    def fail(self, key: str, value, want: str):
        shown = json.dumps(value, default=repr)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."  # messages stay one line
        raise ConfigError(f"{self.where}{key} is {shown}: it must be {want} (fix config.json or download it again)")

    def integer(self, key: str, default, optional: bool = False) -> int | None:
        """A positive integer (bools and floats such as 2.0 refused); null too if `optional`."""
        x = self.d.get(key, default)
        if not (x is None and optional) and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            self.fail(key, x, "an integer >= 1" + (" or null" if optional else ""))
        return x

    def number(self, key: str, default, optional: bool = False) -> float | None:
        """A finite number > 0; null too if `optional`."""
        x = self.d.get(key, default)
        if not (x is None and optional) and (isinstance(x, bool) or not isinstance(x, (int, float))
                                             or not 0 < x < math.inf):  # `not 0 < x` also refuses NaN
            self.fail(key, x, "a number > 0" + (" or null" if optional else ""))
        return x

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        x = self.d.get(key) or default
        if x not in choices:
            self.fail(key, x, f"one of {', '.join(choices)}")
        return x
