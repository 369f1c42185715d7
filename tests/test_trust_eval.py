"""Issue 12 (trust boundary), evaluation and sequence length on the tiny-random preset.

* ``evaluate``: a test split that data/partition.json lists is missing → one line, nothing written, unless
  ``--modalities`` narrows the run on purpose; "overall" always says which modalities it pools.
* sequences are cut to ``max_length`` tokens while they are tokenised (a 200k-character answer trains in
  seconds; the prompt template stays whole, the answer keeps its head); the cut examples are counted.
* ``--threads 0`` is one line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniflow_cli.adapters import read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.data.schema import make_row, rows_to_dataset
from uniflow_cli.errors import ConfigError, DataError, UsageError, WorkspaceError
from uniflow_cli.evaluation import EvalOptions, EvalRequest, check_workspace_evaluation, run_evaluate
from uniflow_cli.models import ModelSettings, build_base, collate
from uniflow_cli.models.multimodal import DEFAULT_MAX_LENGTH, IGNORE_INDEX, SLOT_IDS
from tests.workspace_factory import make_workspace, png

runner = CliRunner()
_OPTION_FIELDS = {f.name for f in dataclasses.fields(EvalOptions)}


def _evaluate(**kwargs):
    """run_evaluate with the request's and the options' fields as keywords (as the CLI's flags are)."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_FIELDS}
    return run_evaluate(EvalRequest(**kwargs), EvalOptions(**options))
HUGE = 200_000  # characters; one token per byte in the tiny tokenizer


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, match: str, code: int | None = None) -> None:
    assert result.exit_code != 0 and (code is None or result.exit_code == code), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert match in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """init (image encoder) + an image and a text client + data/test/{image,text} + a minimal partition.json."""
    return make_workspace(tmp_path_factory.mktemp("tpl") / "fed", {"0": "image", "1": "text"}, test=("image", "text"))


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dst = tmp_path / "fed"
    shutil.copytree(template, dst)
    return dst


def _partition(ws: Path, content) -> None:
    (ws / "data" / "partition.json").write_text(content if isinstance(content, str) else json.dumps(content))


# ---------------------------------------------------------------------------------------------- A: missing test splits
FULL_PARTITION = {"modalities": {"image": {"test_dir": "test/image"}, "text": {"test_dir": "test/text"}}, "clients": []}


@pytest.mark.parametrize("partition, removed", [
    (None, "text"),  # the factory's partition.json: clients' modalities only
    (None, "image"),
    (FULL_PARTITION, "text"),  # as 'uniflow partition' writes it: a modalities table
])
def test_missing_test_split_is_one_line_and_writes_nothing(ws, partition, removed):
    if partition is not None:
        _partition(ws, partition)
    shutil.rmtree(ws / "data" / "test" / removed)
    result = run("evaluate", "--base", "-w", ws, "--limit", 1, "--max-new-tokens", 2)
    assert_one_line_error(result, f"the {removed} test split {ws / 'data' / 'test' / removed} is missing")
    assert "--modalities" in result.output
    assert not (ws / "eval").exists()
    with pytest.raises(DataError, match=f"the {removed} test split"):
        check_workspace_evaluation(ws, [1])  # the Flower server's check before the first round


@pytest.mark.parametrize("content, match", [
    ("{not json", "is unreadable"),
    ({"clients": [{"id": 0, "modalities": ["video"]}]}, "names modality 'video'"),
    ({"modalities": ["image"]}, "'modalities' is not an object"),
    ({"clients": [{"id": 0, "modalities": "image"}]}, "not a list"),
])
def test_bad_partition_json_is_one_line(ws, content, match):
    _partition(ws, content)
    assert_one_line_error(run("evaluate", "--base", "-w", ws), match)
    assert not (ws / "eval").exists()
    with pytest.raises(WorkspaceError, match=match):
        _evaluate(workspace=ws, base=True)


def test_partition_modality_the_model_cannot_evaluate_is_not_required(ws):
    """audio is in the partition but the model has no audio encoder: its absent split is not expected."""
    _partition(ws, {"clients": [{"id": 0, "modalities": ["image", "audio"]}, {"id": 1, "modalities": ["text"]}]})
    result = _evaluate(workspace=ws, base=True, limit=1, max_new_tokens=2)
    assert result.payload["metrics"]["overall"]["modalities"] == ["image", "text"]


