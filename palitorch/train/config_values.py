"""The values of a training config: each field read from TOML or from the command line (`--section.key value`,
read as a TOML literal, else as the bare text), and written back as TOML.

The field types are those of train/config.py's dataclasses: str, int, float, bool, list[str] and dict.
"""

from __future__ import annotations

import difflib
import json
import sys
import typing

from palitorch.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """["--optim.lr", "3e-4", "--train.steps=10"] -> [("optim.lr", "3e-4"), ("train.steps", "10")]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: overrides look like --section.key value")
        if "." not in a.split("=", 1)[0]:  # a mistyped option (--resum), not an override
            like = difflib.get_close_matches(a, ["--resume", "--print-config", "--help"], n=1)
            raise ConfigError(f"unrecognized option {a}" + (f" (did you mean {like[0]}?)" if like else
                                                             "; overrides look like --section.key value"))
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {a} has no value")
            k, v = a[2:], args[i + 1]
            i += 2
        out.append((k, v))
    return out


def coerce(tp, value, where: str, from_text: bool):
    """Check (TOML) or convert (command line) `value` to the field's type; a clear error otherwise."""
    text = value if from_text else None
    if from_text:
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            pass  # a bare word: keep the string
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table such as {{caption = 4}}, got {value!r}")
        return dict(value)
    if tp is bool:
        for word in (value, text):  # (text: the command line's `1` / `0`, which TOML read as whole numbers)
            if isinstance(word, str) and word.strip().lower() in ("yes", "on", "1", "no", "off", "0"):
                return word.strip().lower() in ("yes", "on", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if text is not None:  # `--train.out 123` is the folder "123"; `--data.eval '""'` the TOML string ""
            return value if isinstance(value, str) else text
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in this file, not user input


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML's escapes, control chars too
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)
