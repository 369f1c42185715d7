"""The experiment's settings and the one resolver every command and the Flower app get them from.

Each settings dataclass is one table of ``uniflow.toml`` (``SECTION``), uses the paper's names (``r``,
``lora_alpha``, ``tau``, ``lambda_``) and is validated in ``__post_init__`` like peft's configs, raising
:class:`~uniflow_cli.errors.ConfigError` in library terms (the field, the value, the rule, an example).

Resolution is always ``defaults < uniflow.toml table < overrides`` (:func:`resolve`): the table's keys are
checked by one policy (an unknown key is an error naming it, the closest known key and all of them — a
typo never silently trains with defaults); overrides are what a front end was given (a flag, a run-config
key; ``None`` = not given). An error is named where its value came from: a table value as the toml key in
that file, an override by its field, which the CLI maps to its flag and Flower to its run-config key.

No torch, no models: importing this is cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from uniflow_cli.compute import PRECISIONS, check_precision_name, check_quantize_name  # noqa: F401  (PRECISIONS: re-exported; torch-free)
from uniflow_cli.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from uniflow_cli.workspace import Workspace

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Field types (TOML hands over any type: every dataclass checks these first in __post_init__)
# --------------------------------------------------------------------------------------------------
# bool is a subclass of int in Python but never a count; an int is a fine float; a str is never a list.
_INT: Callable[[Any], bool] = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
_NUM: Callable[[Any], bool] = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_INT, "an integer"),
    "float": (_NUM, "a number"),
    "int | None": (lambda v: v is None or _INT(v), "an integer"),
    "float | None": (lambda v: v is None or _NUM(v), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), "a list of strings"),
    "dict[str, int]": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _INT(x) for k, x in v.items()),
                       "a table of string keys to integers"),
}
_TOML_TYPES = {"str": "a string", "int": "an integer", "float": "a float", "bool": "a boolean", "list": "a list", "dict": "a table"}


def toml_type(value: Any) -> str:
    """How TOML would call the type of ``value`` (for messages)."""
    if isinstance(value, (list, tuple)):
        bad = next((x for x in value if not isinstance(x, str)), None)
        if bad is not None:
            return f"a list holding {bad!r} ({toml_type(bad)})"
    return _TOML_TYPES.get(type(value).__name__, type(value).__name__)


def _example(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is None or default is dataclasses.MISSING:
        return '"/path/to/dir"' if "str" in str(f.type) else "1"
    return json.dumps(default)  # JSON spells these scalars and string lists as TOML does


def check_field_types(obj: Any, table: str, *, keys: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """ConfigError unless every field of the config dataclass ``obj`` has its annotated type.

    ``table`` is the uniflow.toml table the fix names, ``keys`` maps field names to TOML keys
    (``lambda_`` → ``lambda``). Tuples become lists. A new annotation needs an entry in ``_FIELD_TYPES``.
    """
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        accepts, what = _FIELD_TYPES[str(f.type)]
        value = getattr(obj, f.name)
        if not accepts(value):
            key = (keys or {}).get(f.name, f.name)
            shown = json.dumps(value) if isinstance(value, bool) else repr(value)  # TOML spells true/false
            raise ConfigError(
                f"{key}={shown} must be {what}, not {toml_type(value)}",
                fix=f"write {key} = {_example(f)} in the [{table}] table of uniflow.toml",
            )
        if isinstance(value, tuple):
            setattr(obj, f.name, list(value))


def _finite(value: Any) -> bool:
    return _NUM(value) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------
@dataclass
class LoraSettings:
    """``[lora]``: the adapter shared by every client of an experiment.

    ``adapter`` is the family: ``lora`` (PEFT's LoraConfig; rsLoRA is ``use_rslora = true``) or ``vera``
    (PEFT's VeraConfig: frozen random projections shared by every layer, from ``projection_prng_key``, and
    trained vectors d, b per layer, d starting at ``d_initial``; ``r`` is VeRA's rank, ``lora_dropout`` its
    ``vera_dropout``; ``lora_alpha`` does not apply: VeRA has no scaling). The targets are the same for both.
    """

    SECTION: ClassVar[str] = "lora"
    #: Keys only one family reads: the other family's tables leave them out (:func:`lora_table`).
    ONLY_LORA: ClassVar[tuple[str, ...]] = ("lora_alpha", "use_rslora")
    ONLY_VERA: ClassVar[tuple[str, ...]] = ("d_initial", "projection_prng_key")

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    llm_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    encoder_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "q_proj", "k_proj", "v_proj"])
    adapter: str = "lora"
    d_initial: float = 0.1
    projection_prng_key: int = 0
    # Heterogeneous ranks (the paper's Table 10): client id → its own rank r_k ≤ r; the others train at r, the
    # global's rank. A client below r starts from the global's first r_k components (aggregation/truncate.py),
    # the server zero-pads its drop back to r.
    client_ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from uniflow_cli.peft_keys import ADAPTER_FAMILIES  # torch-free

        check_field_types(self, "lora")
        if self.adapter not in ADAPTER_FAMILIES:
            rslora = " (rsLoRA is adapter lora with use_rslora = true)" if self.adapter == "rslora" else ""
            raise ConfigError.invalid("adapter", self.adapter, f"is not one of {', '.join(ADAPTER_FAMILIES)}{rslora}", example="lora")
        if self.r < 1:
            raise ConfigError.invalid("r", self.r, "must be a positive integer", example=8)
        if not (_finite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError.invalid("lora_alpha", self.lora_alpha, "must be a positive number", example=2 * self.r)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError.invalid("lora_dropout", self.lora_dropout, "must be in [0, 1)", example=0.05)
        if self.adapter == "vera" and self.use_rslora:
            raise ConfigError("use_rslora=true with adapter vera: rsLoRA's scaling α/√r is LoRA's; VeRA has no scaling",
                              fix="set adapter = \"lora\" for rsLoRA, or use_rslora = false for VeRA")
        # d = 0 makes both vectors' gradients 0 at the start (ΔW = Λ_b B Λ_d A with b = 0): VeRA would never train.
        if not (_finite(self.d_initial) and self.d_initial != 0):
            raise ConfigError.invalid("d_initial", self.d_initial, "must be a finite non-zero number", example=0.1)
        if not 0 <= self.projection_prng_key < 2**63:  # torch.Generator.manual_seed's range
            raise ConfigError.invalid("projection_prng_key", self.projection_prng_key, "must be in [0, 2^63)", example=0)
        self._check_client_ranks()

    def _check_client_ranks(self) -> None:
        from uniflow_cli.paths import ID_RULE, is_valid_id

        for client, rank in self.client_ranks.items():
            if not is_valid_id(client):
                raise ConfigError.invalid("client_ranks", client, f"names a client id that is not a plain name ({ID_RULE})", example={"0": 4})
            if not 1 <= rank <= self.r:
                raise ConfigError.invalid("client_ranks", {client: rank}, f"must give each client a rank in [1, r = {self.r}] (r is the "
                                          "global's rank, the largest)", example={client: max(1, self.r // 2)})
        if self.client_ranks and self.is_vera:
            raise ConfigError("client_ranks with adapter vera: a VeRA federation has one rank (one pair of projections)",
                              fix="drop client_ranks from [lora], or use adapter lora")

    def for_client(self, client: str | None) -> LoraSettings:
        """The settings client ``client`` trains with: ``r`` its own rank from ``client_ranks`` (else r)."""
        rank = self.client_ranks.get(str(client)) if client is not None else None
        return self if rank is None or rank == self.r else dataclasses.replace(self, r=rank)

    @property
    def is_vera(self) -> bool:
        return self.adapter == "vera"


def lora_table(settings: LoraSettings) -> dict[str, Any]:
    """A ``[lora]`` table to write: the other family's keys left out (a LoRA table is what it was before
    VeRA existed, byte for byte; a VeRA one has no lora_alpha that would look like it mattered)."""
    data = dataclasses.asdict(settings)
    drop = LoraSettings.ONLY_VERA + ("adapter",) if not settings.is_vera else LoraSettings.ONLY_LORA
    drop += ("client_ranks",) if not settings.client_ranks else ()  # one rank: the table is what it was before ranks differed
    return {k: v for k, v in data.items() if k not in drop}


STAGE_PLANS = ("two-stage", "joint", "reverse", "llm-only", "encoder-only")
STAGE_BY = ("step", "round")
UPLOAD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainSettings:
    """``[train]``: local training (Eq. 7's ``tau`` is the share of stage-I steps or rounds).

    ``steps`` optimizer steps per round, or ``epochs`` passes over the shard instead (give one; an
    ``epochs`` given where ``steps`` is only inherited wins, see :func:`resolve_train`). ``dtype`` is the
    storage dtype of the uploaded tensors; ``precision`` (fp32 | bf16 | fp16) the dtype the frozen base is
    loaded in and the autocast training runs under (LoRA, projectors and the optimizer stay float32);
    ``quantize`` (None | nf4 | int8) stores the LLM's frozen linear layers quantised (QLoRA). The
    device is no setting here: it belongs to each machine (``--device``, a run-config key). Every field can
    be set in the table or overridden per run.
    """

    SECTION: ClassVar[str] = "train"

    tau: float = 0.25
    steps: int | None = 20
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int | None = None
    seed: int = 0
    stages: str = "two-stage"
    stage_by: str = "step"
    dtype: str = "float32"
    precision: str = "fp32"
    quantize: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "train")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError.invalid("tau", self.tau, "must be in [0, 1]", example=0.25)
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"steps={self.steps} and epochs={self.epochs:g} were both given", fix="give one of them")
        if self.steps is None and self.epochs is None:
            raise ConfigError("neither steps nor epochs is set", fix="give steps (e.g. 20) or epochs (e.g. 1)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError.invalid("steps", self.steps, "must be >= 1", example=20)
        if self.epochs is not None and not (_finite(self.epochs) and self.epochs > 0):
            raise ConfigError.invalid("epochs", self.epochs, "must be a finite number > 0", example=1)
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError.invalid(name, getattr(self, name), "must be >= 1", example=4 if name == "batch_size" else 1)
        if not (_finite(self.lr) and self.lr > 0):
            raise ConfigError.invalid("lr", self.lr, "must be a finite number > 0", example=2e-4)
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError.invalid("weight_decay", self.weight_decay, "must be a finite number >= 0", example=0.0)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError.invalid("warmup_ratio", self.warmup_ratio, "must be in [0, 1)", example=0.1)
        if not (_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError.invalid("max_grad_norm", self.max_grad_norm, "must be a finite number > 0", example=1.0)
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError.invalid("max_length", self.max_length, "is too small (< 8 tokens)", example=256)
        if self.seed < 0:  # numpy's generators refuse negative seeds
            raise ConfigError.invalid("seed", self.seed, "must be >= 0", example=0)
        if self.stages not in STAGE_PLANS:
            raise ConfigError.invalid("stages", self.stages, f"is not one of {', '.join(STAGE_PLANS)}", example="two-stage")
        if self.stage_by not in STAGE_BY:
            raise ConfigError.invalid("stage_by", self.stage_by, "is not step|round", example="step")
        if self.dtype not in UPLOAD_DTYPES:
            raise ConfigError.invalid("dtype", self.dtype, f"is not {'|'.join(UPLOAD_DTYPES)}", example="float32")
        check_precision_name(self.precision)
        check_quantize_name(self.quantize)


RIDGE_MODES = ("auto", "always", "never")
WEIGHTINGS = ("examples", "uniform")
DEFAULT_RCOND = 1e-7  # ≈ float32 machine epsilon: adapters are stored in float32 or narrower


@dataclass
class AggregateSettings:
    """``[aggregate]``: the server's method, FedA²-LoRA's Tikhonov term (Eq. 13) and the update defenses
    (``clip_update_norm``: each client's update of each layer bounded in norm; ``robust``: ``median`` or
    ``trimmed-mean:β`` in place of every weighted sum — aggregation/robust.py, docs/aggregation.md "Defenses")."""

    SECTION: ClassVar[str] = "aggregate"
    TOML_KEYS: ClassVar[dict[str, str]] = {"lambda_": "lambda"}  # field → key; the field name is accepted too

    method: str = "fedA2"
    lambda_: float = 1.0
    ridge: str = "auto"
    weighting: str = "examples"
    rcond: float = DEFAULT_RCOND
    clip_update_norm: float | None = None
    robust: str | None = None

    def __post_init__(self) -> None:
        from uniflow_cli.aggregation import robust as defenses  # torch-free
        from uniflow_cli.aggregation.registry import method_spec  # torch-free

        check_field_types(self, "aggregate", keys=self.TOML_KEYS)
        method_spec(self.method)
        if not (_finite(self.lambda_) and self.lambda_ >= 0):
            raise ConfigError.invalid("lambda_", self.lambda_, "must be a finite number >= 0", example=1.0)
        if self.ridge not in RIDGE_MODES:
            raise ConfigError.invalid("ridge", self.ridge, f"is not one of {'|'.join(RIDGE_MODES)}", example="auto")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError.invalid("weighting", self.weighting, f"is not {'|'.join(WEIGHTINGS)}", example="examples")
        if not (_finite(self.rcond) and 0 < self.rcond < 1):
            raise ConfigError.invalid("rcond", self.rcond, "must be in (0, 1)", example=DEFAULT_RCOND)
        defenses.check_clip_norm(self.clip_update_norm)
        defenses.check_robust_method(defenses.parse_robust(self.robust), self.method)


# --------------------------------------------------------------------------------------------------
# The resolver
# --------------------------------------------------------------------------------------------------
def toml_keys(cls: type) -> dict[str, str]:
    """TOML key → field name of a settings class (field names are keys too)."""
    renames: dict[str, str] = getattr(cls, "TOML_KEYS", {})
    keys = {f.name: f.name for f in dataclasses.fields(cls)}
    keys.update({key: name for name, key in renames.items()})
    return keys


def check_keys(table: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    """``table``'s values by field name; an unknown key is a ConfigError naming it and the known ones."""
    keys = toml_keys(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            known = sorted(k for k in keys if k not in getattr(cls, "TOML_KEYS", {}))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}", fix=f"{hint}known keys: {', '.join(known)}")
        values[keys[key]] = value
    return values


def section_where(ws: Workspace | None, cls: type) -> str:
    return f"{ws.config_path if ws is not None else 'uniflow.toml'} [{cls.SECTION}]"  # type: ignore[attr-defined]


def load_section(ws: Workspace | None, cls: type) -> dict[str, Any]:
    """The workspace's table for ``cls`` (``cls.SECTION``) by field name, keys checked; {} without a workspace."""
    if ws is None:
        return {}
    table = ws.config().get(cls.SECTION, {})  # type: ignore[attr-defined]  (load_config checked it is a table)
    values = check_keys(table, cls, section_where(ws, cls))
    _check_table_types(cls, values, section_where(ws, cls))
    return values


def _check_table_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Each value of a table has its field's type — checked on the table alone, so that a broken value in the
    shared uniflow.toml is reported even where a flag overrides it on one machine (it must be fixed, not masked)."""
    renames: dict[str, str] = getattr(cls, "TOML_KEYS", {})
    for f in dataclasses.fields(cls):
        if f.name in values and str(f.type) in _FIELD_TYPES:
            accepts, what = _FIELD_TYPES[str(f.type)]
            value = values[f.name]
            if not accepts(value):
                key = renames.get(f.name, f.name)
                shown = json.dumps(value) if isinstance(value, bool) else repr(value)
                raise ConfigError(f"{where}: {key}={shown} must be {what}, not {toml_type(value)}", fix=f"write {key} = {_example(f)} in {where}")


def resolve(cls: type[T], ws: Workspace | None, overrides: Mapping[str, Any] | None = None) -> T:
    """``defaults < uniflow.toml [cls.SECTION] < overrides`` as a validated ``cls``.

    ``overrides`` maps field names to what a front end was given; ``None`` means not given. A bad table
    value is reported as its key in that file; a bad override keeps its field (the CLI names the flag)."""
    table = load_section(ws, cls)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return _build(cls, {**table, **given}, table, given, section_where(ws, cls))


def _build(cls: type[T], values: dict[str, Any], table: Mapping[str, Any], given: Mapping[str, Any], where: str) -> T:
    try:
        return cls(**values)
    except ConfigError as exc:
        if exc.field is not None and exc.field in given:
            raise
        renames: dict[str, str] = getattr(cls, "TOML_KEYS", {})
        key = renames.get(exc.field, exc.field) if exc.field else ""
        raise exc.renamed(key, style="toml", where=where) from None


def resolve_train(ws: Workspace | None, overrides: Mapping[str, Any] | None = None) -> TrainSettings:
    """:func:`resolve` for ``[train]``, where ``steps`` and ``epochs`` are alternatives: the one given at the
    higher level wins (``--epochs 1`` over the table's ``steps = 20``); both at the same level is an error."""
    table = load_section(ws, TrainSettings)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = {**table, **given}
    if "epochs" in given and "steps" not in given:
        values["steps"] = None
    elif "steps" in given and "epochs" not in given:
        values["epochs"] = None
    elif "epochs" in table and "steps" not in table and "steps" not in given:
        values["steps"] = None
    return _build(TrainSettings, values, table, given, section_where(ws, TrainSettings))


def train_table(settings: TrainSettings) -> dict[str, Any]:
    """A ``[train]`` table to write (TOML has no null: unset values are left out)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if v is not None}


def aggregate_table(settings: AggregateSettings) -> dict[str, Any]:
    """An ``[aggregate]`` table to write, with the paper's key ``lambda``."""
    data = dataclasses.asdict(settings)
    data["lambda"] = data.pop("lambda_")
    if data.get("rcond") == DEFAULT_RCOND:
        data.pop("rcond")
    # The defenses only where set (TOML has no null): a table without them is what it was before they existed.
    return {k: data[k] for k in ("method", "lambda", "ridge", "weighting", "rcond", "clip_update_norm", "robust") if data.get(k) is not None}


def resolve_model(ws: Workspace | None, overrides: Mapping[str, Any] | None = None) -> Any:
    """The workspace's ``[model]`` (a ModelSettings, keys checked) with ``overrides``; defaults without one."""
    from uniflow_cli.models.settings import ModelSettings

    table = ws.config().get("model", {}) if ws is not None else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return ModelSettings.from_dict({**table, **given})
    except ConfigError as exc:
        if exc.field is not None and exc.field in given:
            raise
        where = f"{ws.config_path if ws is not None else 'uniflow.toml'} [model]"
        raise exc.renamed(exc.field or "", style="toml", where=where) from None
