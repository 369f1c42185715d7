"""Eval JSON I/O, the report library (table cells, PNGs) and the ``uniflow report`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniflow_cli.cli.app import app
from uniflow_cli.errors import DataError, OutputExistsError, UsageError
from uniflow_cli.evaluation_io import build_eval_payload, read_eval_json, write_eval_json
from uniflow_cli.metrics import METRIC_DEFINITIONS
from uniflow_cli.report import build_report, build_table, load_run, make_report, parse_metrics, render_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(acc: float, f1: float, modalities=("audio", "image")) -> dict:
    """A summary where modality i gets acc + i and bert_f1 = f1 + i (easy to check in cells)."""
    out = {}
    for i, m in enumerate(modalities):
        out[m] = {"acc": acc + i, "em": 10.0, "bleu": 1.5, "rouge_l": 20.0, "bert_p": 70.0, "bert_r": 60.0, "bert_f1": f1 + i, "n": 5}
    out["overall"] = {"acc": acc + 0.5, "em": 10.0, "bleu": 1.5, "rouge_l": 20.0, "bert_p": 70.0, "bert_r": 60.0, "bert_f1": f1 + 0.5, "n": 10}
    return out


def _payload(t: int, acc: float, f1: float, method: str = "fedA2", modalities=("audio", "image")) -> dict:
    return build_eval_payload(
        round=t,
        adapter={"path": f"rounds/{t}/global", "method": method, "base_fingerprint": "sha256:abc"},
        config={"max_new_tokens": 16, "limit": None, "batch_size": 8, "bertscore": {"model": "all-MiniLM-L6-v2", "num_layers": 6}},
        metrics=_metrics(acc, f1, modalities),
        samples={m: [{"question": "what colour?", "prediction": "red", "reference": "red"}] for m in modalities},
    )


def _workspace(root: Path, rounds: dict[int, tuple[float, float]], method: str = "fedA2") -> Path:
    root.mkdir(parents=True)
    (root / "uniflow.toml").write_text("[model]\n")
    for t, (acc, f1) in rounds.items():
        write_eval_json(root / "eval" / f"round-{t}.json", _payload(t, acc, f1, method))
    return root


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    # Same base (round 0) for both runs; fedA2 ends higher than LoRA.
    a = _workspace(tmp_path / "fedA2", {0: (40.0, 80.0), 1: (50.0, 82.0), 2: (61.234, 84.5)})
    b = _workspace(tmp_path / "lora", {0: (40.0, 80.0), 1: (45.0, 81.0)}, method="fedit")
    return [a, b]


# --------------------------------------------------------------------------------------------------
# Eval JSON I/O
# --------------------------------------------------------------------------------------------------
def test_eval_json_round_trip_is_deterministic(tmp_path: Path) -> None:
    payload = _payload(3, 50.0, 80.0)
    path = write_eval_json(tmp_path / "eval" / "round-3.json", payload)
    assert read_eval_json(path) == payload
    assert read_eval_json(path)["definitions"] == METRIC_DEFINITIONS
    first = path.read_bytes()
    write_eval_json(path, payload, force=True)
    assert path.read_bytes() == first
    assert list(json.loads(first)) == ["format_version", "round", "adapter", "config", "metrics", "definitions", "samples"]


def test_eval_json_refuses_overwrite_without_force(tmp_path: Path) -> None:
    path = write_eval_json(tmp_path / "round-1.json", _payload(1, 50.0, 80.0))
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        write_eval_json(path, _payload(1, 99.0, 99.0))
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p.pop("metrics"), r"key\(s\) metrics missing"),
        (lambda p: p.update(round=-1), "round -1 is not an integer >= 0"),
        (lambda p: p["metrics"]["image"].update(acc=float("nan")), r"metrics.image.acc is nan"),
        (lambda p: p["metrics"]["image"].pop("bert_f1"), r"metrics.image.bert_f1 missing"),
        (lambda p: p["metrics"].pop("overall"), "metrics.overall missing"),
        (lambda p: p["config"].update(batch_size=0), "config.batch_size is 0"),
        (lambda p: p["adapter"].pop("base_fingerprint"), "adapter.base_fingerprint missing"),
        (lambda p: p["samples"]["image"].append({"prediction": 1}), r"samples.image\[1\] needs string"),
    ],
)
def test_write_eval_json_validates(tmp_path: Path, mutate, match) -> None:
    payload = _payload(1, 50.0, 80.0)
    mutate(payload)
    with pytest.raises(DataError, match=match):
        write_eval_json(tmp_path / "round-1.json", payload)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"round": 1,', r"is not valid JSON \(line 1 column 13"),
        ("[1, 2]", "the top level is a list"),
        ('{"format_version": 1, "round": 1}', r"key\(s\) adapter, config, metrics, definitions, samples missing"),
    ],
)
def test_read_eval_json_rejects_malformed(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "round-1.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_eval_json(path)


def test_read_eval_json_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*run 'uniflow evaluate' first"):
        read_eval_json(tmp_path / "round-9.json")


# --------------------------------------------------------------------------------------------------
# Report library
# --------------------------------------------------------------------------------------------------
def test_table_cells_follow_the_papers_layout(runs: list[Path]) -> None:
    report = build_report(runs, metrics="acc,bert_f1")
    assert report.table.columns == [
        ("audio", "acc"), ("audio", "bert_f1"), ("image", "acc"), ("image", "bert_f1"), ("overall", "acc"), ("overall", "bert_f1"),
    ]
    # Base row from round 0 (shared by both runs, so shown once), then each run's last round.
    assert [(label, t) for label, t, _ in report.table.rows] == [("–", 0), ("fedA2", 2), ("lora", 1)]
    lines = report.markdown.splitlines()
    assert "| Method | Round | audio Acc | audio F_BERT | image Acc | image F_BERT | overall Acc | overall F_BERT |" in lines
    # audio = base value, image = base + 1, overall = base + 0.5; two decimals.
    assert "| – | 0 | 40.00 | 80.00 | 41.00 | 81.00 | 40.50 | 80.50 |" in lines
    assert "| fedA2 | 2 | 61.23 | 84.50 | 62.23 | 85.50 | 61.73 | 85.00 |" in lines
    assert "| lora | 1 | 45.00 | 81.00 | 46.00 | 82.00 | 45.50 | 81.50 |" in lines


def test_table_keeps_distinct_bases_and_marks_missing_values(tmp_path: Path) -> None:
    a = _workspace(tmp_path / "a", {0: (10.0, 70.0), 1: (20.0, 75.0)})
    b = tmp_path / "b"  # a plain directory of eval JSONs, image only, base differs from a's
    write_eval_json(b / "round-0.json", _payload(0, 11.0, 71.0, modalities=("image",)))
    write_eval_json(b / "round-3.json", _payload(3, 30.0, 77.0, modalities=("image",)))
    run_a, run_b = load_run(a), load_run(b)
    table = build_table([run_a, run_b], ["acc"])
    labels = [label for label, _, _ in table.rows]
    assert labels == ["– (a)", "– (b)", "a", "b"]
    md = render_markdown(table, ["acc"])
    # b has no audio: n/a there; its overall (image only) is still shown.
    assert "| b | 3 | n/a | 30.00 | 30.50 |" in md.splitlines()
    assert "| – (b) | 0 | n/a | 11.00 | 11.50 |" in md.splitlines()


def test_pngs_are_nonempty_and_deterministic(runs: list[Path]) -> None:
    first = build_report(runs, metrics="acc,bert_f1")
    second = build_report(runs, metrics="acc,bert_f1")
    assert sorted(first.pngs) == ["acc.png", "bert_f1.png"]
    for name, data in first.pngs.items():
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        assert data == second.pngs[name]
        assert b"Software" not in data
    assert first.pngs["acc.png"] != first.pngs["bert_f1.png"]


def test_make_report_writes_and_refuses_to_overwrite(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = make_report(runs, out)
    assert sorted(p.name for p in out.iterdir()) == ["acc.png", "bert_f1.png", "bert_p.png", "bert_r.png", "report.md"]
    assert (out / "report.md").read_text() == report.markdown
    before = (out / "report.md").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        make_report(runs, out, metrics="acc")
    assert (out / "report.md").read_bytes() == before
    make_report(runs, out, metrics="acc", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["acc.png", "report.md"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, ["acc", "bert_p", "bert_r", "bert_f1"]), ("acc, bleu", ["acc", "bleu"]), (["em"], ["em"])],
)
def test_parse_metrics(spec, expected) -> None:
    assert parse_metrics(spec) == expected


@pytest.mark.parametrize(("spec", "match"), [("acc,meteor", "unknown metric 'meteor'"), (",", "empty"), ("acc,acc", "twice")])
def test_parse_metrics_rejects(spec, match) -> None:
    with pytest.raises(UsageError, match=match):
        parse_metrics(spec)


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_run(tmp_path / "missing")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "uniflow.toml").write_text("")
    with pytest.raises(DataError, match=r"no eval JSON found in .*ws/eval"):
        load_run(ws)
    d = tmp_path / "d"
    write_eval_json(d / "round-2.json", _payload(1, 1.0, 1.0))
    with pytest.raises(DataError, match="says round 1 but is named round-2"):
        load_run(d)
    e = tmp_path / "e"
    write_eval_json(e / "first.json", _payload(1, 1.0, 1.0))
    write_eval_json(e / "second.json", _payload(1, 2.0, 2.0))
    with pytest.raises(DataError, match="round 1 is evaluated twice"):
        load_run(e)


def test_run_name_of_an_eval_dir_is_its_workspace(runs: list[Path]) -> None:
    assert load_run(runs[0] / "eval").name == "fedA2"


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_report(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", *map(str, runs), "--out", str(out), "--metrics", "acc,bert_f1", "--names", "FedA2-LoRA,LoRA"])
    assert result.exit_code == 0, result.output
    assert "FedA2-LoRA" in result.output and "61.23" in result.output and "wrote" in result.output
    md = (out / "report.md").read_text()
    assert "| FedA2-LoRA | 2 | 61.23 |" in md and "| LoRA | 1 | 45.00 |" in md
    assert (out / "acc.png").read_bytes().startswith(PNG_SIGNATURE)


def test_cli_report_json(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", *map(str, runs), "--out", str(out), "--metrics", "acc,bert_f1", "--names", "FedA2-LoRA,LoRA", "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert done["out"] == str(out) and done["metrics"] == ["acc", "bert_f1"]
    assert done["files"] == [str(out / "report.md"), str(out / "acc.png"), str(out / "bert_f1.png")]
    rows = {row["run"]: row for row in done["rows"]}
    assert rows["FedA2-LoRA"]["round"] == 2 and rows["FedA2-LoRA"]["values"]["image"]["acc"] == pytest.approx(62.234)
    assert rows["LoRA"]["values"]["audio"]["bert_f1"] == pytest.approx(81.0)
    assert (out / "report.md").is_file()


def test_cli_metrics_has_no_short_flag(runs: list[Path], tmp_path: Path) -> None:
    # -m is --method in every other command; report's --metrics no longer takes it.
    result = runner.invoke(app, ["report", str(runs[0]), "-m", "acc", "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2 and "No such option '-m'" in result.output


def test_cli_help_shows_examples() -> None:
    result = runner.invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    assert "uniflow report runs/fedA2" in result.output


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        (["{empty}"], 1, "no eval JSON found"),
        (["{bad}"], 1, "is not valid JSON"),
        (["{run}", "--metrics", "acc,meteor"], 2, "unknown metric 'meteor'"),
        (["{run}", "--names", "a,b"], 2, "--names has 2 name"),
        (["{run}", "{run}"], 2, "two runs are named 'fedA2'"),
        (["{run}", "--out", "{existing}"], 1, "already exists"),
    ],
)
def test_cli_bad_input(runs: list[Path], tmp_path: Path, args, code, match) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "round-1.json").write_text("{not json")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    subst = {"empty": tmp_path / "empty", "bad": tmp_path / "bad", "run": runs[0], "existing": existing}
    argv = ["report", *(a.format(**subst) for a in args)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "fresh")]
    result = runner.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert match in result.output
    assert not (tmp_path / "fresh").exists()  # no partial output
    assert (existing / "keep.txt").read_text() == "keep" and sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
