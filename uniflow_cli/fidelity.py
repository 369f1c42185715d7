"""The function-space gap of one round's aggregation: how much worse the method's global does than the exact one.

The weight-space error (``rounds/t/report.json``: ‖s·BA − U‖/‖U‖ per layer) says how far a method's low-rank
global is from U = Σ_k w_k s_k B_k A_k; what a user cares about is what that costs the model. So for round t:

* the **method's model**: the published ``rounds/t/global`` on its base (earlier rounds folded as the method
  folds them: FedEx residuals, FLoRA merges — :func:`~uniflow_cli.models.history.fold_history`);
* the **exact model**: the same base with W₀ + U in every LoRA layer — FedEx's fusion of the same drops with the
  same weights (Ā, B̄ and the dense residual U − s·B̄Ā, which together are U exactly) and the same averaged
  non-LoRA tensors;
* the mean loss of both (teacher-forced answer-token cross-entropy for QA, the class cross-entropy for
  classify) on the round's clients' training shards and on the test split; the gap is method − exact.

Defined where the drops carry both factors (FedSA's drops lack B, so U is unknown to the server). For a method that
is exact by construction (FedEx, FFA, FLoRA) the gap is 0 up to float rounding, which makes a check of the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uniflow_cli.errors import UsageError

#: Rows per set (training shards, test splits) scored by default: an equal share of each, in order (deterministic).
DEFAULT_LIMIT = 200
BATCH = 8


@dataclass(frozen=True)
class Fidelity:
    round: int
    method: str
    loss_train: float
    loss_exact_train: float
    loss_test: float | None
    loss_exact_test: float | None
    rows_train: int
    rows_test: int

    @property
    def gap_train(self) -> float:
        return self.loss_train - self.loss_exact_train

    @property
    def gap_test(self) -> float | None:
        return None if self.loss_test is None or self.loss_exact_test is None else self.loss_test - self.loss_exact_test

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "gap_train": self.gap_train, "gap_test": self.gap_test}


def check_fidelity_method(spec: Any) -> None:
    """One line unless the method's drops carry A and B (U needs both)."""
    if spec.alternates:
        raise UsageError(f"the function-space gap needs every client's A and B, and {spec.name} uploads one factor a round "
                         "(its aggregation is exact: the gap is 0)", fix="measure it for fedit, fedA2, svd, fedex, ...")
    if not (spec.needs_A and spec.needs_B):
        raise UsageError(f"the function-space gap needs every client's A and B, and {spec.name} uploads only {' and '.join(spec.uploads)}",
                         fix="measure it for a method whose clients upload both factors (fedit, fedA2, svd, fedex, ...)")


def mean_loss(model: Any, rows: list[dict[str, Any]], *, device: Any, max_length: int | None = None) -> float:
    """The mean loss over ``rows``: per answer token for QA (the loss the model trains on, weighted by each
    batch's answer tokens), per sample for classify. ``model`` in eval mode; no gradients."""
    import torch

    from uniflow_cli.compute import to_device

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            batch = model.collate(rows[i:i + BATCH], train=True, max_length=max_length)
            labels = batch["labels"]
            n = int((labels != -100).sum()) if labels.dim() == 2 else int(labels.numel())
            if n == 0:
                continue
            loss = float(model(to_device(batch, device), full_logits=False).loss)
            total, count = total + loss * n, count + n
    return total / count if count else math.nan


