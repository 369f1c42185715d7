"""FedA² / FedIT / FFA under Flower's SecAgg+ (uniflow_cli.flower.secagg), in process with Flower's real workflow and mod.

The server runs :class:`flwr.server.workflow.SecAggPlusWorkflow`; every message goes through the real ClientApp
(``secaggplus_mod`` included) of a node with its own persistent Context. The global must equal plain Flower's
(the same training, fused from the individual replies) within the quantisation tolerance, and nothing the server
receives may hold a client's tensor.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from tests import test_flower as tf
from tests.test_flower import REPO, _flwr_run, cfg, copy_of, drive
from uniflow_cli.adapters import read_adapter
from uniflow_cli.errors import ConfigError
from uniflow_cli.flower import secagg
from uniflow_cli.flower.client_app import app as client_app
from uniflow_cli.flower.settings import FlowerRunSettings

pytestmark = pytest.mark.flower
NODES = {101: "0", 102: "1"}  # shards of 4 and 5 examples: unequal weights
# Tolerance of the weighted sums: K·(2C/Q)·max_weight/Σn with K=2, C=1, Q=2^30 (automatic for 2 nodes), max_weight=8,
# Σn=9, plus float32 rounding of values below 1.
SUM_TOL = 2 * (2 * 1.0 / 2**30) * 8 / 9 + 1.2e-7


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """test_flower's workspace: tiny-random, image shards of 4, 5 and 6 examples, a test split."""
    from uniflow_cli.data.schema import make_row, rows_to_dataset

    ws = tmp_path_factory.mktemp("tpl") / "fed"
    tf.run("init", ws, "--preset", "tiny-random", "--modalities", "image")
    for k, n in tf.SIZES.items():
        rows = [make_row(id=f"c{k}-{i}", modality="image", question=f"What is {i} plus {k}?", answer=str(i + int(k)), image_bytes=tf._png(10 * int(k) + i))
                for i in range(n)]
        rows_to_dataset(rows).save_to_disk(str(ws / "data" / "clients" / k))
    return ws


flwr_env = tf.flwr_env  # test_flower's: a private FLWR_HOME and ports; every process started is stopped by PID


class SecAggGrid:
    """Enough of Flower's Grid: every message goes through the real ClientApp of its node (persistent node state);
    a raised exception becomes an error reply, as Flower makes it. ``received`` keeps every reply the server got."""

    def __init__(self, nodes: dict[int, str], run_config: dict) -> None:
        self.nodes = nodes
        self.contexts = {nid: Context(1, nid, {"partition-id": k}, RecordDict(), run_config) for nid, k in nodes.items()}
        self.received: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for sent in messages:  # a node gets its own copy, as after Flower's serialisation (the workflow shares one content)
            msg = Message(copy.deepcopy(sent.content), dst_node_id=sent.metadata.dst_node_id, message_type=sent.metadata.message_type,
                          group_id=sent.metadata.group_id)
            try:
                reply = client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - what Flower does with a ClientApp's exception
                reply = Message(Error(code=0, reason=str(exc)), reply_to=msg)
            replies.append(reply)
        self.received += replies
        return replies


def run_secagg(ws, run_config, nodes=NODES) -> SecAggGrid:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    grid = SecAggGrid(nodes, run_config)
    secagg.run_secagg_server(grid, Context(1, 0, {}, RecordDict(), run_config))
    return grid


def secagg_cfg(ws, method, rounds=1):
    return cfg(ws, method, rounds=rounds, secagg=True, **{"secagg-max-weight": 8.0})


@pytest.mark.parametrize("method, rounds", [("fedA2", 1), ("fedit", 1), ("ffa", 1), ("rolora", 2)])  # rolora: a B round, then an A round
def test_secagg_global_equals_plain_flower(template, tmp_path, method, rounds):
    plain_ws, sec_ws = copy_of(template, tmp_path / "plain"), copy_of(template, tmp_path / "sec")
    drive(plain_ws, cfg(plain_ws, method, rounds=rounds), NODES)
    run_secagg(sec_ws, secagg_cfg(sec_ws, method, rounds))
    for t in range(1, rounds + 1):
        plain, sec = read_adapter(plain_ws / "rounds" / str(t) / "global"), read_adapter(sec_ws / "rounds" / str(t) / "global")
        assert sec.peft_config == plain.peft_config and sorted(sec.tensors) == sorted(plain.tensors)
        for key, expected in plain.tensors.items():
            got = sec.tensors[key]
            assert got.dtype == torch.float32 and got.shape == expected.shape, key
            err = float((got.double() - expected.double()).abs().max())
            print(f"secagg {method} round {t} {key.rsplit('.', 2)[-2]}: max |Δ| {err:.3g} (max |x| {float(expected.abs().max()):.3g})")
            if method == "fedA2" and key.endswith("lora_B.weight"):  # solved from M: the sum's error times ‖(ĀĀᵀ)⁻¹‖ (ĀĀᵀ is well conditioned)
                assert err <= 1e-4 * max(float(expected.abs().max()), 1e-3), (key, err)
            elif t == 1:
                assert err <= SUM_TOL, (key, err)
            else:  # round 2's clients trained from round-1 globals that already differ by the sums' quantisation: training carries it on
                assert err <= SUM_TOL + 1e-5 * float(expected.abs().max()), (key, err)
        extra = sec.meta.extra
        assert extra["engine"]["secagg"]["exchanges"] == (2 if method == "fedA2" else 1)
        assert extra["engine"]["secagg"]["quantization_range"] == 2**30 and sec.meta.method == method
        assert [c["client_id"] for c in extra["clients"]] == ["0", "1"]
    if method == "rolora":  # round 2 trained A under round 1's B, which both paths kept bitwise
        g1, g2 = read_adapter(sec_ws / "rounds" / "1" / "global"), read_adapter(sec_ws / "rounds" / "2" / "global")
        assert all(torch.equal(g2.tensors[k], g1.tensors[k]) for k in g1.tensors if k.endswith("lora_B.weight"))


