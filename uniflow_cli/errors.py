"""The uniflow error hierarchy.

Every error a user can cause is a :class:`UniflowError`. Its message is one line that names the bad
value and says how to fix it; the CLI prints it once, in red, and exits with ``exit_code``. Library
code raises these (validate, then compute) and never prints.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TypeVar

_FORMATTER = string.Formatter()


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
    """A setting out of range (r, lora_alpha, tau, lambda_, ...), raised in library terms.

    Built with :meth:`invalid`, it knows the setting's ``field`` (the paper's name: ``tau``, ``lambda_``),
    the ``value`` given, the ``rule`` it breaks and an ``example`` of a good value, so that each front end
    names the setting its own way: the CLI as the flag (``--stage-tau 1.5 must be in [0, 1]. Fix: use
    --stage-tau 0.25``), the settings resolver as the uniflow.toml key, Flower as the run-config key
    (:meth:`renamed`). Raised with a plain message it is just a one-line error.
    """

    NO_VALUE = object()  # for a rule about the setting as a whole: "weights has 2 values for 3 adapters"

    def __init__(self, message: str, *, fix: str | None = None, field: str | None = None, value: object = None,
                 rule: str | None = None, example: object = None) -> None:
        super().__init__(message, fix=fix)
        self.field = field
        self.value = value
        self.rule = rule
        self.example = example

    @classmethod
    def invalid(cls, field: str, value: object, rule: str, *, example: object = None, fix: str | None = None) -> ConfigError:
        """``field=value rule``, fixed by ``set field = example`` (or the given ``fix``)."""
        key = field.rstrip("_")
        return cls(f"{key} {rule}" if value is cls.NO_VALUE else f"{key}={_shown(value)} {rule}", fix=fix or (f"set {key} = {_shown(example)}" if example is not None else None),
                   field=field, value=value, rule=rule, example=example)

    def renamed(self, name: str, *, style: str = "flag", where: str | None = None) -> ConfigError:
        """The same error naming the setting as a front end does.

        ``flag``: ``--stage-tau 1.5 … Fix: use --stage-tau 0.25``; ``toml``: ``{where}: tau=1.5 … Fix:
        write tau = 0.25 in {where}``; ``key`` (Flower's run config): ``stage-tau=1.5 … Fix: set stage-tau=0.25``.
        The result has no ``field`` left: it is in its final terms."""
        if self.rule is None:
            problem = f"{where}: {self.problem}" if where else self.problem
            return ConfigError(problem, fix=self.fix)
        example = self.example
        if self.value is ConfigError.NO_VALUE:
            problem = f"{where + ': ' if where and style == 'toml' else ''}{name} {self.rule}"
            fix = self.fix
        elif style == "flag":
            problem = f"{name} {_flag_shown(self.value)} {self.rule}"
            fix = f"use {name} {_flag_value(example)}" if example is not None else self.fix
        elif style == "toml":
            problem = f"{where + ': ' if where else ''}{name}={_shown(self.value)} {self.rule}"
            fix = f"write {name} = {_shown(example)} in {where or 'uniflow.toml'}" if example is not None else self.fix
        else:
            problem = f"{name}={_shown(self.value)} {self.rule}"
            fix = f"set {name}={_shown(example)}" if example is not None else self.fix
        return ConfigError(problem, fix=fix)


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


def _shown(value: object) -> str:
    """A value as the user wrote it in a config: true/false, numbers, quoted strings."""
    import json

    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value) if len(value) <= 60 else json.dumps(value[:57] + "...")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flag_shown(value: object) -> str:
    """A bad value after its flag, quoted if a string so its extent is plain: ``--stages 'both'``."""
    return repr(value) if isinstance(value, str) else _shown(value)


def _flag_value(value: object) -> str:
    """A value as it is typed after a flag: plain strings and numbers, true/false."""
    if isinstance(value, str) and value and " " not in value and len(value) <= 60:
        return value
    return _shown(value)


E = TypeVar("E", bound=UniflowError)


def worded(cls: type[E], problem: str, fix: str | None = None, **values: object) -> E:
    """``cls(problem, fix=fix)`` whose ``{placeholders}`` not given in ``values`` name settings (``{round}``,
    ``{out}``, ``{state_dir}``): told now in library terms (the field's name without a trailing ``_``), and
    later in a front end's own terms by :func:`reword` (the CLI: its flags). ``values`` fill the other
    placeholders as ``str.format`` does, so braces inside a value (a path) are never read as a template."""
    fields = {name for text in (problem, fix or "") for _, name, _, _ in _FORMATTER.parse(text) if name and name not in values}
    library = {f: f.rstrip("_") for f in fields}
    exc = cls(problem.format(**library, **values), fix=fix.format(**library, **values) if fix else None)
    exc.wording = (cls, problem, fix, values, fields)  # type: ignore[attr-defined]
    return exc


def reword(exc: UniflowError, name_of: Callable[[str], str | None]) -> UniflowError:
    """``exc`` with the settings its template names told as ``name_of(field)`` (None: the library word);
    an error built without :func:`worded` is returned unchanged."""
    wording = getattr(exc, "wording", None)
    if wording is None:
        return exc
    cls, problem, fix, values, fields = wording
    names = {f: name_of(f) or f.rstrip("_") for f in fields}
    return cls(problem.format(**names, **values), fix=fix.format(**names, **values) if fix else None)
