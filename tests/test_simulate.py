"""``uniflow simulate``: the same bytes as the file-drop commands, resuming after an interruption, the seeded
client sample, the one-model pool, and bad input refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.workspace_factory import write_shard
from tests.cli_runner import ok, run

CLIENTS = {"0": "image", "1": "text", "2": "image"}
ROUNDS = 2


@pytest.fixture(autouse=True)
def _reproducible(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # uniflow.json's "created": the same second on both paths
    monkeypatch.setenv("UNIFLOW_THREADS", "1")  # both paths on one thread (the sums' order is part of the bytes)


# ---------------------------------------------------------------------------------------------- workspaces
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("site")


_templates: dict[str, Path] = {}


def template(site: Path, method: str) -> Path:
    """``uniflow init`` (tiny-random, 2 steps of batch 2, ``method``) + three hand-made shards and two test splits."""
    if method not in _templates:
        ws = site / "templates" / method
        ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--method", method, "--steps", "2", "--batch-size", "2")
        for client, modality in CLIENTS.items():
            write_shard(ws / "data" / "clients" / client, modality, offset=4 * int(client))
        for modality in ("image", "text"):
            write_shard(ws / "data" / "test" / modality, modality, n=4, offset=100)
        clients = [{"id": int(c), "modalities": [m]} for c, m in CLIENTS.items()]
        (ws / "data" / "partition.json").write_text(json.dumps({"clients": clients}))
        _templates[method] = ws
    return _templates[method]


def fresh(site: Path, method: str, name: str) -> Path:
    """A copy of the method's template at ``site/name/fed``: the same absolute path for every run under
    ``name`` (a global records its drops' paths), after moving an earlier run there aside."""
    ws = site / name / "fed"
    if ws.exists():
        shutil.rmtree(ws)
    shutil.copytree(template(site, method), ws)
    return ws


def file_drop(ws: Path, method: str, rounds: int, *extra: str, clients=lambda t: list(CLIENTS)) -> None:
    """What examples/run_rounds.sh runs: local-train per client, then aggregate --round, each round."""
    for t in range(1, rounds + 1):
        for client in clients(t):
            ok("local-train", "--client", client, "-w", ws, "--round", t, *extra)
        ok("aggregate", "--round", t, "-w", ws, "--method", method, "--min-clients", 1)


_references: dict[tuple[str, str], Path] = {}


def reference(site: Path, method: str, precision: str = "fp32") -> tuple[Path, Path]:
    """(where a simulation of this setting must run, the file-drop run made there and moved aside)."""
    name = f"{method}-{precision}"
    if (method, precision) not in _references:
        ws = fresh(site, method, name)
        file_drop(ws, method, ROUNDS, "--precision", precision)
        ws.rename(site / name / "file-drop")
        _references[(method, precision)] = site / name / "file-drop"
    return site / name / "fed", _references[(method, precision)]


def tree(root: Path, *parts: str) -> dict[str, bytes]:
    """Every file under ``root/parts...`` (hidden ones too), by relative path."""
    base = root.joinpath(*parts)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()} if base.is_dir() else {}


def comparable(path: str, data: bytes) -> bytes:
    """A file's bytes, but a drop's uniflow.json without its wall time (``train.seconds``: the one field
    that no run can repeat). Everything else, tensors and JSON alike, is compared byte for byte."""
    if not path.endswith("uniflow.json"):
        return data
    meta = json.loads(data)
    train = meta.get("extra", {}).get("train")
    if isinstance(train, dict):
        train.pop("seconds")
    return json.dumps(meta, sort_keys=True).encode()


def assert_same_files(a: Path, b: Path, *parts: str) -> None:
    left, right = tree(a, *parts), tree(b, *parts)
    assert sorted(left) == sorted(right)
    differ = [p for p in left if comparable(p, left[p]) != comparable(p, right[p])]
    assert not differ, f"differ: {differ}"


def assert_equal_runs(simulated: Path, dropped: Path) -> None:
    assert_same_files(simulated, dropped, "rounds")
    assert_same_files(simulated, dropped, "state")  # FedSA's private B, and no copies left behind
    assert not (simulated / "state" / "simulate").exists()