def test_the_server_never_holds_an_unmasked_client_tensor(template, tmp_path, monkeypatch):
    """Spy on both ends: what each client hands to secaggplus_mod (its float vector), and everything the server
    receives (every reply) and fuses (the seam: SecAgg+'s call of the strategy's aggregate_fit)."""
    ws = copy_of(template, tmp_path / "sec")
    uploads: list[dict[str, np.ndarray]] = []
    real_fitres = secagg._fitres

    def spy_fitres(tensors, n, metrics):
        uploads.append({k: t.detach().double().numpy() for k, t in tensors.items()})
        return real_fitres(tensors, n, metrics)

    seen: list[dict[str, np.ndarray]] = []
    real_aggregate = secagg._Exchange.aggregate_fit

    def spy_aggregate(self, server_round, results, failures):
        params = [r.parameters.tensors for _, r in results]
        assert all(p == params[0] for p in params)  # SecAgg+ hands the strategy the one aggregate, K times
        out = real_aggregate(self, server_round, results, failures)
        seen.append({k: t.double().numpy() for k, t in self.total.items()})
        return out

    monkeypatch.setattr(secagg, "_fitres", spy_fitres)
    monkeypatch.setattr(secagg._Exchange, "aggregate_fit", spy_aggregate)
    grid = run_secagg(ws, secagg_cfg(ws, "fedA2"))
    assert len(seen) > 0 and len(uploads) > 0
    for reply in grid.received:
        assert not reply.has_error(), reply.error
        content = reply.content
        assert all(len(rec) == 0 for rec in content.array_records.values())  # the mod cleared the float arrays
        if "fitres.num_examples" in content.metric_records:
            assert content.metric_records["fitres.num_examples"]["num_examples"] == 0  # n_k travels only inside the mask
        for rec in content.config_records.values():
            for value in rec.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes) and len(item) > 100:
                        try:
                            arr = np.load(__import__("io").BytesIO(item), allow_pickle=False)
                        except Exception:  # noqa: BLE001, S112 - ciphertexts and keys are not arrays
                            continue
                        assert arr.dtype.kind in "iu"  # masked integers mod 2^32, never a float tensor
    assert len(seen) == 2 and len(uploads) == 4  # fedA2: two exchanges, two clients each
    differing = 0
    for fused, (a, b) in zip(seen, [uploads[0:2], uploads[2:4]]):  # what the server fused is a sum, not one client's upload
        for key, total in fused.items():
            if not np.array_equal(a[key], b[key]):  # (tensors no client changed are equal to each upload and to their mean)
                differing += 1
                assert not np.allclose(total, a[key], atol=1e-9) and not np.allclose(total, b[key], atol=1e-9), key
    assert differing > 0


def test_a_node_failing_mid_exchange_halts_secagg_and_nothing_is_published(template, tmp_path, caplog):
    """Node 102 has no shard: its ClientApp raises in the masked-vector stage; with 2 nodes SecAgg+'s threshold (2)
    cannot be met, the workflow halts and the round keeps the old global (one warning line)."""
    ws = copy_of(template, tmp_path / "sec")
    run_secagg(ws, secagg_cfg(ws, "fedit"), nodes={101: "0", 102: "9"})
    assert not (ws / "rounds" / "1" / "global").exists()
    assert "secagg: SecAgg+ halted (too few nodes replied for its reconstruction threshold)" in caplog.text


@pytest.mark.parametrize("extra, message", [
    ({"method": "svd"}, "secagg=true with method 'svd': it needs the individual client adapters"),
    ({"method": "fedsa"}, "secagg=true with method 'fedsa'"),
    ({"secagg-reconstruction-threshold": 3}, "secagg with min-train-nodes=2 but secagg-reconstruction-threshold=3"),
    ({"dp": True}, "secagg=true with dp"),
])
def test_bad_secagg_configs_are_one_line(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        FlowerRunSettings.from_run_config({"workspace": str(tmp_path), "secagg": True, **extra})


def test_flwr_run_local_simulation_with_secagg(template, tmp_path, flwr_env):
    """The real thing: `flwr run . local` (2 simulated nodes, 1 round) with secagg=true publishes the global through
    Flower's serialised messages and its own SecAgg+ workflow, 2 exchanges (8 stages) for fedA2."""
    env, home, _ = flwr_env
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 2\n')
    ws = copy_of(template, tmp_path / "fed")
    app_dir = shutil.copytree(REPO / "examples" / "flower", tmp_path / "app")
    text = _flwr_run(env, app_dir, "local", f"workspace='{ws}' steps=2 num-server-rounds=1 method='fedA2' secagg=true secagg-max-weight=8.0",
                     tmp_path / "run.log")
    assert text.count("Secure aggregation completed") == 2, text[-3000:]
    sec = read_adapter(ws / "rounds" / "1" / "global")
    assert sec.meta.extra["engine"]["secagg"]["exchanges"] == 2
