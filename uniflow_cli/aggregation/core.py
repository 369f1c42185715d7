"""Validate, then compute: fuse K client adapters (given as tensor mappings) into a global adapter.

No paths and no printing. Clients are any ``Mapping[str, Tensor]`` with PEFT key names — an in-memory
dict (Flower, tests) or a lazily reading :class:`uniflow_cli.adapters.AdapterReader`. Layers are
processed one at a time, so memory holds the global plus one layer of every client, never K adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uniflow_cli.aggregation import linalg, robust
from uniflow_cli.aggregation.methods import METHODS, LayerInputs, Method
from uniflow_cli.aggregation.registry import DEFAULT_METHOD, MethodSpec, method_spec
from uniflow_cli.errors import AggregationError, ConfigError, IncompatibleAdaptersError, UsageError
from uniflow_cli.peft_keys import PEFT_PREFIX, base_weight_key, lora_key, lora_modules, lora_scaling
from uniflow_cli.settings import DEFAULT_RCOND, RIDGE_MODES  # also imported from here by callers

Tensor = torch.Tensor


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AggregationOptions:
    """Server options with the paper's names. ``lambda_`` is Eq. 13's Tikhonov λ.

    Errors name the field (``lambda_``), not a front end's spelling of it: the CLI tells them as its flag,
    Flower as its run-config key (:class:`uniflow_cli.errors.ConfigError`).
    """

    method: str = DEFAULT_METHOD
    lambda_: float = 1.0
    ridge: str = "auto"
    rcond: float = DEFAULT_RCOND
    clip_update_norm: float | None = None  # the update defenses (:mod:`.robust`): norm bound C per layer, or None
    robust: str | None = None  # median | trimmed-mean:β in place of every weighted sum, or None

    def __post_init__(self) -> None:
        method_spec(self.method)
        if not (_finite(self.lambda_) and self.lambda_ >= 0):
            raise ConfigError.invalid("lambda_", self.lambda_, "must be a finite number >= 0", example=1.0)
        if self.ridge not in RIDGE_MODES:
            raise ConfigError.invalid("ridge", self.ridge, f"is not one of {'|'.join(RIDGE_MODES)}", example="auto")
        if not (_finite(self.rcond) and 0 < self.rcond < 1):
            raise ConfigError.invalid("rcond", self.rcond, "must be in (0, 1)", example=DEFAULT_RCOND)
        robust.check_clip_norm(self.clip_update_norm)
        robust.check_robust_method(self.robust_spec, self.method)

    @property
    def robust_spec(self) -> robust.RobustSpec | None:
        return robust.parse_robust(self.robust)


@dataclass
class ClientUpdate:
    """One input adapter: a label for messages, its tensors and its PEFT config (and, for VeRA, its
    ``uniflow.json`` ``extra.vera`` record: the layers' shapes and the projections' sha256, :mod:`.vera_core`)."""

    label: str
    tensors: Mapping[str, Tensor]
    peft_config: Mapping[str, Any]
    vera: Mapping[str, Any] | None = None

    def shape(self, key: str) -> tuple[int, ...]:
        reader_shape = getattr(self.tensors, "shape", None)
        if callable(reader_shape):  # AdapterReader: from the header, without reading the tensor
            return tuple(reader_shape(key))
        return tuple(self.tensors[key].shape)

    def get(self, key: str) -> Tensor:
        tensor = self.tensors[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AggregationError(f"{self.label}: tensor {key} contains NaN or Inf", fix="drop this client or retrain it")
        return tensor


@dataclass
class LayerReport:
    module: str
    rank: int
    branch: str
    cond: float | None
    rel_error: float | None
    method: str | None = None  # the method that fused it (a per-module spec: this module's)


@dataclass
class AggregationResult:
    tensors: dict[str, Tensor]
    peft_config: dict[str, Any]
    method: str
    weights: list[float]
    layers: list[LayerReport]
    residual: dict[str, Tensor] | None = None
    merge_into_base: bool = False
    notes: list[str] = field(default_factory=list)
    vera: dict[str, Any] | None = None  # VeRA: the global's extra.vera record (the layers' shapes), :mod:`.vera_core`
    defenses: robust.DefenseLog | None = None  # --clip-update-norm / --robust: who was clipped, per layer

    def summary(self) -> dict[str, Any]:
        errors = [l.rel_error for l in self.layers if l.rel_error is not None and math.isfinite(l.rel_error)]
        branches: dict[str, int] = {}
        for layer in self.layers:
            branches[layer.branch] = branches.get(layer.branch, 0) + 1
        return {
            "method": self.method,
            "clients": len(self.weights),
            "weights": self.weights,
            "layers": len(self.layers),
            "branches": branches,
            "rel_error_mean": sum(errors) / len(errors) if errors else None,
            "rel_error_max": max(errors) if errors else None,
            "merge_into_base": self.merge_into_base,
            **({"defenses": self.defenses.summary()} if self.defenses is not None else {}),
        }


def normalize_weights(raw: Sequence[float]) -> Tensor:
    """w_k = raw_k / Σ raw (float64). Every raw weight must be finite and > 0.

    Dividing by the largest weight (when Σ overflows) keeps Σ finite for weights near the float64 limit (three weights
    of 1e308 would otherwise sum to inf and normalise to 0, zeroing the global). The result is checked:
    finite, > 0 and summing to 1 within 1e-12, or an error — never a silently wrong weighting.
    """
    if not raw:
        raise UsageError("no client weights", fix="give one weight per client")
    values = []
    for value in raw:
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an int beyond float64
            number = math.inf
        if not (math.isfinite(number) and number > 0):
            raise UsageError(f"client weight {value!r:.40} must be a finite number > 0", fix="give each client a positive weight, e.g. 3, 1, 2")
        values.append(number)
    w = torch.tensor(values, dtype=torch.float64)
    if not math.isfinite(float(w.sum())):
        w = w / w.max()  # only then: ordinary weights keep their exact bytes of earlier versions
    w = w / w.sum()
    if not (bool(torch.isfinite(w).all()) and bool((w > 0).all()) and abs(float(w.sum()) - 1.0) <= 1e-12):
        raise UsageError(f"client weights {values} do not normalise to finite positive shares summing to 1", fix="use weights of similar magnitude")
    return w


@dataclass(frozen=True)
class _Layer:
    module: str
    ranks: list[int]
    d_in: int | None
    d_out: int | None
    out_rank: int


def _plan(clients: Sequence[ClientUpdate], spec: MethodSpec, start: ClientUpdate | None) -> tuple[list[_Layer], list[str], dict[str, Method]]:
    """Check that the clients can be fused by ``spec``; return the layer plan, the non-LoRA keys and each
    layer's method (one method, or a per-module spec's: :mod:`.per_module`)."""
    modules, other = _common_layout(clients)
    spec.check_modules(modules)
    if spec.per_module:
        methods = {module: METHODS[spec.for_module(module).name] for module in modules}
    else:
        methods = dict.fromkeys(modules, _in_phase(METHODS[spec.name], clients))
    layers = [_plan_layer(clients, module, methods[module], start) for module in sorted(modules)]
    for side in ("A", "B"):
        frozen = [layer for layer in layers if getattr(methods[layer.module], f"frozen_{side}")]
        if frozen and start is not None:
            _check_start(start, frozen, side)
    return layers, sorted(other), methods


def _in_phase(method: Method, clients: Sequence[ClientUpdate]) -> Method:
    """An alternating method (RoLoRA) in the phase its drops are in: B rounds send only lora_B, A rounds only
    lora_A, and every client of a round the same (any other method: itself)."""
    if not method.alternates:
        return method
    phases: dict[str, list[str]] = {}
    for client in clients:
        pairs, _ = lora_modules(list(client.tensors))
        sent = {("A" if a else "") + ("B" if b else "") for a, b in pairs.values()}
        if len(sent) != 1 or next(iter(sent)) not in ("A", "B"):
            what = "no LoRA factor" if not sent else " / ".join(sorted({{"A": "lora_A", "B": "lora_B", "AB": "lora_A and lora_B"}[x] for x in sent}))
            raise IncompatibleAdaptersError(f"{method.name}: {client.label} uploaded {what}; a {method.name} client sends only lora_B in "
                                            "odd rounds and only lora_A in even rounds", fix=f"retrain it with method {method.name}")
        phases.setdefault(sent.pop(), []).append(client.label)
    if len(phases) > 1:
        raise IncompatibleAdaptersError(f"{method.name}: the drops are of different rounds' phases (sent lora_B: {', '.join(phases['B'])}; "
                                        f"sent lora_A: {', '.join(phases['A'])})", fix="aggregate the drops of one round together")
    return method.in_phase(next(iter(phases)))


def _common_layout(clients: Sequence[ClientUpdate]) -> tuple[dict[str, tuple[str | None, str | None]], list[str]]:
    """The first client's LoRA modules and non-LoRA keys, which every other client must share (same shapes)."""
    first = clients[0]
    modules0, other0 = lora_modules(list(first.tensors))
    if not modules0:
        raise IncompatibleAdaptersError(f"{first.label} holds no LoRA tensors", fix="pass LoRA adapter directories")
    for client in clients[1:]:
        modules, other = lora_modules(list(client.tensors))
        if set(modules) != set(modules0):
            extra = sorted(set(modules) - set(modules0))[:3]
            missing = sorted(set(modules0) - set(modules))[:3]
            raise IncompatibleAdaptersError(
                f"{client.label} targets different modules than {first.label} (extra {extra}, missing {missing})",
                fix="aggregate only adapters trained with the same target_modules",
            )
        if set(other) != set(other0):
            diff = sorted(set(other) ^ set(other0))[:3]
            raise IncompatibleAdaptersError(
                f"{client.label} has different non-LoRA tensors than {first.label} ({diff})",
                fix="aggregate only adapters trained with the same modules_to_save",
            )
        for key in other:
            if client.shape(key) != first.shape(key):
                raise IncompatibleAdaptersError(
                    f"{client.label}: {key} has shape {list(client.shape(key))}, {first.label} has {list(first.shape(key))}",
                    fix="aggregate only adapters of the same base model",
                )
    return modules0, other0


