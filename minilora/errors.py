"""Every error minilora raises on purpose, in one place.

Each message says what went wrong, where (file, key, row or flag), what was expected and what was
found, and what to do. Callers catch `MiniloraError` to tell our clear errors from bugs. Each is also a
ValueError (bad input) or RuntimeError (a state or environment problem), docs/reliability.md promise 3.
"""


class MiniloraError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ConfigError(MiniloraError, ValueError):
    """A config.json / training config value we cannot honour (unknown key value, bad type, range)."""


class WeightsError(MiniloraError, ValueError):
    """Model weights (safetensors files, shard index) that are missing, malformed or do not match the model."""


class CheckpointError(MiniloraError, RuntimeError):
    """A training checkpoint (adapter, optimizer, state) that is incomplete, corrupt or cannot be written."""


class TokenizerError(MiniloraError, ValueError):
    """tokenizer.json / tokenizer_config.json missing or malformed."""


class DataError(MiniloraError, ValueError):
    """A dataset file or row that cannot be used (names the file and row)."""


class HubError(MiniloraError, RuntimeError):
    """A hub download that failed (no network, gated repo, unknown id)."""


class ResumeError(MiniloraError, RuntimeError):
    """A training checkpoint that cannot be resumed from (incomplete, or from another config)."""


class NonFiniteError(MiniloraError, FloatingPointError, RuntimeError):
    """Loss or gradients stayed NaN/inf for too many steps in a row."""


class SandboxError(MiniloraError, RuntimeError):
    """Model-written code cannot be run safely here (no bubblewrap, and no explicit opt-out)."""
