"""Defects of issue 13 whose natural test file belongs to another part of the suite (report, ...)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from uniflow_cli.errors import DataError
from uniflow_cli.evaluation_io import build_eval_payload, write_eval_json
from uniflow_cli.report import load_run
from uniflow_cli.workspace import ENV_VAR, find_workspace
from tests.conftest import REPO


def _payload(t: int) -> dict:
    scores = {"acc": 1.0, "em": 1.0, "bleu": 1.0, "rouge_l": 1.0, "bert_p": 1.0, "bert_r": 1.0, "bert_f1": 1.0, "n": 1}
    return build_eval_payload(
        round=t,
        adapter={"path": f"rounds/{t}/global", "method": "fedA2", "base_fingerprint": "sha256:abc"},
        config={"max_new_tokens": 16, "limit": None, "batch_size": 8, "bertscore": {"model": "all-MiniLM-L6-v2", "num_layers": 6}},
        metrics={"text": scores, "overall": scores},
        samples={"text": [{"question": "q?", "prediction": "a", "reference": "a"}]},
    )


def test_a_misnamed_eval_file_is_told_its_right_name(tmp_path: Path) -> None:
    """The fix names the round the payload says (it used to print the literal 'round-{t}.json')."""
    write_eval_json(tmp_path / "run" / "round-2.json", _payload(1))
    with pytest.raises(DataError) as caught:
        load_run(tmp_path / "run")
    assert caught.value.fix == "rename it round-1.json"
    assert str(caught.value).endswith("Fix: rename it round-1.json")


# ---------------------------------------------------------------------------------------------- test isolation (conftest.py)
def test_a_test_starts_without_a_workspace_in_an_empty_directory() -> None:
    assert ENV_VAR not in os.environ
    assert list(Path.cwd().iterdir()) == [] and not Path.cwd().resolve().is_relative_to(REPO)
    assert find_workspace(required=False) is None


def _inner_run(tmp_path: Path, *, with_conftest: bool) -> subprocess.CompletedProcess:
    """pytest run from inside a workspace, with $UNIFLOW_WORKSPACE pointing at it, on one test that
    looks for a workspace — with or without this suite's conftest.py."""
    caller = tmp_path / "caller-workspace"
    caller.mkdir()
    (caller / "uniflow.toml").write_text("")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pytest.ini").write_text("[pytest]\n")
    if with_conftest:
        (inner / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (inner / "test_leak.py").write_text(
        "from uniflow_cli.workspace import find_workspace\n\n\n"
        "def test_no_workspace_leaks_in():\n    assert find_workspace(required=False) is None\n"
    )
    env = {**os.environ, ENV_VAR: str(caller), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(inner / "pytest.ini"), "--rootdir", str(inner),
           f"--basetemp={tmp_path / 'basetemp'}", str(inner / "test_leak.py")]
    return subprocess.run(cmd, cwd=caller, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("with_conftest", [True, False])
def test_the_callers_workspace_never_leaks_into_a_test(tmp_path: Path, with_conftest: bool) -> None:
    """With the conftest the caller's workspace is invisible; without it the same test finds it (so the
    check can fail)."""
    done = _inner_run(tmp_path, with_conftest=with_conftest)
    assert done.returncode == (0 if with_conftest else 1), done.stdout + done.stderr
