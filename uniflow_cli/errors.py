"""The uniflow error hierarchy.

Every error a user can cause is a :class:`UniflowError`. Its message is one line that names the bad
value and says how to fix it; the CLI prints it once, in red, and exits with ``exit_code``. Library
code raises these (validate, then compute) and never prints.
"""

from __future__ import annotations


class UniflowError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole one-line message."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.problem = message
        self.fix = fix
        full = message if not fix else f"{message.rstrip('.')}. Fix: {fix}"
        super().__init__(full)


class UsageError(UniflowError):
    """Bad command-line usage (conflicting or missing options, unknown names)."""

    exit_code = 2


class ConfigError(UniflowError):
    """A config value out of range (r, lora_alpha, tau, lambda_, ...)."""


class AdapterError(UniflowError):
    """An adapter directory that is missing, malformed, corrupt or half-written."""


class IncompatibleAdaptersError(AdapterError):
    """Adapters that cannot be combined (other base, other targets, shapes)."""


class AggregationError(UniflowError):
    """The aggregation cannot be carried out on these inputs."""


class OutputExistsError(UniflowError):
    """The output already exists and ``--force`` was not given."""


class WorkspaceError(UniflowError):
    """No workspace found, or its layout/config is broken."""


class DataError(UniflowError):
    """A dataset that cannot be read or partitioned as asked."""


class ModelError(UniflowError):
    """A model that cannot be located, converted or loaded."""


class MissingDependencyError(UniflowError):
    """A package or program is missing; the fix is the exact install command."""


class TrainingError(UniflowError):
    """Local training cannot start or had to abort (e.g. non-finite loss)."""


class UnsafeInputError(UniflowError):
    """Untrusted input that would escape its root, block, or be mistaken for something else: an id that is
    not a plain name, a path outside its root, a symlink, FIFO or device where a regular file is expected."""
