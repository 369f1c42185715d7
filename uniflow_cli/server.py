"""The server's round: read client adapter directories, fuse them, publish the global adapter.

This is the thin I/O layer over :mod:`uniflow_cli.aggregation` (pure math) and
:mod:`uniflow_cli.adapters` (the format): it checks the inputs' metadata, picks the client weights,
streams the tensors through the core and publishes the result atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uniflow_cli.adapters import AdapterMeta, AdapterReader, is_adapter_of_role, open_adapter, write_adapter
from uniflow_cli.aggregation import AggregationOptions, AggregationResult, ClientUpdate, aggregate
from uniflow_cli.atomic import StagedFile, check_writable_target
from uniflow_cli.errors import ConfigError, IncompatibleAdaptersError, UniflowError, UsageError, WorkspaceError
from uniflow_cli.global_info import GlobalInfo, common_settings, global_meta
from uniflow_cli.paths import overlap, read_regular
from uniflow_cli.peft_keys import PROJECTION_KEYS
from uniflow_cli.settings import UPLOAD_DTYPES as DTYPES
from uniflow_cli.settings import WEIGHTINGS, AggregateSettings
from uniflow_cli.workspace import Workspace


@dataclass(frozen=True)
class OutputOptions:
    """How the global is written: storage dtype, replacing an earlier global, the per-layer JSON report."""

    dtype: str = "float32"
    force: bool = False
    report_path: Path | None = None
    #: The report may replace an earlier aggregate report without ``force``: the round command sets it for
    #: its own ``rounds/t/report.json`` when round t has no global (that report describes a global now gone).
    replace_report: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError.invalid("dtype", self.dtype, f"is not one of {', '.join(DTYPES)}", example="float32")


@dataclass(frozen=True)
class WaitOptions:
    """A workspace round's waiting: for drops (quorum ``min_clients`` by ``timeout``) and for another server's lock."""

    wait: bool = False
    timeout: float = 600.0
    min_clients: int = 1
    poll: float = 2.0
    stale_after: float = 3600.0

    def __post_init__(self) -> None:
        from uniflow_cli.federation import check_wait_options

        check_wait_options(self.timeout, self.poll)
        if self.min_clients < 1:
            raise ConfigError.invalid("min_clients", self.min_clients, "must be >= 1", example=1)


def core_options(settings: AggregateSettings) -> AggregationOptions:
    """The pure core's options from the resolved ``[aggregate]`` settings."""
    return AggregationOptions(method=settings.method, lambda_=settings.lambda_, ridge=settings.ridge, rcond=settings.rcond,
                              clip_update_norm=settings.clip_update_norm, robust=settings.robust)


@dataclass
class AggregateOutcome:
    out: Path
    result: AggregationResult
    clients: list[dict[str, Any]]
    tensor_bytes: int
    residual_bytes: int
    notices: list[str] = field(default_factory=list)


