"""The errors a user can fix. Entry points print each as one ``error: ...`` line (``VPD_DEBUG=1``: the traceback).

Every module raises these, so one ``except UserError`` at an entry point covers them all; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Base of the errors that a user's input, config or files caused."""


class UsageError(UserError, ValueError):
    """A command-line flag missing, malformed or out of range (exit code 2)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work."""


class WeightsError(UserError, ValueError):
    """A weights file or folder that cannot be read as the expected model."""


class CheckpointError(UserError, RuntimeError):
    """A training checkpoint that cannot be restored into this run."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """No prepared dataset where the config points."""


class NonFiniteError(UserError, RuntimeError):
    """Training produced a non-finite loss or gradient norm."""
