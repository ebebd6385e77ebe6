"""User-facing errors: each one becomes a single clear line on stderr and exit code 2."""

from __future__ import annotations


class EmkitError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 2


class ConfigError(EmkitError):
    """A config file or flag that does not validate."""


class DataError(EmkitError):
    """A dataset file that is missing, malformed or does not verify."""


class ModelSpecError(EmkitError):
    """A model spec that cannot be resolved or loaded."""


class RunFolderError(EmkitError):
    """A run folder that cannot be used for this run (other config, another process, not a run)."""


class TrainingError(EmkitError):
    """Training cannot start or continue for a reason the user can fix."""
