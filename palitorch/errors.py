"""Errors that reach users as one line: what was wrong and what to do. The CLI prints them without a traceback."""


class PalitorchError(Exception):
    """Base class: a problem with the user's input, files or options (not a bug in palitorch)."""


class ConfigError(PalitorchError, ValueError):
    """A config.json or training config that palitorch cannot use."""


class CheckpointError(PalitorchError, ValueError):
    """A checkpoint folder that cannot be loaded: missing files or tensors, wrong shapes, truncated files."""


class InputError(PalitorchError, ValueError):
    """Bad input: an unreadable image, a prompt that does not fit, an invalid decoding option."""


class ProcessError(InputError):
    """Under torchrun, an error that only this process meets (say, no GPU of its own): it says so itself, with its
    number, where errors every process meets are said by the first one only."""


class NumericsError(PalitorchError, ArithmeticError):
    """The model computed NaN or infinite logits: damaged weights, or a dtype whose range overflowed (float16)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a line saying what was kept and how to go on (the CLI prints it; the exit status stays 130)."""
