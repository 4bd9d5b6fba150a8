"""User-facing errors.

Every problem caused by input (a missing file, a bad config, a tensor of the wrong shape, a bad
sampling parameter) is raised as an `IdlmError` subclass with one message that names the problem.
The CLI prints that message and exits with status 2 instead of showing a traceback from deep
inside torch or safetensors.
"""


class IdlmError(Exception):
    """Base class: an error the user can fix, with a message that says how."""


class ConfigError(IdlmError, ValueError):
    """A configuration value is missing, unknown or out of range. `param` names the offending field
    (e.g. "top_k") where there is one, so callers (the server's error body) never parse the message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CheckpointError(IdlmError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class TokenizerError(IdlmError):
    """A tokenizer file is missing or unusable."""