def _plan_layer(clients: Sequence[ClientUpdate], module: str, method: Method, start: ClientUpdate | None) -> _Layer:
    """One module's ranks and shapes across the clients, checked for ``method``."""
    ranks, d_ins, d_outs = [], set(), set()
    for client in clients:
        ranks.append(_client_rank(client, module, method, d_ins, d_outs))
    if len(d_ins) > 1 or len(d_outs) > 1:
        raise IncompatibleAdaptersError(
            f"{module}: shapes differ across clients (d_in {sorted(d_ins)}, d_out {sorted(d_outs)})",
            fix="aggregate only adapters of the same base model",
        )
    frozen = "A" if method.frozen_A else "B" if method.frozen_B else None
    if frozen is not None and len(set(ranks)) > 1:
        raise IncompatibleAdaptersError(
            f"{module}: {method.name} needs one frozen {frozen}, but client ranks differ ({sorted(set(ranks))})",
            fix="use fedit or fedA2 for heterogeneous ranks",
        )
    side = 0 if frozen == "A" else 1
    if frozen is not None and start is None and any(lora_modules(_keys_of(c, module))[0][module][side] is None for c in clients):
        raise UsageError(
            f"{method.name}: clients did not upload lora_{frozen} of {module} and no starting global was given",
            fix=f"give the global adapter the clients trained from as the start (it holds the frozen {frozen})",
        )
    out_rank = sum(ranks) if not method.pads else max(ranks)
    return _Layer(module, ranks, d_ins.pop() if d_ins else None, d_outs.pop() if d_outs else None, out_rank)


