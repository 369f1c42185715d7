"""Validate, then compute, for VeRA adapters: the layer driver around :func:`.vera.fuse_vera_layer`.

:func:`uniflow_cli.aggregation.core.aggregate` hands over here when the adapters are PEFT VeRA adapters
(``peft_type`` VERA). Like the LoRA core it takes any ``Mapping[str, Tensor]`` per client, validates every
client before any math, then fuses layer by layer (one layer of every client in memory), averages the other
trainable tensors (``modules_to_save``) and returns an :class:`~.core.AggregationResult`. No paths, no printing.

Two things a VeRA layer needs are not in the clients' vectors:

* **the shared projections** ``vera_A`` / ``vera_B``. Clients never upload them (``MethodSpec.shares``):
  they come from the start — the global the clients trained from, which carries them since round 0 — and
  only without a start from drops that carry them (plain PEFT VeRA directories). Every copy a drop carries
  must equal them bitwise, and a drop that records the sha256 of the projections it trained with
  (``extra.vera.projections``, uniflow's drops do) must record theirs: a drop made against other projections
  is refused, never fused. The published global repeats them unchanged.
* **each layer's shape** (d_out, d_in): d has length r and b length d_out, but A's width d_in is in no
  tensor. uniflow records it in every VeRA adapter's ``extra.vera.layers`` (``uniflow init``, every drop,
  every global): the start's record, else the drops' (all records given must agree).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from uniflow_cli.aggregation import linalg, vera
from uniflow_cli.aggregation.registry import MethodSpec, check_family
from uniflow_cli.errors import IncompatibleAdaptersError, UsageError
from uniflow_cli.peft_keys import (
    VERA_A_KEY,
    VERA_B_KEY,
    adapter_family,
    base_weight_key,
    vera_key,
    vera_modules,
)

if TYPE_CHECKING:
    from uniflow_cli.aggregation.core import (
        AggregationOptions,
        AggregationResult,
        ClientUpdate,
    )

Tensor = torch.Tensor
_MAX_DIM = 1 << 24  # no real layer is wider; a larger recorded shape is a broken record


# ------------------------------------------------------------------------------------------ the record
def projection_digest(vera_A: Tensor, vera_B: Tensor) -> str:
    """sha256 of the two projections' shapes and float32 bytes: what a drop records it trained with.

    float32 whatever they are stored in, so a copy read back from any storage dtype that holds them
    exactly (float32 always does) has the same digest."""
    digest = hashlib.sha256()
    for tensor in (vera_A, vera_B):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(json.dumps(list(values.shape)).encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class VeraRecord:
    """``extra.vera`` of a uniflow VeRA adapter: each layer's (d_out, d_in) and, in drops, the projections' sha256."""

    layers: dict[str, tuple[int, int]]
    projections: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"layers": {m: list(s) for m, s in sorted(self.layers.items())}}
        if self.projections is not None:
            data["projections"] = self.projections
        return data

    @classmethod
    def of(cls, raw: Any, where: str) -> VeraRecord | None:
        """The record ``raw`` (another party's JSON), checked; None when there is none."""
        if raw is None:
            return None
        fix = "re-publish the adapter with uniflow"
        if not isinstance(raw, Mapping) or not isinstance(raw.get("layers"), Mapping):
            raise IncompatibleAdaptersError(f"{where}: extra.vera is not an object with a 'layers' table", fix=fix)
        layers = {}
        for module, shape in raw["layers"].items():
            ok = isinstance(shape, (list, tuple)) and len(shape) == 2 and all(
                isinstance(n, int) and not isinstance(n, bool) and 0 < n <= _MAX_DIM for n in shape)
            if not ok:
                raise IncompatibleAdaptersError(f"{where}: extra.vera.layers[{str(module)[:80]!r}] = {str(shape)[:40]} is not [d_out, d_in]", fix=fix)
            layers[str(module)] = (shape[0], shape[1])
        digest = raw.get("projections")
        if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise IncompatibleAdaptersError(f"{where}: extra.vera.projections is not a sha256 hex digest", fix=fix)
        return cls(layers, digest)


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class _Plan:
    modules: list[str]
    other: list[str]
    vera_A: Tensor
    vera_B: Tensor
    layers: dict[str, tuple[int, int]]
    rank: int


def is_vera(clients: Sequence[ClientUpdate], start: ClientUpdate | None) -> bool:
    """Whether the inputs are VeRA adapters; one family across clients and start, or an error."""
    everyone = [*clients, *([start] if start is not None else [])]
    families = [adapter_family(c.peft_config) for c in everyone]
    odd = next((i for i, family in enumerate(families) if family != families[0]), None)
    if odd is not None:
        raise IncompatibleAdaptersError(f"{everyone[0].label} is a {families[0].upper()} adapter but {everyone[odd].label} is {families[odd].upper()}",
                                        fix="aggregate adapters of one family (one federation)")
    return families[0] == "vera"


def _check_configs(clients: Sequence[ClientUpdate], start: ClientUpdate | None) -> int:
    """Every config names the same rank and projection key (the projections are one matrix pair); the rank."""
    everyone = [*clients, *([start] if start is not None else [])]
    first = everyone[0]
    for key in ("r", "projection_prng_key"):
        for other in everyone[1:]:
            if other.peft_config.get(key) != first.peft_config.get(key):
                raise IncompatibleAdaptersError(
                    f"{other.label} has {key}={other.peft_config.get(key)!r}, {first.label} has {first.peft_config.get(key)!r}",
                    fix="aggregate only VeRA adapters of one federation (one round-0 global)")
    return int(first.peft_config["r"])


def _layout(clients: Sequence[ClientUpdate]) -> tuple[list[str], list[str]]:
    """The VeRA modules and other keys every client shares (other keys with the same shapes)."""
    first = clients[0]
    modules0, _, other0 = vera_modules(list(first.tensors))
    if not modules0:
        raise IncompatibleAdaptersError(f"{first.label} holds no VeRA vectors", fix="pass VeRA adapter directories")
    for client in clients[1:]:
        modules, _, other = vera_modules(list(client.tensors))
        if set(modules) != set(modules0) or set(other) != set(other0):
            diff = sorted(set(modules) ^ set(modules0))[:2] + sorted(set(other) ^ set(other0))[:2]
            raise IncompatibleAdaptersError(f"{client.label} has other VeRA layers or modules_to_save than {first.label} ({diff})",
                                            fix="aggregate only adapters trained with the same target_modules and modules_to_save")
        for key in other:
            if client.shape(key) != first.shape(key):
                raise IncompatibleAdaptersError(f"{client.label}: {key} has shape {list(client.shape(key))}, {first.label} has {list(first.shape(key))}",
                                                fix="aggregate only adapters of the same base model")
    return sorted(modules0), sorted(other0)


def _projections(clients: Sequence[ClientUpdate], start: ClientUpdate | None, rank: int) -> tuple[Tensor, Tensor]:
    """The federation's projections (module docstring), checked against every copy and record of them."""
    carriers = ([start] if start is not None else []) + [c for c in clients if VERA_A_KEY in c.tensors or VERA_B_KEY in c.tensors]
    if not carriers or (start is not None and not all(k in start.tensors for k in (VERA_A_KEY, VERA_B_KEY))):
        who = start.label if start is not None else "no client"
        raise UsageError(f"VeRA aggregation needs the shared projections {VERA_A_KEY} / {VERA_B_KEY}, and {who} carries them",
                         fix="give the global the clients trained from as the start (every uniflow VeRA global carries them)")
    source = carriers[0]
    vera_A, vera_B = source.get(VERA_A_KEY), source.get(VERA_B_KEY)
    if vera_A.dim() != 2 or vera_B.dim() != 2 or vera_A.shape[0] != rank or vera_B.shape[1] != rank:
        raise IncompatibleAdaptersError(f"{source.label}: projections of shapes {list(vera_A.shape)}, {list(vera_B.shape)} do not have rank r={rank}",
                                        fix="re-create the round-0 global")
    digest = projection_digest(vera_A, vera_B)
    for client in carriers[1:]:
        for key, mine in ((VERA_A_KEY, vera_A), (VERA_B_KEY, vera_B)):
            theirs = client.get(key) if key in client.tensors else None
            if theirs is None or theirs.shape != mine.shape or not torch.equal(theirs.to(mine.dtype), mine):
                raise IncompatibleAdaptersError(f"{client.label} carries other VeRA projections ({key}) than {source.label}",
                                                fix="a client must train from the federation's global (its projections); retrain it")
    for client in clients:
        record = VeraRecord.of(client.vera, client.label)
        if record is not None and record.projections is not None and record.projections != digest:
            raise IncompatibleAdaptersError(f"{client.label} trained with other VeRA projections (sha256 {record.projections[:12]}…) than "
                                            f"{source.label} holds ({digest[:12]}…)", fix="retrain the client from this federation's global")
    return vera_A, vera_B


def _layer_shapes(clients: Sequence[ClientUpdate], start: ClientUpdate | None, modules: Sequence[str],
                  vera_A: Tensor, vera_B: Tensor) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module: the records agree, cover every module and fit the projections."""
    shapes: dict[str, tuple[int, int]] = {}
    told: dict[str, str] = {}
    for who in [*([start] if start is not None else []), *clients]:
        record = VeraRecord.of(who.vera, who.label)
        for module, shape in (record.layers.items() if record is not None else ()):
            if module in shapes and shapes[module] != shape:
                raise IncompatibleAdaptersError(f"{who.label} records {module} as {list(shape)}, {told[module]} as {list(shapes[module])}",
                                                fix="aggregate only adapters of the same base model")
            shapes.setdefault(module, shape)
            told.setdefault(module, who.label)
    for module in modules:
        if module not in shapes:
            raise IncompatibleAdaptersError(f"no input records the shape of VeRA layer {module} (uniflow.json extra.vera.layers)",
                                            fix="give the uniflow global the clients trained from as the start")
        vera.slice_projections(vera_A, vera_B, shapes[module][1], shapes[module][0])  # fits, or one line
    return {m: shapes[m] for m in modules}


def _plan(clients: Sequence[ClientUpdate], start: ClientUpdate | None) -> _Plan:
    rank = _check_configs(clients, start)
    modules, other = _layout(clients)
    vera_A, vera_B = _projections(clients, start, rank)
    return _Plan(modules, other, vera_A, vera_B, _layer_shapes(clients, start, modules, vera_A, vera_B), rank)


# ------------------------------------------------------------------------------------------ the driver
def _fuse_module(clients: Sequence[ClientUpdate], start: ClientUpdate | None, plan: _Plan, module: str, spec: MethodSpec,
                 raw_weights: Sequence[float], options: AggregationOptions) -> tuple[vera.VeraLayerInputs, vera.VeraLayerOutput]:
    """One module's inputs (as uploaded) and its fused vectors."""
    d_key, b_key = vera_key(module, "d"), vera_key(module, "b")
    d_out, d_in = plan.layers[module]
    A, B = vera.slice_projections(plan.vera_A, plan.vera_B, d_in, d_out)
    start_d = start.get(d_key) if (spec.frozen_A and start is not None and d_key in start.tensors) else None
    inputs = vera.VeraLayerInputs(
        A, B, [c.get(d_key) if d_key in c.tensors else None for c in clients], [c.get(b_key) if b_key in c.tensors else None for c in clients],
        list(raw_weights), start_d=start_d, labels=[c.label for c in clients], module=module)
    return inputs, vera.fuse_vera_layer(inputs, options)


def _layer_error(x: vera.VeraLayerInputs, out: vera.VeraLayerOutput, spec: MethodSpec, weights: Tensor) -> float | None:
    """‖Λ_b B Λ_d A − U‖/‖U‖ of the fused layer (FFA's clients all have the frozen d); None without b."""
    ds = [out.d if (d is None and spec.frozen_A) else d for d in x.ds]
    if out.b is None or any(v is None for v in (*ds, *x.bs)):
        return None
    return vera.vera_relative_error(x.A, x.B, out.d, out.b, ds, x.bs, weights)  # type: ignore[arg-type]


def aggregate_vera(clients: Sequence[ClientUpdate], raw_weights: Sequence[float], options: AggregationOptions, *,
                   start: ClientUpdate | None = None, compute_errors: bool = True,
                   on_layer: Callable[[int, int], None] | None = None) -> AggregationResult:
    """Fuse VeRA ``clients`` with ``options.method`` (:mod:`.vera`), validating everything before any math."""
    from uniflow_cli.aggregation.core import (
        AggregationResult,
        LayerReport,
        check_output,
        normalize_weights,
    )

    spec = check_family(options.method, "vera")
    weights = normalize_weights(raw_weights)
    plan = _plan(clients, start)
    config = {**clients[0].peft_config, "save_projection": True}  # the global carries the projections (module docstring)
    tensors: dict[str, Tensor] = {VERA_A_KEY: plan.vera_A.to(torch.float32).clone(), VERA_B_KEY: plan.vera_B.to(torch.float32).clone()}
    residual: dict[str, Tensor] = {}
    reports: list[LayerReport] = []
    for index, module in enumerate(plan.modules):
        x, out = _fuse_module(clients, start, plan, module, spec, raw_weights, options)
        tensors[vera_key(module, "d")] = out.d
        if out.b is not None:
            tensors[vera_key(module, "b")] = out.b
        if out.residual is not None:  # d_out × d_in; stored as the base weight is (transposed for fan_in_fan_out)
            delta = out.residual.T if config.get("fan_in_fan_out") else out.residual
            residual[base_weight_key(module)] = delta.to(torch.float32).contiguous()
        error = _layer_error(x, out, spec, weights) if compute_errors else None
        reports.append(LayerReport(module, plan.rank, out.branch, out.cond, error))
        if on_layer is not None:
            on_layer(index + 1, len(plan.modules))
    for key in plan.other:
        tensors[key] = linalg.weighted_average([client.get(key) for client in clients], weights)
    check_output({k: v for k, v in tensors.items() if k not in (VERA_A_KEY, VERA_B_KEY)}, residual)
    return AggregationResult(tensors=tensors, peft_config=config, method=spec.name, weights=[float(w) for w in weights], layers=reports,
                             residual=residual or None, merge_into_base=False, notes=_notes(spec),
                             vera=VeraRecord(plan.layers).to_json())


def _notes(spec: MethodSpec) -> list[str]:
    """The VeRA wording of the LoRA core's notes (d plays A, b plays B)."""
    notes = []
    if spec.private_B:
        notes.append(f"{spec.name}: the global carries d, the projections and shared tensors only; each client keeps its own b")
    if spec.local_adapter:
        notes.append(f"{spec.name}: the global adapter only; each client keeps its own local adapter (its own d and b), active beside it")
    if spec.residual:
        notes.append(f"{spec.name}: residual.safetensors must be added to the frozen base weights")
    return notes
