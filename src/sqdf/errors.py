"""User-facing errors. The CLI prints their message (which names the bad value and the fix) and exits with code 2."""


class SqdfError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class ConfigError(SqdfError):
    """An invalid config value, key, task or method name."""


class RewardError(SqdfError):
    """A reward function raised, or returned NaN/inf or the wrong shape."""


class CheckpointError(SqdfError):
    """A run directory with no checkpoint, or a corrupted one."""


class MissingWeightsError(SqdfError):
    """Model weights (a pipeline, a reward model) were not found where the config points; the message says where
    to put them and which files are expected."""