def _client_rank(client: ClientUpdate, module: str, method: Method, d_ins: set[int], d_outs: set[int]) -> int:
    """A client's rank of ``module`` (from A, else B); records its d_in / d_out in the given sets."""
    a_key, b_key = lora_modules(_keys_of(client, module))[0][module]
    if method.needs_A and a_key is None:
        raise IncompatibleAdaptersError(f"{client.label} has no lora_A for {module}", fix=f"method {method.name} needs every client's A")
    if method.needs_B and b_key is None:
        raise IncompatibleAdaptersError(f"{client.label} has no lora_B for {module}", fix=f"method {method.name} needs every client's B")
    rank = None
    if a_key is not None:
        shape = client.shape(a_key)
        if len(shape) != 2:
            raise IncompatibleAdaptersError(f"{client.label}: {a_key} has shape {list(shape)}, expected 2-D", fix="re-publish the adapter")
        rank = shape[0]
        d_ins.add(shape[1])
    if b_key is not None:
        shape = client.shape(b_key)
        if len(shape) != 2:
            raise IncompatibleAdaptersError(f"{client.label}: {b_key} has shape {list(shape)}, expected 2-D", fix="re-publish the adapter")
        if rank is not None and shape[1] != rank:
            raise IncompatibleAdaptersError(
                f"{client.label}: {module} has lora_A of rank {rank} but lora_B of rank {shape[1]}",
                fix="the adapter is inconsistent; re-publish it",
            )
        rank = shape[1]
        d_outs.add(shape[0])
    return rank  # type: ignore[return-value] - lora_modules yields A or B (or both) for every module