# ---------------------------------------------------------------------------------------------- ≡ file drop
@pytest.mark.parametrize(("method", "precision"), [("fedA2", "fp32"), ("fedex", "fp32"), ("flora", "fp32"), ("fedsa", "fp32"), ("feddpa", "fp32"), ("rolora", "fp32"), ("encoders=fedsa,llm=fedA2", "fp32"), ("fedex", "bf16")])
def test_simulate_writes_the_bytes_of_the_file_drop_commands(site, method, precision):
    from uniflow_cli.simulate import run_simulation

    where, dropped = reference(site, method, precision)
    ws = fresh(site, method, where.parent.name)
    outcome = run_simulation(ws, ROUNDS, method=method, precision=precision)
    assert_equal_runs(ws, dropped)
    assert [r.round for r in outcome.records] == [1, 2] and all(r.clients == list(CLIENTS) for r in outcome.records)
    # One model for the whole run; a method that folds history builds once more to learn what it folds
    # (FLoRA's fresh LoRA is seeded by the round: one build per round).
    assert outcome.model_builds == {"fedex": 2, "flora": 3}.get(method, 1)
    for record in outcome.records:  # the aggregation error of every round, beside its global
        report = json.loads(record.report.read_text())
        meta = json.loads((record.global_dir / "uniflow.json").read_text())
        assert report["rel_error_mean"] == meta["extra"]["aggregation"]["rel_error_mean"] == record.rel_error_mean
        assert len(report["layers"]) == meta["extra"]["aggregation"]["layers"] > 0


def test_a_sampled_fedsa_client_starts_from_its_own_state_not_the_last_clients(site):
    """--fraction 0.5 (seed 0): round 1 trains 0, 1; round 2 trains 0, then 2, which has no B of its own yet:
    it must start from PEFT's zero B like a fresh process, not from the B client 0 just trained."""
    from uniflow_cli.simulate import run_simulation, select_clients

    picks = {t: select_clients(list(CLIENTS), 0.5, 0, t) for t in (1, 2)}
    assert picks == {1: ["0", "1"], 2: ["0", "2"]}
    ws = fresh(site, "fedsa", "fedsa-sampled")
    file_drop(ws, "fedsa", ROUNDS, clients=picks.get)
    ws.rename(ws.parent / "file-drop")
    ws = fresh(site, "fedsa", "fedsa-sampled")
    run_simulation(ws, ROUNDS, fraction=0.5)
    assert_equal_runs(ws, ws.parent / "file-drop")