def _json_number(value: Any) -> Any:
    """JSON has no inf/NaN: a singular Gram's condition number is reported as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _client_weights(readers: Sequence[AdapterReader], weighting: str, explicit: list[float] | None, notices: list[str]) -> list[float]:
    if explicit is not None:
        if len(explicit) != len(readers):
            raise ConfigError.invalid("weights", ConfigError.NO_VALUE, f"has {len(explicit)} values for {len(readers)} adapters",
                                      fix="give one weight per adapter, in order")
        return explicit
    if weighting not in WEIGHTINGS:
        raise ConfigError.invalid("weighting", weighting, f"is not one of {'|'.join(WEIGHTINGS)}", example="examples")
    if weighting == "uniform":
        return [1.0] * len(readers)
    plain = [r for r in readers if r.meta is None]
    if plain:
        notices.append(
            f"{len(plain)} input(s) are plain PEFT adapters without uniflow.json (e.g. {plain[0].path}); "
            "using uniform weights (pass --weights to set them)"
        )
        return [1.0] * len(readers)
    missing = [r for r in readers if r.meta is not None and r.meta.num_examples is None]
    if missing:
        raise UsageError(f"{missing[0].label} records no num_examples", fix="weight the clients uniformly or explicitly (weighting / weights)")
    return [float(r.meta.num_examples) for r in readers]  # type: ignore[union-attr]


def _check_metadata(readers: Sequence[AdapterReader], start: AdapterReader | None) -> None:
    seen: dict[str, AdapterReader] = {}
    for reader in readers:
        meta = reader.meta
        if meta is None:
            continue
        if meta.role != "client":
            raise UsageError(f"{reader.path} is a {meta.role} adapter, not a client drop", fix="aggregate client adapters only")
        if meta.client_id is not None:
            if meta.client_id in seen:
                raise IncompatibleAdaptersError(
                    f"client id {meta.client_id!r} appears twice ({seen[meta.client_id].path} and {reader.path})",
                    fix="pass each client's adapter once",
                )
            seen[meta.client_id] = reader
    fingerprints = {r.meta.base_fingerprint: r for r in readers if r.meta is not None and r.meta.base_fingerprint}
    if len(fingerprints) > 1:
        (fa, ra), (fb, rb) = list(fingerprints.items())[:2]
        raise IncompatibleAdaptersError(
            f"base_fingerprint differs: {ra.label} has {fa[:16]}…, {rb.label} has {fb[:16]}…",
            fix="aggregate only adapters trained on the same base model",
        )
    if start is not None and start.meta is not None and start.meta.base_fingerprint and fingerprints:
        (fa, ra) = next(iter(fingerprints.items()))
        if fa != start.meta.base_fingerprint:
            raise IncompatibleAdaptersError(
                f"base_fingerprint of {ra.label} differs from the starting global {start.path}", fix="start from the global these clients trained on"
            )
    rounds = {r.meta.round for r in readers if r.meta is not None and r.meta.round is not None}
    if len(rounds) > 1:
        raise IncompatibleAdaptersError(f"inputs come from different rounds {sorted(rounds)}", fix="aggregate one round's drops at a time")


def run_aggregate(
    inputs: Sequence[Path],
    out: Path,
    settings: AggregateSettings,
    *,
    weights: list[float] | None = None,
    output: OutputOptions = OutputOptions(),
    start: Path | None = None,
    round_: int | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> AggregateOutcome:
    """Validate every input, fuse, publish ``out`` atomically, write the report. Nothing is written on error."""
    import torch

    options = core_options(settings)
    _check_targets(inputs, out, output, start=start)
    notices: list[str] = []
    readers = [open_adapter(p) for p in inputs]
    start_reader = open_adapter(start) if start is not None else None
    _check_metadata(readers, start_reader)
    raw_weights = _client_weights(readers, settings.weighting, weights, notices)

    clients = [ClientUpdate(r.label, r, r.peft_config, vera=GlobalInfo.of(r.meta).vera) for r in readers]
    start_update = ClientUpdate(f"start {start_reader.path}", start_reader, start_reader.peft_config,
                                vera=GlobalInfo.of(start_reader.meta).vera) if start_reader else None
    result = aggregate(clients, raw_weights, options, start=start_update, on_layer=on_layer)

    torch_dtype = getattr(torch, output.dtype)
    # VeRA's shared projections stay float32 whatever --dtype: rounding them would change every layer's A, B.
    tensors = {k: v if k in PROJECTION_KEYS else v.to(torch_dtype) for k, v in result.tensors.items()}
    client_rows = [
        {"client_id": r.meta.client_id if r.meta else None, "path": str(r.path), "num_examples": r.meta.num_examples if r.meta else None, "weight": w}
        for r, w in zip(readers, result.weights)
    ]
    options_row = {"lambda": options.lambda_, "ridge": options.ridge, "rcond": options.rcond, "weighting": settings.weighting, "dtype": output.dtype}
    options_row.update({k: v for k, v in (("clip_update_norm", options.clip_update_norm), ("robust", options.robust)) if v is not None})
    metas = [r.meta for r in readers if r.meta is not None]
    meta = global_meta(
        result, round_=round_ if round_ is not None else _common_round(metas), clients=client_rows, options=options_row,
        base_fingerprint=next((m.base_fingerprint for m in metas if m.base_fingerprint), None),
        modalities=[mod for m in metas for mod in m.modalities], num_examples=_total_examples(metas),
        # The model the global is for: what the drops agree on, else what the clients started from.
        settings=common_settings(metas) or (GlobalInfo.of(start_reader.meta).settings if start_reader is not None else None),
    )
    written, sizes = _publish(out, result, tensors, meta, output)
    return AggregateOutcome(written, result, client_rows, sizes["tensors"], sizes["residual"], notices)


def _common_round(metas: Sequence[AdapterMeta]) -> int | None:
    rounds = {m.round for m in metas if m.round is not None}
    return rounds.pop() if len(rounds) == 1 else None


def _check_targets(inputs: Sequence[Path], out: Path, output: OutputOptions, *, start: Path | None) -> None:
    """Everything about the command's inputs and outputs that can be checked before any work."""
    if not inputs:
        raise UsageError("no client adapters to aggregate", fix="give the client adapter directories, or a round of a workspace")
    resolved = [Path(p).resolve() for p in inputs]
    if len(set(resolved)) != len(resolved):
        dup = next(p for p in resolved if resolved.count(p) > 1)
        raise UsageError(f"adapter {dup} is given twice", fix="pass each adapter once")
    check_outputs_apart(Path(out), output.report_path, [*inputs, *([start] if start is not None else [])])
    check_writable_target(Path(out), force=output.force, replaces=lambda p: is_adapter_of_role(p, "global"), kind="uniflow global adapter")
    if output.report_path is not None:
        check_writable_target(Path(output.report_path), force=output.force or output.replace_report, replaces=is_aggregate_report,
                              kind="uniflow aggregate report")