def _check_start(start: ClientUpdate, layers: Sequence[_Layer], side: str = "A") -> None:
    """The starting global holds the frozen A (``side``; RoLoRA's A rounds: B) of every layer, at the clients' rank."""
    for layer in layers:
        key = lora_key(layer.module, side)
        if key not in start.tensors:
            raise IncompatibleAdaptersError(f"{start.label} has no {key}", fix="start from the global adapter the clients trained from")
        expected = (layer.out_rank, layer.d_in or start.shape(key)[1]) if side == "A" else (layer.d_out or start.shape(key)[0], layer.out_rank)
        if start.shape(key) != expected:
            raise IncompatibleAdaptersError(
                f"{start.label}: {key} has shape {list(start.shape(key))}, clients expect rank {layer.out_rank}",
                fix="start from the global adapter the clients trained from",
            )


def _keys_of(client: ClientUpdate, module: str) -> list[str]:
    return [k for k in (lora_key(module, "A"), lora_key(module, "B")) if k in client.tensors]


def _output_config(reference: Mapping[str, Any], layers: Sequence[_Layer], stacks_ranks: bool) -> dict[str, Any]:
    """The published adapter's LoraConfig: the first client's, with the output ranks.

    Modules whose output rank differs from the top-level ``r`` get a ``rank_pattern`` entry so that PEFT
    builds exactly the stored shapes. FLoRA's stacked rank keeps the first client's scaling by scaling
    ``lora_alpha`` with the rank.
    """
    config = dict(reference)
    top = max(layer.out_rank for layer in layers)
    config["r"] = top
    rank_pattern = {}
    for layer in layers:
        if layer.out_rank != top:
            name = layer.module.split(PEFT_PREFIX, 1)[-1]
            rank_pattern[name] = layer.out_rank
    config["rank_pattern"] = rank_pattern
    if stacks_ranks:
        ref_r = int(reference["r"])
        factor = math.sqrt(top / ref_r) if reference.get("use_rslora") else top / ref_r
        config["lora_alpha"] = float(reference.get("lora_alpha", 8)) * factor
    return config


def _check_frozen_A(client: ClientUpdate, key: str, A: Tensor, reference: Tensor, ref_label: str, method: str = "ffa") -> None:
    if A.shape != reference.shape or not torch.equal(A.to(reference.dtype), reference):
        diff = float((A.to(torch.float64) - reference.to(torch.float64)).abs().max()) if A.shape == reference.shape else math.inf
        raise AggregationError(
            f"{method}: {client.label} changed the frozen {key} (max |ΔA| = {diff:.3g} vs {ref_label})",
            fix=f"{method} clients must not train A; retrain with method {method} (A frozen)",
        )