def test_the_pool_hands_out_what_a_fresh_build_gives(site):
    """After a FedEx client folded a residual into the base and trained, the pool's next model equals a
    fresh load_model in every parameter and buffer; a replaced layer (what --quantize does) rebuilds."""
    import torch

    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.aggregation.registry import method_spec
    from uniflow_cli.models import load_model
    from uniflow_cli.models.history import fold_history
    from uniflow_cli.models.settings import ModelSettings
    from uniflow_cli.settings import LoraSettings
    from uniflow_cli.simulate import ModelPool

    _, dropped = reference(site, "fedex")
    settings, lora = ModelSettings(preset="tiny-random", modalities=["image"]), LoraSettings()
    pool = ModelPool()

    def state(model):
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    model = pool.load(settings, lora, 0)
    fold_history(model, [(1, read_adapter(dropped / "rounds" / "1" / "global"))], method_spec("fedex"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # what training does to the trainable tensors
    for _ in range(2):  # the first load learns what the fold touched (a rebuild), the second restores it
        model = pool.load(settings, lora, 0)
        fresh_state = state(load_model(settings, lora, 0))
        assert sorted(state(model)) == sorted(fresh_state)
        assert all(torch.equal(t, fresh_state[n]) for n, t in state(model).items())
        fold_history(model, [(1, read_adapter(dropped / "rounds" / "1" / "global"))], method_spec("fedex"))
    assert pool.builds == 2
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    assert pool.load(settings, lora, 0) is not model and pool.builds == 3
    assert pool.load(settings, lora, 1) is not None and pool.builds == 4  # another seed: another model


# ---------------------------------------------------------------------------------------------- resuming
class Interrupted(Exception):
    pass


@pytest.mark.parametrize("where", ["second client", "aggregate"])
def test_an_interrupted_simulation_resumes_to_the_same_bytes(site, where):
    """FedSA, interrupted in round 2 (its second client's first step, or the aggregation after every drop
    and B was written); the rerun trains round 2 again from the B each client had before it."""
    from uniflow_cli.simulate import run_simulation

    place, dropped = reference(site, "fedsa")
    ws = fresh(site, "fedsa", place.parent.name)

    def interrupt(event):
        if event.round == 2 and ((where == "second client" and event.kind == "step" and event.client == "1")
                                 or (where == "aggregate" and event.kind == "aggregate")):
            raise Interrupted

    with pytest.raises(Interrupted):
        run_simulation(ws, ROUNDS, method="fedsa", on_progress=interrupt)
    assert (ws / "rounds" / "1" / "global").is_dir() and not (ws / "rounds" / "2" / "global").exists()
    assert not [p for p in (ws / "rounds").rglob(".*") if p.name != ".aggregate.lock"]  # no half-written output
    assert not (ws / "rounds" / "2" / ".aggregate.lock").exists()
    advanced = [k for k in CLIENTS if json.loads((ws / "state" / "clients" / k / "uniflow.json").read_text())["round"] == 2]
    assert advanced == (["0"] if where == "second client" else list(CLIENTS))
    status = json.loads(ok("status", "-w", ws, "--json").stdout)
    assert [r["round"] for r in status["rounds"] if r["published"]] == [0, 1]

    outcome = run_simulation(ws, ROUNDS, method="fedsa")
    assert outcome.resumed_from == 1 and [r.round for r in outcome.records] == [2]
    assert outcome.records[0].retrained == (["0"] if where == "second client" else list(CLIENTS))
    assert_equal_runs(ws, dropped)
    again = run_simulation(ws, ROUNDS, method="fedsa")  # complete: nothing to do, nothing changed
    assert again.records == [] and again.model_builds == 0
    assert_equal_runs(ws, dropped)


def test_a_state_advanced_outside_the_simulation_is_refused(site):
    """A client finished round 2 by local-train (drop + B) while round 2 is open: simulate cannot train it
    again (its B from before is gone) and says how to finish the round; nothing is written."""
    ws = fresh(site, "fedsa", "fedsa-outside")
    file_drop(ws, "fedsa", 1)
    ok("local-train", "--client", "0", "-w", ws, "--round", 2)
    before = tree(ws)
    result = run("simulate", "-w", ws, "--rounds", 2)
    assert result.exit_code == 1 and "already at round 2" in result.output and "uniflow aggregate --round 2" in result.output
    assert tree(ws) == before


# ---------------------------------------------------------------------------------------------- sampling
def test_select_clients_is_a_seeded_per_round_sample():
    from uniflow_cli.simulate import sample_size, select_clients

    clients = [str(k) for k in range(10)]
    assert [sample_size(10, f) for f in (0.01, 0.1, 0.25, 0.5, 1.0)] == [1, 1, 3, 5, 10]
    assert select_clients(clients, None, 0, 1) == clients == select_clients(clients, 1.0, 0, 1)
    picks = {t: select_clients(clients, 0.3, 7, t) for t in range(1, 6)}
    assert all(len(p) == 3 and p == sorted(p, key=int) for p in picks.values())
    assert picks == {t: select_clients(clients, 0.3, 7, t) for t in range(1, 6)}  # the same arguments, the same sample
    assert len({tuple(p) for p in picks.values()}) > 1 and picks[1] != select_clients(clients, 0.3, 8, 1)
    # The second computation: the three ids with the smallest sha256 of "seed:round:id".
    digest = lambda k: hashlib.sha256(f"7:1:{k}".encode()).hexdigest()
    assert picks[1] == sorted(sorted(clients, key=digest)[:3], key=int)


def test_fraction_trains_the_recorded_sample_and_is_repeatable(site):
    from uniflow_cli.simulate import select_clients

    runs = []
    for name in ("fraction-a", "fraction-b"):
        ws = fresh(site, "fedA2", name)
        payload = json.loads(ok("simulate", "-w", ws, "--rounds", ROUNDS, "--fraction", 0.5, "--json").stdout)
        picked = [r["clients"] for r in payload["published"]]
        assert picked == [select_clients(list(CLIENTS), 0.5, 0, t) for t in (1, 2)] and all(len(p) == 2 for p in picked)
        for t, clients in enumerate(picked, start=1):  # the global records whom it fused, the drops are just those
            meta = json.loads((ws / "rounds" / str(t) / "global" / "uniflow.json").read_text())
            assert [c["client_id"] for c in meta["extra"]["clients"]] == clients
            assert sorted(p.name for p in (ws / "rounds" / str(t) / "clients").iterdir()) == clients
        runs.append({p: comparable(p, b) for p, b in tree(ws, "rounds").items() if not p.endswith(("uniflow.json", "report.json"))})
    assert runs[0] == runs[1]  # tensors and configs (paths differ between the two workspaces, bytes do not)


# ---------------------------------------------------------------------------------------------- evaluation
def test_eval_every_writes_what_evaluate_writes_and_status_and_report_read_it(site, tmp_path):
    ws = fresh(site, "fedA2", "evaluated")
    payload = json.loads(ok("simulate", "-w", ws, "--rounds", 3, "--eval-every", 2, "--eval-limit", 1, "--max-new-tokens", 2, "--json").stdout)
    assert [Path(p).name for p in payload["evaluations"]] == ["round-2.json", "round-3.json"]
    evaluated = json.loads((ws / "eval" / "round-3.json").read_text())
    ok("evaluate", "-w", ws, "--round", 3, "--limit", 1, "--max-new-tokens", 2, "--out", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == evaluated["metrics"]
    status = json.loads(ok("status", "-w", ws, "--json").stdout)
    assert [r["round"] for r in status["rounds"] if r.get("metrics")] == [2, 3]
    ok("report", ws, "--out", tmp_path / "report")
    assert (tmp_path / "report" / "report.md").is_file()


def test_eval_every_also_evaluates_each_feddpa_clients_personalised_model(site, tmp_path):
    """FedDPA (and FedSA) have one model per client: simulate writes what evaluate --client K writes, per trained client."""
    ws = fresh(site, "feddpa", "evaluated-clients")
    payload = json.loads(ok("simulate", "-w", ws, "--rounds", 1, "--eval-every", 1, "--eval-limit", 1, "--max-new-tokens", 2, "--json").stdout)
    names = sorted(Path(p).relative_to(ws / "eval").as_posix() for p in payload["evaluations"])
    assert names == ["clients/0/round-1.json", "clients/1/round-1.json", "clients/2/round-1.json", "round-1.json"]
    evaluated = json.loads((ws / "eval" / "clients" / "1" / "round-1.json").read_text())
    ok("evaluate", "-w", ws, "--round", 1, "--client", 1, "--limit", 1, "--max-new-tokens", 2, "--out", tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["metrics"] == evaluated["metrics"] and evaluated["adapter"]["client"] == "1"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--rounds", "0"], "--rounds 0 must be a whole number >= 1", 2),
        (["--rounds", "-3"], "--rounds -3 must be a whole number >= 1", 2),
        (["--rounds", "2", "--clients", "0,7"], "--clients names client '7', which data/partition.json does not list", 2),
        (["--rounds", "2", "--clients", "../x"], "client id '../x' is not a plain name", 1),
        (["--rounds", "2", "--fraction", "0"], "--fraction 0.0 must be in (0, 1]", 2),
        (["--rounds", "2", "--fraction", "1.5"], "--fraction 1.5 must be in (0, 1]", 2),
        (["--rounds", "2", "--fraction", "nan"], "--fraction nan must be in (0, 1]", 2),
        (["--rounds", "2", "--method", "fedavg"], "--method 'fedavg' is not one of fedit, ffa", 2),
        (["--rounds", "2", "--eval-every", "0"], "--eval-every 0 must be a whole number >= 1", 2),
        (["--rounds", "2", "--precision", "fp16", "--device", "cpu"], "--precision 'fp16' needs a CUDA device", 2),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(site, args, message, code):
    ws = fresh(site, "fedA2", "bad")
    before = tree(ws)
    result = run("simulate", "-w", ws, *args)
    assert result.exit_code == code, result.output
    assert message in result.output and result.output.strip().count("\n") == 0 and "Traceback" not in result.output, result.output
    assert tree(ws) == before


def test_no_workspace_is_one_line(tmp_path):
    result = run("simulate", "--rounds", "2")  # the test's cwd holds no uniflow.toml
    assert result.exit_code == 1 and "no workspace" in result.output and result.output.strip().count("\n") == 0, result.output
    result = run("simulate", "-w", tmp_path / "nowhere", "--rounds", "2")
    assert result.exit_code == 1 and "has no uniflow.toml" in result.output and not (tmp_path / "nowhere").exists()


def test_a_foreign_drop_in_the_next_round_is_refused(site):
    ws = fresh(site, "fedA2", "foreign")
    ok("local-train", "--client", "2", "-w", ws, "--round", 1)
    before = tree(ws)
    result = run("simulate", "-w", ws, "--rounds", 1, "--clients", "0,1")
    assert result.exit_code == 1 and "rounds/1/clients/2 is not a client this simulation trains in round 1" in result.output
    assert tree(ws) == before