def exact_global(drops: list[Path], start: Path, settings: Any) -> Any:
    """FedEx's fusion of ``drops`` (with the run's weighting), as a LoadedAdapter whose residual completes U."""
    from uniflow_cli.adapters import LoadedAdapter, open_adapter
    from uniflow_cli.aggregation import ClientUpdate, aggregate
    from uniflow_cli.global_info import GlobalInfo
    from uniflow_cli.server import _client_weights, core_options
    from uniflow_cli.settings import AggregateSettings

    exact = AggregateSettings(method="fedex", weighting=settings.weighting)
    readers = [open_adapter(p) for p in drops]
    weights = _client_weights(readers, exact.weighting, None, [])
    clients = [ClientUpdate(r.label, r, r.peft_config, vera=GlobalInfo.of(r.meta).vera) for r in readers]
    start_reader = open_adapter(start)
    start_update = ClientUpdate(f"start {start}", start_reader, start_reader.peft_config, vera=GlobalInfo.of(start_reader.meta).vera)
    result = aggregate(clients, weights, core_options(exact), start=start_update)
    return LoadedAdapter(path=None, peft_config=result.peft_config, tensors=result.tensors, meta=readers[0].meta, residual=result.residual)


def _model(ws: Any, t: int, final: Any, spec: Any, model_cfg: Any, lora: Any, *, device: Any) -> Any:
    """``final`` on the base with rounds 1..t−1 folded as ``spec`` folds them, and ``final``'s own residual."""
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.models import model_from_adapter
    from uniflow_cli.models.history import fold_history

    model = model_from_adapter(model_cfg, final, lora)
    chain = [(s, read_adapter(ws.global_dir(s))) for s in range(1, t)]
    folded = fold_history(model, chain, spec)
    if final.residual:
        from uniflow_cli.models.lora import add_to_base

        add_to_base(model, {k: v.float() for k, v in final.residual.items()}, where="the exact global's residual")
    del folded
    return model.to(device).eval()


def _rows(datasets: list[Any], limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` rows, an equal share from each dataset (⌈limit / K⌉, in order): every client's shard (every
    modality's test split) counts, not just the first's."""
    share = -(-limit // max(1, len(datasets)))
    out = [ds[i] for ds in datasets for i in range(min(share, len(ds)))]
    return out[:limit]


def measure_round(ws: Any, t: int, *, device: Any = "cpu", limit: int = DEFAULT_LIMIT) -> Fidelity:
    """Round ``t``'s function-space gap (module docstring) on ``limit`` training rows, an equal share from each of
    its clients' shards, and ``limit`` test rows, an equal share from each modality's split."""
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.aggregation.registry import method_spec
    from uniflow_cli.compute import resolve_device
    from uniflow_cli.data.build import load_split
    from uniflow_cli.global_info import GlobalInfo
    from uniflow_cli.settings import AggregateSettings, LoraSettings, resolve, resolve_model

    published = read_adapter(ws.global_dir(t))
    spec = method_spec(published.meta.method if published.meta is not None and published.meta.method else "fedit")
    check_fidelity_method(spec)
    clients = [str(c.get("client_id")) for c in GlobalInfo.of(published.meta).clients or [] if isinstance(c, dict)]
    drops = [ws.client_drop(t, k) for k in clients]
    model_cfg, lora = resolve_model(ws), resolve(LoraSettings, ws)
    device = resolve_device(device)
    train = _rows([load_split(ws.client_data(k)) for k in clients], limit)
    test_dirs = sorted(p for p in (ws.data_dir / "test").iterdir() if p.is_dir()) if (ws.data_dir / "test").is_dir() else []
    test = _rows([load_split(p) for p in test_dirs], limit)
    losses = {}
    for name, final in (("method", published), ("exact", exact_global(drops, ws.global_dir(t - 1), resolve(AggregateSettings, ws)))):
        model = _model(ws, t, final, spec, model_cfg, lora, device=device)
        losses[name] = (mean_loss(model, train, device=device), mean_loss(model, test, device=device) if test else None)
        del model
    return Fidelity(t, spec.name, losses["method"][0], losses["exact"][0], losses["method"][1], losses["exact"][1], len(train), len(test))


def write_fidelity(ws: Any, result: Fidelity) -> Path:
    """``rounds/t/fidelity.json`` (replaced atomically: it describes the published global, which a redone round replaces)."""
    import json

    from uniflow_cli.atomic import write_file_atomic

    path = ws.round_dir(result.round) / "fidelity.json"
    write_file_atomic(path, (json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n").encode(), force=True)
    return path