@pytest.mark.parametrize("removed, wanted, overall", [
    ("text", "image", ["image"]),
    ("image", "text", ["text"]),
    (None, "text,image", ["image", "text"]),
])
def test_modalities_narrows_and_overall_says_what_it_covers(ws, removed, wanted, overall):
    if removed:
        shutil.rmtree(ws / "data" / "test" / removed)
    result = run("evaluate", "--base", "-w", ws, "--modalities", wanted, "--limit", 2, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    payload = json.loads((ws / "eval" / "round-0.json").read_text())
    assert payload["metrics"]["overall"]["modalities"] == overall
    assert list(payload["metrics"]) == [*overall, "overall"]
    assert f"overall ({', '.join(overall)})" in result.output


def test_overall_names_its_modalities_without_narrowing(ws):
    result = run("evaluate", "--base", "-w", ws, "--limit", 1, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    payload = json.loads((ws / "eval" / "round-0.json").read_text())
    assert payload["metrics"]["overall"]["modalities"] == ["image", "text"]
    assert payload["config"]["max_length"] == DEFAULT_MAX_LENGTH
    assert "overall (image, text)" in result.output


@pytest.mark.parametrize("args, match, code", [
    (["--modalities", "audio"], "there is no audio test split", 1),
    (["--modalities", "video"], "unknown modality 'video'", 2),
    (["--modalities", ","], "--modalities is empty", 2),
])
def test_bad_modalities(ws, args, match, code):
    assert_one_line_error(run("evaluate", "--base", "-w", ws, *args), match, code)
    assert not (ws / "eval").exists()


def test_modalities_in_explicit_mode(ws, tmp_path):
    out = tmp_path / "e.json"
    data = ["--data", ws / "data" / "test" / "image", "--data", ws / "data" / "test" / "text"]
    result = run("evaluate", "--base", *data, "-w", ws, "--out", out, "--modalities", "text", "--limit", 1, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["metrics"]["overall"]["modalities"] == ["text"]
    out.unlink()
    bad = run("evaluate", "--base", "--data", ws / "data" / "test" / "text", "-w", ws, "--out", out, "--modalities", "image")
    assert_one_line_error(bad, "the --data dirs hold no image samples")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- B: the token budget
@pytest.fixture(scope="module")
def tiny():
    return build_base(ModelSettings(preset="tiny-random", modalities=["image"]))


TAIL = " Based on the above input and question, please provide your response."


def _sample(modality="text", question="Capital of France?", answer="paris"):
    return {"id": "s", "modality": modality, "question": question, "answer": answer,
            "image": png(0) if modality == "image" else None, "audio": None}


@pytest.mark.parametrize("modality, q_len, a_len, limit, answer_kept, eos", [
    ("text", 18, 5, None, 5, True),  # fits: untouched
    ("text", 18, HUGE, None, None, False),  # huge answer: the prompt stays, the answer's head fills the rest
    ("image", 18, HUGE, 300, None, False),  # with the image slots, a custom budget
    ("text", HUGE, 5, None, 5, True),  # huge question: cut, the short answer stays whole with its EOS
    ("text", HUGE, HUGE, None, DEFAULT_MAX_LENGTH // 4, False),  # both huge: the answer keeps a quarter
])
def test_training_sequences_are_cut_keeping_the_prompt_and_the_answer_head(tiny, modality, q_len, a_len, limit, answer_kept, eos):
    question, answer = ("q" * q_len)[:q_len], "a" * a_len
    batch = collate([_sample(modality, question, answer)], tiny, max_length=limit)
    cap = limit or DEFAULT_MAX_LENGTH
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) <= cap
    kept = [t for t in labels if t != IGNORE_INDEX]
    eos_id = tiny.tokenizer.eos_token_id
    answer_ids = kept[:-1] if eos else kept
    assert answer_ids == [ord("a")] * len(answer_ids) and len(answer_ids) >= 1  # the answer's head, in order
    assert (kept[-1] == eos_id) == eos
    assert ids[len(ids) - len(kept):] == kept  # the answer is the end of the sequence
    prompt = bytes(i for i in ids[: len(ids) - len(kept)] if 0 <= i < 256).decode()
    assert prompt.endswith(TAIL) and prompt.startswith("Start of the conversation.")  # the template survives
    assert ids.count(SLOT_IDS["image"]) == (4 if modality == "image" else 0)  # every slot survives
    if answer_kept is not None:
        assert len(answer_ids) == answer_kept
    assert batch["truncated"] == [q_len + a_len > 100]


def test_generation_prompt_is_capped_and_ends_with_the_template(tiny):
    batch = collate([_sample(question="q" * HUGE), _sample()], tiny, train=False)
    assert batch["input_ids"].shape[1] == DEFAULT_MAX_LENGTH and batch["truncated"] == [True, False]
    tail = bytes(i for i in batch["input_ids"][0].tolist()[-len(TAIL):]).decode()
    assert tail == TAIL


def test_a_five_megabyte_answer_is_tokenised_in_bounded_time(tiny):
    started = time.perf_counter()
    batch = collate([_sample(answer="word " * 1_000_000)], tiny)
    assert time.perf_counter() - started < 5 and batch["input_ids"].shape == (1, DEFAULT_MAX_LENGTH)


@pytest.mark.parametrize("limit, match", [
    (20, "max_length 20 is too short for sample 's': the prompt template alone takes"),
    (2048, "max_length 2048 exceeds the LLM's 1024 positions"),
    (0, "max_length 0 is not a positive number"),
])
def test_impossible_budgets_are_one_error(tiny, limit, match):
    with pytest.raises(ConfigError, match=match):
        collate([_sample()], tiny, max_length=limit)


def _huge_shard(ws: Path) -> None:
    shard = ws / "data" / "clients" / "1"
    shutil.rmtree(shard)
    rows = [make_row(id=f"t{i}", modality="text", question=f"What is {i}?", answer=str(i)) for i in range(3)]
    rows.append(make_row(id="huge", modality="text", question="Tell me everything.", answer="x" * HUGE))
    rows_to_dataset(rows).save_to_disk(str(shard))


@pytest.mark.parametrize("extra, cap", [([], DEFAULT_MAX_LENGTH), (["--max-length", 300], 300)])
def test_a_huge_answer_trains_fast_with_the_cap_and_is_counted(ws, extra, cap):
    _huge_shard(ws)
    started = time.perf_counter()
    result = run("local-train", "--client", 1, "-w", ws, "--steps", 3, "--batch-size", 4, "--stages", "joint", "--threads", 1, *extra)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - started < 60
    assert f"1 of 4 examples cut to {cap} tokens" in " ".join(result.output.split())
    train = read_adapter(ws / "rounds" / "1" / "clients" / "1").meta.extra["train"]
    assert train["truncated"] == 1 and train["tokens"] <= 3 * 4 * cap


def test_a_huge_question_in_a_test_split_is_cut_with_a_notice(ws):
    split = ws / "data" / "test" / "text"
    shutil.rmtree(split)
    rows_to_dataset([make_row(id="big", modality="text", question="why " * 50_000, answer="because"),
                     make_row(id="ok", modality="text", question="Two plus two?", answer="four")]).save_to_disk(str(split))
    result = _evaluate(workspace=ws, base=True, max_new_tokens=2, modalities=["text"])
    assert any("1 test sample(s) were longer than 512 tokens" in n for n in result.notices)
    assert result.payload["metrics"]["text"]["n"] == 2


# ---------------------------------------------------------------------------------------------- --threads
@pytest.mark.parametrize("command", ["local-train", "evaluate"])
@pytest.mark.parametrize("threads", [0, -3])
def test_threads_below_one_is_one_line(ws, command, threads):
    args = ["--client", 0] if command == "local-train" else ["--base"]
    assert_one_line_error(run(command, *args, "-w", ws, "--threads", threads), f"--threads {threads} must be >= 1", code=2)
    assert not (ws / "eval").exists() and not (ws / "rounds" / "1").exists()


def test_library_rejects_unknown_modalities(ws):
    with pytest.raises(UsageError, match="unknown modality 'Image'"):
        _evaluate(workspace=ws, base=True, modalities=["Image"])