def _publish(out: Path, result: AggregationResult, tensors: dict[str, Any], meta: AdapterMeta, output: OutputOptions) -> tuple[Path, dict[str, int]]:
    """Publish the global and then the report, with nothing left to fail after the global's rename."""
    sizes: dict[str, int] = {}
    staged: list[StagedFile] = []
    report_path, force = output.report_path, output.force

    def stage_report(tmp: Path) -> None:
        # Runs before the global's rename: the report is written in full now and only renamed afterwards,
        # so a full disk or a bad --report can no longer fail after the global is published.
        sizes["tensors"] = (tmp / "adapter_model.safetensors").stat().st_size
        residual_file = tmp / "residual.safetensors"
        sizes["residual"] = residual_file.stat().st_size if residual_file.exists() else 0
        if report_path is not None:
            report = {
                **result.summary(),
                "out": str(out),
                "clients": GlobalInfo.of(meta).clients,
                "options": GlobalInfo.of(meta).options,
                "tensor_bytes": sizes["tensors"],
                "residual_bytes": sizes["residual"],
                "layers": [{k: _json_number(v) for k, v in layer.__dict__.items()} for layer in result.layers],
            }
            if result.defenses is not None:  # who was clipped, per layer, with the pre-clip norms
                report["defenses"] = result.defenses.report()
            text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
            staged.append(StagedFile(Path(report_path), text.encode(), force=force or output.replace_report, replaces=is_aggregate_report,
                                     kind="uniflow aggregate report"))

    try:
        written = write_adapter(
            out, peft_config=result.peft_config, tensors=tensors, meta=meta, residual=result.residual, force=force, on_staged=stage_report
        )
    except BaseException:
        for item in staged:
            item.discard()
        raise
    for item in staged:
        item.commit()
    return written, sizes


def _total_examples(metas: Sequence[AdapterMeta]) -> int | None:
    """Σ num_examples of the inputs, or None when unknown or beyond what uniflow.json may record (2^53)."""
    from uniflow_cli.adapters import MAX_EXAMPLES

    total = sum(m.num_examples for m in metas if m.num_examples)
    return total if 0 < total <= MAX_EXAMPLES else None


def is_aggregate_report(path: Path) -> bool:
    """Whether ``path`` is a report ``uniflow aggregate --report`` wrote (what --force may replace)."""
    try:
        data = json.loads(read_regular(path).decode("utf-8"))
    except (OSError, UniflowError, ValueError):
        return False
    return isinstance(data, dict) and {"method", "layers", "out"} <= set(data)


def check_outputs_apart(out: Path, report: Path | None, inputs: Sequence[Path]) -> None:
    """An output may not be, lie inside, or contain any input (after resolving): --force or not.

    Replacing ``out`` removes what is there, so ``--out`` equal to an input, or a parent of the inputs,
    would delete them; ``--out`` inside an input would write into it.
    """
    for given in inputs:
        relation = overlap(out, given)
        if relation is not None:
            raise UsageError(f"the output {out} {relation} the input {given}", fix="write the global to a directory apart from its inputs")
        if report is not None and overlap(report, given) is not None:
            raise UsageError(f"the report {report} {overlap(report, given)} the input {given}", fix="write the report outside the input adapters")
    if report is not None and overlap(report, out) is not None:
        raise UsageError(f"the report {report} {overlap(report, out)} the output {out}", fix="write the report beside the global, e.g. report.json")


