"""``uniflow partition`` and ``uniflow data show`` end to end (tiny counts: seconds, not minutes)."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
from typer.testing import CliRunner

from uniflow_cli.cli.app import app
from uniflow_cli.data.build import load_split


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UNIFLOW_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def _ids(path):
    return set(load_split(path)["id"])


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _ds, fs in os.walk(root) for f in fs)


def test_multimodal_partition_into_workspace(tmp_path):
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "uniflow.toml").write_text("")
    res = run(
        "partition", "-d", "easy-vqa", "-d", "spoken-qa", "-d", "text-qa", "--clients", "image:2,audio:1,mixed:1",
        "--scheme", "dirichlet", "--alpha", "0.5", "--train-per-client", "6", "--test-per-modality", "3",
        "--seed", "0", "--workspace", "fed", "--plot",
    )
    assert res.exit_code == 0, res.output
    data = tmp_path / "fed" / "data"
    info = json.loads((data / "partition.json").read_text())
    assert [c["id"] for c in info["clients"]] == [0, 1, 2, 3]
    assert [c["modalities"] for c in info["clients"]] == [["image"], ["image"], ["audio"], ["image", "audio", "text"]]
    assert info["clients"][3]["counts"] == {"image": 2, "audio": 2, "text": 2}
    assert (info["scheme"], info["alpha"], info["seed"]) == ("dirichlet", 0.5, 0)
    assert [s["name"] for s in info["sources"]] == ["easy-vqa", "spoken-qa", "text-qa"]
    assert sum(info["clients"][0]["label_histogram"].values()) == 6
    assert set(info["modalities"]) == {"image", "audio", "text"}
    for c in info["clients"]:
        ds = load_split(data / "clients" / str(c["id"]))
        assert len(ds) == c["count"] and sorted(set(ds["modality"])) == sorted(c["modalities"])
    train_ids = set().union(*(_ids(data / "clients" / str(k)) for k in range(4)))
    assert len(train_ids) == 6 + 6 + 6 + 6  # no row is in two shards
    for m in ("image", "audio", "text"):
        test = load_split(data / "test" / m)
        assert len(test) == 3 and set(test["modality"]) == {m}
        assert not (set(test["id"]) & train_ids)
    # text and speech share questions: a text test question is never spoken in training either
    spoken_train_q = {q for k in (2, 3) for q, mod in zip(*(load_split(data / "clients" / str(k))[c] for c in ("question", "modality"))) if mod == "audio"}
    assert not (set(load_split(data / "test" / "text")["question"]) & spoken_train_q)
    assert (data / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "entropy" in res.output and "test/audio: 3 rows" in res.output
    assert not [p for p in (tmp_path / "fed").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    args = ["partition", "-d", "text-qa", "--clients", "text:3", "--scheme", "quantity", "--alpha", "1",
            "--train-per-client", "20", "--test-per-modality", "5", "--plot"]
    assert run(*args, "--out", "a").exit_code == 0
    assert run(*args, "--out", "b").exit_code == 0
    assert run(*args, "--seed", "1", "--out", "c").exit_code == 0
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", _tree(tmp_path / "a"), shallow=False)
    assert not mismatch and not errors
    assert (tmp_path / "a" / "partition.json").read_text() != (tmp_path / "c" / "partition.json").read_text()
    sizes = [c["count"] for c in json.loads((tmp_path / "a" / "partition.json").read_text())["clients"]]
    assert sum(sizes) == 60


def test_user_jsonl_with_label_column_and_show(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        Image.new("RGB", (5, 5), (20 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"prompt": f"shade {i}?", "reply": str(i), "pic": f"img/{i}.png", "group": "ab"[i % 2]})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run("partition", "-d", "qa.jsonl", "--question-column", "prompt", "--answer-column", "reply",
              "--media-column", "pic", "--label-column", "group", "--clients", "image:2", "--test-per-modality", "2", "--out", "d")
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "d" / "partition.json").read_text())
    assert [c["count"] for c in info["clients"]] == [5, 5] and info["label_column"] == "group"
    ds = load_split(tmp_path / "d" / "clients" / "0")
    assert set(ds["label"]) <= {"a", "b"}
    res = run("data", "show", "d/clients/0", "--n", "2", "--preview", "prev")
    assert res.exit_code == 0, res.output
    assert "5 rows" in res.output and "image 5×5" in res.output
    assert len(list((tmp_path / "prev").glob("*.png"))) == 2


def test_data_show_audio_preview(tmp_path):
    assert run("partition", "-d", "spoken-qa", "--clients", "audio:1", "--train-per-client", "2",
               "--test-per-modality", "1", "--out", "d").exit_code == 0
    res = run("data", "show", "d/test/audio", "--preview", "prev")
    assert res.exit_code == 0, res.output
    assert "audio" in res.output and "peak" in res.output
    assert len(list((tmp_path / "prev").glob("*.wav"))) == 1


def test_data_show_missing_dir():
    res = run("data", "show", "nowhere")
    assert res.exit_code == 1 and "no dataset directory at nowhere" in res.output


# ---------------------------------------------------------------- bad inputs: message, exit code, no output
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-d", "cifar-99", "--clients", "image:2"], 2, "unknown dataset 'cifar-99'"),
        (["-d", "text-qa", "--clients", "text:2", "--scheme", "dirichlet", "--alpha", "0"], 2, "--alpha 0.0 must be a finite number > 0"),
        (["-d", "text-qa", "--clients", "text:2", "--scheme", "quantity", "--alpha", "-1"], 2, "--alpha -1.0 must be"),
        (["-d", "text-qa", "--clients", "image:2"], 2, "asks for image clients but no image dataset"),
        (["-d", "text-qa", "--clients", "text:2", "--scheme", "shards"], 2, "--scheme 'shards' is not one of iid, dirichlet, quantity"),
        (["-d", "text-qa", "--clients", "text"], 2, "bad --clients entry 'text'"),
        (["-d", "text-qa", "--clients", "text:2", "--test-per-modality", "999999"], 1, "only 5884 test candidates"),
        (["-d", "text-qa", "--clients", "text:2", "--train-per-client", "999999"], 1, "need 1999998 samples but only"),
        (["-d", "text-qa", "--clients", "text:2", "--label-column", "colour"], 1, "label column 'colour' not in dataset text-qa (present: answer, kind)"),
    ],
)
def test_bad_options(tmp_path, args, code, message):
    res = run("partition", *args, "--out", "d")
    assert res.exit_code == code, res.output
    assert message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d")]


def test_more_clients_than_samples(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\na?,1\nb?,2\nc?,3\nd?,4\n")
    res = run("partition", "-d", "qa.csv", "--clients", "text:4", "--test-per-modality", "1", "--out", "d")
    assert res.exit_code == 1
    assert "text training data (qa, 3 rows after the test split): more clients (4) than samples (3)" in " ".join(res.output.split())
    assert not (tmp_path / "d").exists()


def test_missing_columns_via_cli(tmp_path):
    (tmp_path / "qa.csv").write_text("prompt,reply\na?,1\n")
    res = run("partition", "-d", "qa.csv", "--clients", "text:1", "--out", "d")
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and "'question', 'answer' missing from qa.csv (present: prompt, reply)" in out
    assert "--question-column" in out


def test_unreadable_image_leaves_no_output(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q?", "answer": "a", "image": "bad.png"}) + "\n" + json.dumps({"question": "r?", "answer": "b", "image": "bad.png"}) + "\n")
    res = run("partition", "-d", "qa.jsonl", "--clients", "image:1", "--test-per-modality", "1", "--out", "d")
    assert res.exit_code == 1 and "unreadable image" in res.output and "bad.png" in res.output and "row " in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "qa.jsonl"]  # no d/, no hidden temp dir


def test_empty_dataset_via_cli(tmp_path):
    (tmp_path / "qa.jsonl").write_text("")
    res = run("partition", "-d", "qa.jsonl", "--clients", "text:1", "--out", "d")
    assert res.exit_code == 1 and "is empty (0 rows)" in res.output


def test_existing_workspace_data_needs_force(tmp_path):
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "uniflow.toml").write_text("")
    args = ["partition", "-d", "text-qa", "--clients", "text:2", "--train-per-client", "4", "--test-per-modality", "2", "--workspace", "fed"]
    assert run(*args).exit_code == 0
    before = (tmp_path / "fed" / "data" / "partition.json").read_text()
    res = run(*args, "--seed", "3")
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output
    assert (tmp_path / "fed" / "data" / "partition.json").read_text() == before
    res = run(*args, "--seed", "3", "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "fed" / "data" / "partition.json").read_text())["seed"] == 3


def test_existing_data_is_checked_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    from uniflow_cli.data import build

    monkeypatch.setattr(build, "resolve_sources", lambda _r: pytest.fail("loaded data before checking the target"))
    res = run("partition", "-d", "text-qa", "--clients", "text:1", "--out", "d")
    assert res.exit_code == 1 and "already exists" in res.output


def test_espeak_missing_via_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    res = run("partition", "-d", "spoken-qa", "--clients", "audio:1", "--train-per-client", "1", "--test-per-modality", "1", "--out", "d")
    assert res.exit_code == 1
    assert "espeak-ng is not installed" in res.output and "Fix: apt-get install espeak-ng" in res.output
    assert not (tmp_path / "d").exists()


def test_no_output_target():
    res = run("partition", "-d", "text-qa", "--clients", "text:1")
    assert res.exit_code == 2 and "no --out and no workspace" in res.output
