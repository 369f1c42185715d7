"""``uniflow ask`` on tiny-random models: the answer is the prediction ``uniflow evaluate`` makes for the same
sample (same model build, prompt and generation), for text, image and audio questions and for a classify
model's label; bad inputs are one line and no model build."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.cli_runner import run, runner
from tests.test_export import (
    LABELS,
    classify_workspace,
    client_state,
    publish,
    qa_workspace,
    wav,
)
from tests.workspace_factory import png, write_shard
from uniflow_cli.adapters import read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.workspace import Workspace


@pytest.fixture(scope="module")
def qa_ws(tmp_path_factory) -> Workspace:
    """The export tests' workspace (round 1: random B and projectors) with text and image test splits."""
    ws = qa_workspace(tmp_path_factory.mktemp("qa") / "fed")
    write_shard(ws.test_data("text"), "text", n=2, offset=100)
    write_shard(ws.test_data("image"), "image", n=2, offset=100)
    return ws


@pytest.fixture(scope="module")
def predictions(qa_ws) -> dict[str, list[dict]]:
    """What uniflow evaluate predicts for round 1's test samples (greedy, 8 tokens, one sample per batch)."""
    from uniflow_cli.evaluation import EvalOptions, EvalRequest, run_evaluate

    result = run_evaluate(EvalRequest(workspace=qa_ws.root, round=1, out=qa_ws.root / "eval.json"), EvalOptions(max_new_tokens=8, batch_size=1))
    return result.payload["samples"]


def _ask(*args, input: str | None = None):
    return runner.invoke(app, ["ask", *map(str, args)], input=input)


def _answers(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["answers"]


def _one_line_error(result, match: str) -> None:
    assert result.exit_code != 0, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and match in text, result.output
    assert "Traceback" not in result.output and result.stdout.count("error:") <= 1


# --------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------
def test_text_and_image_answers_are_evaluates_predictions(qa_ws, predictions, tmp_path):
    text = predictions["text"][0]
    answers = _answers(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 8, text["question"]))
    assert answers == [{"question": text["question"], "modality": "text", "answer": text["prediction"], "truncated": False}]
    image = predictions["image"][1]
    (tmp_path / "q.png").write_bytes(png(101))  # the image of test sample image-101
    answers = _answers(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 8, "--image", tmp_path / "q.png", image["question"]))
    assert answers[0]["modality"] == "image" and answers[0]["answer"] == image["prediction"]
    plain = _ask("-w", qa_ws.root, "--max-new-tokens", 8, text["question"])
    assert plain.exit_code == 0 and plain.stdout == text["prediction"] + "\n"


def test_json_says_which_model_answered(qa_ws):
    payload = json.loads(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 2, "hi").stdout)
    assert payload["task"] == "qa" and payload["round"] == 1 and payload["method"] == "fedit" and payload["client"] is None
    assert payload["adapter"] == str(qa_ws.global_dir(1))


def test_stdin_questions_one_per_line(qa_ws):
    one = _answers(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 4, "What is 2?"))
    two = _answers(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 4, "What is 3?"))
    both = _answers(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 4, "-", input="What is 2?\n\n   \nWhat is 3?\n"))
    assert both == one + two  # each answered on its own: the neighbours change nothing


def test_a_spoken_question(qa_ws, tmp_path):
    (tmp_path / "q.wav").write_bytes(wav(0.8))
    answers = _answers(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 4, "--audio", tmp_path / "q.wav", "Answer the question."))
    assert answers[0]["modality"] == "audio" and isinstance(answers[0]["answer"], str)


def test_sampling_is_seeded(qa_ws):
    args = ("-w", qa_ws.root, "--json", "--max-new-tokens", 12, "--sample", "--temperature", 1.5)
    first = _answers(_ask(*args, "--seed", 3, "Hello?"))
    assert first == _answers(_ask(*args, "--seed", 3, "Hello?"))
    others = {_answers(_ask(*args, "--seed", s, "Hello?"))[0]["answer"] for s in (4, 5, 6)}
    assert len(others | {first[0]["answer"]}) > 1  # a draw, not the greedy answer again


def test_fedsa_client_model_answers_and_the_global_alone_is_refused(qa_ws, tmp_path):
    shutil.copytree(qa_ws.root, tmp_path / "fed")
    ws = Workspace((tmp_path / "fed").resolve())
    trained = read_adapter(ws.global_dir(1)).tensors
    shutil.rmtree(ws.global_dir(1))
    publish(ws, 1, {k: v for k, v in trained.items() if ".lora_B." not in k}, method="fedsa")
    client_state(ws, "0", 1, {k: v for k, v in trained.items() if ".lora_B." in k}, "fedsa")
    _one_line_error(_ask("-w", ws.root, "hi"), "round 1 is a fedsa global: it carries A but no B")
    mine = _answers(_ask("-w", ws.root, "--client", 0, "--json", "--max-new-tokens", 6, "What is 2?"))
    # The global A + client 0's own B is the fedit round it was cut from.
    assert mine == _answers(_ask("-w", qa_ws.root, "--json", "--max-new-tokens", 6, "What is 2?"))