@dataclass
class RoundOutcome:
    round: int
    outcome: AggregateOutcome | None  # None: the round was already published (a no-op)
    late: list[str]
    log: list[str]


def run_round(
    ws: Workspace,
    t: int,
    settings: AggregateSettings,
    *,
    weights: list[float] | None = None,
    output: OutputOptions = OutputOptions(),
    waiting: WaitOptions = WaitOptions(),
    log: Callable[[str], None] = lambda _m: None,
    on_layer: Callable[[int, int], None] | None = None,
) -> RoundOutcome:
    """The server's round in a workspace: wait for drops (quorum), lock, fuse, publish ``rounds/t/global``.

    A second server on the same round waits for the first (with ``waiting.wait``) or fails with a clear
    line; a rerun of a published round is a no-op that reports late drops. The per-layer report goes to
    ``output.report_path``, else ``rounds/t/report.json`` (kept every round: the fidelity ‖s·BA − U‖/‖U‖
    over rounds; ``uniflow simulate`` writes the same file).
    """
    from uniflow_cli.federation import QuorumError, RoundLock, expected_clients, late_drops, round_published, scan_round, wait_for_drops

    if t < 1:
        raise ConfigError.invalid("round", t, "is the initial adapter written by 'uniflow init'", fix="aggregate rounds >= 1")
    if output.report_path is None:
        # An unpublished round's own report is stale (its global was removed to redo the round): replaceable.
        output = replace(output, report_path=ws.round_report(t), replace_report=not round_published(ws, t))
    messages: list[str] = []

    def say(message: str) -> None:
        messages.append(message)
        log(message)

    def already_done() -> bool:
        return round_published(ws, t) and not output.force

    if already_done():
        return RoundOutcome(t, None, late_drops(ws, t), messages)
    if not ws.clients_dir(t).is_dir() and not waiting.wait:
        raise WorkspaceError(f"no client drops for round {t}: {ws.clients_dir(t)} does not exist", fix="run local-train for this round first, or wait for drops")
    expected = expected_clients(ws)
    if waiting.wait:  # waiting for drops holds no lock: two servers may wait side by side
        wait_for_drops(ws, t, expected=expected, min_clients=waiting.min_clients, timeout=waiting.timeout, poll=waiting.poll, log=say)
    lock = RoundLock(ws.round_dir(t) / ".aggregate.lock", stale_after=waiting.stale_after)
    if not _acquire(lock, t, waiting, already_done):
        return RoundOutcome(t, None, late_drops(ws, t), messages)
    for note in lock.notices:
        say(note)
    try:
        if already_done():  # the other server finished while we waited for the lock
            return RoundOutcome(t, None, late_drops(ws, t), messages)
        scan = scan_round(ws, t, expected)  # under the lock: the final list of complete drops
        if not waiting.wait:
            for path, reason in scan.rejected:
                say(f"ignoring drop {path}: {reason}")
        if len(scan.valid) < waiting.min_clients:
            raise QuorumError(f"round {t}: {len(scan.valid)} valid drop(s), quorum is {waiting.min_clients}", fix="wait for more clients or lower the quorum (min_clients)")
        for name in scan.unexpected:
            say(f"drop {name} is not a client of data/partition.json; included anyway")
        start = ws.global_dir(t - 1)
        outcome = run_aggregate(scan.valid, ws.global_dir(t), settings, weights=weights, output=output,
                                start=start if start.is_dir() else None, round_=t, on_layer=on_layer)
        return RoundOutcome(t, outcome, [], messages)
    finally:
        lock.release()


def _acquire(lock: Any, t: int, waiting: WaitOptions, already_done: Callable[[], bool]) -> bool:
    """Take the round's lock; False when another server published the round meanwhile (nothing to do).

    Without ``wait`` a held lock is an error at once; with it we poll until ``timeout``. A dead holder's
    lock is stale and taken over by ``RoundLock`` itself."""
    import time

    from uniflow_cli.federation import LockedError

    deadline = time.monotonic() + waiting.timeout
    while not lock.try_acquire():
        if not waiting.wait:
            raise LockedError(f"another server is aggregating round {t} (lock {lock.path})",
                              fix="wait for it (or let this server wait); remove the lock file only if that server is dead")
        if time.monotonic() >= deadline:
            raise LockedError(f"another server still holds round {t}'s lock after {waiting.timeout:g} s ({lock.path})",
                              fix="wait for it; remove the lock file only if that server is dead")
        if already_done():
            return False
        time.sleep(waiting.poll)
    return True