def check_output(tensors: Mapping[str, Tensor], residual: Mapping[str, Tensor]) -> None:
    """A global that is non-finite, or zero in every tensor, is never published: it can only come from
    broken inputs (overflowing factors, all-zero uploads) and would silently reset every client."""
    for key, tensor in [*tensors.items(), *residual.items()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AggregationError(f"the fused {key} is not finite (an input overflows float32)", fix="check the client adapters' values")
    if tensors and all(not bool(t.any()) for t in [*tensors.values(), *residual.values()]):
        raise AggregationError("every tensor of the fused global is zero", fix="check the client adapters: they hold only zeros")


def _layer_factors(clients: Sequence[ClientUpdate], layer: _Layer, method: Method, s_out: float, start_A: Tensor | None,
                   start_label: str) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Every client's A and B of one layer in the working dtype: scaling folded into B, ranks padded (unless stacked)."""
    a_key, b_key = lora_key(layer.module, "A"), lora_key(layer.module, "B")
    As: list[Tensor | None] = []
    Bs: list[Tensor | None] = []
    for client, rank in zip(clients, layer.ranks):
        A = client.get(a_key) if a_key in client.tensors else None
        B = client.get(b_key) if b_key in client.tensors else None
        if method.frozen_A and A is not None:
            reference, ref_label = (start_A, start_label) if start_A is not None else (As[0] if As and As[0] is not None else None, clients[0].label)
            if reference is not None:
                _check_frozen_A(client, a_key, A, reference, ref_label, method.name)
        # Fold the client's PEFT scaling into B relative to the output's, so that s_out · B_eff · A reproduces
        # the client's own s_k · B_k · A_k exactly; into A where B is frozen and not sent (RoLoRA's A rounds).
        factor = lora_scaling(client.peft_config, layer.module, rank) / s_out
        if B is not None:
            B = B.to(linalg.work_dtype(B)) * factor if factor != 1.0 else B.to(linalg.work_dtype(B))
        if A is not None:
            A = A.to(linalg.work_dtype(A))
            if method.frozen_B and factor != 1.0:
                A = A * factor
        if method.pads and rank != layer.out_rank:
            A_pad, B_pad = linalg.pad_rank(
                A if A is not None else torch.zeros((rank, layer.d_in or 1)),
                B if B is not None else torch.zeros((layer.d_out or 1, rank)),
                layer.out_rank,
            )
            A, B = (A_pad if A is not None else None), (B_pad if B is not None else None)
        As.append(A)
        Bs.append(B)
    return As, Bs


def aggregate(
    clients: Sequence[ClientUpdate],
    raw_weights: Sequence[float],
    options: AggregationOptions,
    *,
    start: ClientUpdate | None = None,
    compute_errors: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> AggregationResult:
    """Fuse ``clients`` with ``options.method``. Validates everything before any math.

    VeRA adapters (``peft_type`` VERA) go to :func:`.vera_core.aggregate_vera`, the same contract."""
    from uniflow_cli.aggregation.vera_core import aggregate_vera, is_vera

    if not clients:
        raise UsageError("no client adapters given", fix="pass one or more adapter directories")
    if len(raw_weights) != len(clients):
        raise UsageError(f"{len(raw_weights)} weights for {len(clients)} clients", fix="give exactly one weight per client")
    if is_vera(clients, start):
        _no_defenses_for_vera(options)
        return aggregate_vera(clients, raw_weights, options, start=start, compute_errors=compute_errors, on_layer=on_layer)
    spec = method_spec(options.method)
    weights = normalize_weights(raw_weights)
    layers, other_keys, methods = _plan(clients, spec, start)
    defense = _defense_log(options, clients, start)
    combine, bound = robust.combiner(options.robust_spec), options.clip_update_norm
    out_config = _output_config(clients[0].peft_config, layers, spec.stacks_ranks)

    tensors: dict[str, Tensor] = {}
    residual: dict[str, Tensor] = {}
    reports: list[LayerReport] = []
    for index, layer in enumerate(layers):
        method = methods[layer.module]
        a_key, b_key = lora_key(layer.module, "A"), lora_key(layer.module, "B")
        s_out = lora_scaling(out_config, layer.module, layer.out_rank)
        start_A = start.get(a_key) if (start is not None and method.frozen_A) else None
        start_B = _start_B(start, layer) if method.frozen_B else None
        As, Bs = _layer_factors(clients, layer, method, s_out, start_A, start.label if start is not None else "")
        target = None
        if bound is not None and start is not None and defense is not None:
            clipped = _clip_layer(start, layer, method, s_out, As, Bs, bound, defense)
            As, Bs, target = clipped.As, clipped.Bs, clipped.target
        fused = method.fuse(LayerInputs(As, Bs, weights, start_A, options.lambda_, options.ridge, options.rcond, combine=combine, target=target,
                                        start_B=start_B))
        tensors[a_key] = fused.A
        if fused.B is not None:
            tensors[b_key] = fused.B
        if fused.residual is not None:
            delta = fused.residual * s_out
            if out_config.get("fan_in_fan_out"):
                delta = delta.T  # stored in the orientation of the base weight it is added to
            residual[base_weight_key(layer.module)] = delta.to(torch.float32).contiguous()
        error = None
        # U needs the factor every client trained under but did not send: the start's frozen A (FFA, FedSVD, RoLoRA's
        # B rounds) or B (RoLoRA's A rounds) — never the fused one, which FedSVD re-factorises.
        frozen_A = start_A.to(linalg.work_dtype(start_A)) if start_A is not None else None
        As = [frozen_A if a is None and frozen_A is not None else a for a in As]
        Bs = [start_B if b is None and start_B is not None else b for b in Bs]
        UBs, UAs = target if target is not None else (Bs, As)  # the clipped target U, when clipping
        if compute_errors and fused.B is not None and all(x is not None for x in (*UBs, *UAs)):
            error = linalg.relative_error(fused.B, fused.A, UBs, UAs, weights)  # type: ignore[arg-type]
        reports.append(LayerReport(layer.module, layer.out_rank, fused.branch, fused.cond, error, method.name))
        if on_layer is not None:
            on_layer(index + 1, len(layers))

    for key in other_keys:
        values = [client.get(key) for client in clients]
        if bound is not None and start is not None and defense is not None:
            values = _clip_other(start, key, values, bound, defense)
        tensors[key] = combine(values, weights)

    check_output(tensors, residual)
    return AggregationResult(
        tensors=tensors,
        peft_config=out_config,
        method=spec.name,
        weights=[float(w) for w in weights],
        layers=reports,
        residual=residual or None,
        merge_into_base=spec.merges_into_base,
        notes=[note for m in {m.name: m for m in methods.values()}.values() for note in _notes(m)],
        defenses=defense,
    )


def _start_B(start: ClientUpdate, layer: _Layer) -> Tensor:
    """The start's B of one layer as stored (RoLoRA's A rounds): client k trained s_k · B · A_k with exactly these
    values, so the global keeps them and :func:`_layer_factors` folds s_k / s_out into A_k instead."""
    B = start.get(lora_key(layer.module, "B"))
    return B.to(linalg.work_dtype(B))


def _no_defenses_for_vera(options: AggregationOptions) -> None:
    for name in ("clip_update_norm", "robust"):
        if getattr(options, name) is not None:
            raise ConfigError.invalid(name, getattr(options, name), "is not supported for VeRA adapters (defined for LoRA: the factors' "
                                      "updates and sums of docs/aggregation.md, \"Defenses\")", fix="aggregate VeRA adapters without the update defenses")


def _defense_log(options: AggregationOptions, clients: Sequence[ClientUpdate], start: ClientUpdate | None) -> robust.DefenseLog | None:
    """Checks the defenses against the inputs (before any math); the log the report is made of, or None."""
    spec = options.robust_spec
    robust.check_robust_clients(spec, len(clients))
    if options.clip_update_norm is not None and start is None:
        raise ConfigError.invalid("clip_update_norm", options.clip_update_norm, "measures each update from the global the clients started "
                                  "from, and none was given", fix="give that global as the start (uniflow aggregate --start DIR; --round T "
                                  "uses rounds/T-1/global)")
    if spec is None and options.clip_update_norm is None:
        return None
    return robust.DefenseLog([client.label for client in clients], options.clip_update_norm, spec)


def _clip_mode(method: Method) -> str:
    """What a client's update of a LoRA layer is made of (:func:`.robust.clip_layer`)."""
    if method.stacks_ranks:
        return "zero"  # FLoRA: the last global is merged into the base, clients train a fresh LoRA (B = 0)
    if not method.needs_B:
        return "A"  # FedSA: B never leaves the client, the server sees A's deviation only
    return "B" if method.frozen_A else "pair"


def _clip_layer(start: ClientUpdate, layer: _Layer, method: Method, s_out: float, As: list[Tensor | None], Bs: list[Tensor | None],
                bound: float, defense: robust.DefenseLog) -> robust.ClippedLayer:
    mode = _clip_mode(method)
    A0s, B0s = _start_pairs(start, layer, s_out, mode)
    clipped = robust.clip_layer(As, Bs, A0s, B0s, bound, s_out, mode)
    defense.add(layer.module, clipped.norms, clipped.scales, clipped.factor_scales)
    return clipped


def _start_pairs(start: ClientUpdate, layer: _Layer, s_out: float, mode: str) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Each client's start pair of one layer, in the units :func:`_layer_factors` hands the methods: the start's
    first r_k components (where a client of rank r_k began, aggregation/truncate.py), its scaling folded
    relative to ``s_out``, zero-padded to the output rank. None where the start's ΔW is 0 (``zero``)."""
    if mode == "zero":
        return [None] * len(layer.ranks), [None] * len(layer.ranks)
    a_key, b_key = lora_key(layer.module, "A"), lora_key(layer.module, "B")
    fix = "start from the global adapter the clients trained from (clip_update_norm measures each update from it)"
    for key in (a_key,) if mode == "A" else (a_key, b_key):
        if key not in start.tensors:
            raise IncompatibleAdaptersError(f"{start.label} has no {key}", fix=fix)
    A0 = start.get(a_key).to(linalg.work_dtype(start.get(a_key)))
    r0 = A0.shape[0]
    B0 = None
    if mode != "A":
        raw = start.get(b_key)
        B0 = raw.to(linalg.work_dtype(raw)) * (lora_scaling(start.peft_config, layer.module, r0) / s_out)
    if (layer.d_in is not None and A0.shape[1] != layer.d_in) or (B0 is not None and B0.shape != (layer.d_out or B0.shape[0], r0)) \
            or max(layer.ranks) > r0:
        raise IncompatibleAdaptersError(f"{start.label}: {layer.module} (rank {r0}, A {list(A0.shape)}) is not what clients of rank "
                                        f"{max(layer.ranks)} started from", fix=fix)
    A0s, B0s = [], []
    for rank in layer.ranks:
        A_k, B_k = A0[:rank], (B0[:, :rank] if B0 is not None else torch.zeros((1, rank), dtype=A0.dtype))
        if rank != layer.out_rank:
            A_k, B_k = linalg.pad_rank(A_k, B_k, layer.out_rank)
        A0s.append(A_k)
        B0s.append(B_k if B0 is not None else None)
    return A0s, B0s


def _clip_other(start: ClientUpdate, key: str, values: list[Tensor], bound: float, defense: robust.DefenseLog) -> list[Tensor]:
    """A non-LoRA tensor (projector, head) of every client, its deviation from the start's clipped by its own norm."""
    if key not in start.tensors or start.shape(key) != tuple(values[0].shape):
        raise IncompatibleAdaptersError(f"{start.label} has no {key} of shape {list(values[0].shape)}",
                                        fix="start from the global adapter the clients trained from (clip_update_norm measures each update from it)")
    reference = start.get(key)
    rows = [robust.clip_tensor(value, reference, bound) for value in values]
    defense.add(key, [norm for _, norm, _ in rows], [c for _, _, c in rows])
    return [value for value, _, _ in rows]


def _notes(method: Method) -> list[str]:
    """What the publisher of this global must tell its users, from the method's properties."""
    notes = []
    if method.private_B:
        notes.append(f"{method.name}: the global carries A and shared tensors only; each client keeps its own B")
    if method.local_adapter:
        notes.append(f"{method.name}: the global adapter only; each client keeps its own local adapter, active beside it")
    if method.merges_into_base:
        stacked = "stacked rank; " if method.stacks_ranks else ""
        notes.append(f"{method.name}: {stacked}merge into the base weights before the next round")
    if method.residual:
        notes.append(f"{method.name}: residual.safetensors must be added to the frozen base weights")
    if method.phase is not None:
        other = "A" if method.phase == "B" else "B"
        notes.append(f"{method.name}: a round of {method.phase} ({other} frozen, kept from the start); the next round trains {other}")
    return notes