# --------------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------------
def test_classify_answers_with_the_label_evaluate_predicts(tmp_path):
    from uniflow_cli.data.schema import make_row, rows_to_dataset
    from uniflow_cli.evaluation import EvalOptions, EvalRequest, run_evaluate

    ws = classify_workspace(tmp_path / "nlu")
    pairs = [("a man plays a guitar", "a person makes music"), ("two dogs run on grass", "the cats are asleep"), ("it rains", "it is wet")]
    rows = [make_row(id=f"p{i}", modality="text", question=q, answer=LABELS[i], text_pair=h) for i, (q, h) in enumerate(pairs)]
    rows_to_dataset(rows).save_to_disk(str(ws.test_data("text")))
    samples = run_evaluate(EvalRequest(workspace=ws.root, round=1), EvalOptions()).payload["samples"]["text"]
    for (question, hypothesis), sample in zip(pairs, samples):
        result = _ask("-w", ws.root, "--json", question, "--pair", hypothesis)
        answer = _answers(result)[0]
        assert answer["label"] == sample["prediction"] and answer["pair"] == hypothesis
        assert list(answer["probabilities"]) == LABELS and abs(sum(answer["probabilities"].values()) - 1) < 1e-6
        assert max(answer["probabilities"], key=answer["probabilities"].get) == answer["label"]
    plain = _ask("-w", ws.root, pairs[0][0], "--pair", pairs[0][1])
    assert plain.exit_code == 0 and plain.stdout == samples[0]["prediction"] + "\n"
    _one_line_error(_ask("-w", ws.root, "--image", tmp_path / "x.png", "hi"), "--image applies to a qa model; a classify model reads text only")
    _one_line_error(_ask("-w", ws.root, "--sample", "hi"), "--sample applies to a qa model's generated answer")


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit != 0
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    (root / "not-an-image.png").write_text("hello, I am text")
    (root / "not-audio.wav").write_bytes(png(1))
    (root / "ok.png").write_bytes(png(1))
    (root / "ok.wav").write_bytes(wav(0.5))
    return root


@pytest.mark.parametrize("args, match", [
    (["--image", "{files}/not-an-image.png"], "--image {files}/not-an-image.png is not an image PIL can read"),
    (["--image", "{files}/missing.png"], "--image {files}/missing.png does not exist"),
    (["--image", "{files}"], "is a directory"),
    (["--audio", "{files}/not-audio.wav"], "--audio {files}/not-audio.wav is not audio soundfile can read"),
    (["--image", "{files}/ok.png", "--audio", "{files}/ok.wav"], "--image and --audio were both given"),
    (["--round", 9], "round 9 is not published"),
    (["--pair", "b"], "--pair applies to a classify model"),
    (["--temperature", 0.5], "--temperature 0.5 applies only when sampling"),
    (["--sample", "--temperature", 0], "--temperature 0.0 must be a positive number"),
    (["--adapter", "{files}", "--client", 1], "--adapter names the model itself"),
    (["--client", 0], "only fedsa, feddpa keep a client-private part"),
])
def test_bad_inputs(qa_ws, files, args, match):
    args = [str(a).replace("{files}", str(files)) for a in args]
    _one_line_error(_ask("-w", qa_ws.root, *args, "What is it?"), match.replace("{files}", str(files)))


def test_no_question_on_stdin(qa_ws):
    _one_line_error(_ask("-w", qa_ws.root, "-", input="\n  \n"), "no question given")


def test_a_modality_the_model_has_no_encoder_for(tmp_path, files):
    from uniflow_cli.models import ModelSettings
    from uniflow_cli.models.workspace_init import init_workspace
    from uniflow_cli.settings import LoraSettings

    init_workspace(tmp_path / "img", ModelSettings(preset="tiny-random", modalities=["image"]), LoraSettings(r=2), seed=0)
    _one_line_error(_ask("-w", tmp_path / "img", "--audio", files / "ok.wav", "hi"), "--audio was given, but the model has no audio encoder (encoders: image)")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    from uniflow_cli.ask import read_media
    from uniflow_cli.errors import UnsafeInputError

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UnsafeInputError, match="FIFO"):
        read_media(tmp_path / "pipe.png", "image")


def test_no_workspace_and_no_adapter(tmp_path):
    result = run("ask", "hi")
    assert result.exit_code != 0 and "error:" in result.output and "Traceback" not in result.output
