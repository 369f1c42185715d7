"""Every test runs isolated from the caller's workspace.

uniflow finds its workspace from ``--workspace``, then ``$UNIFLOW_WORKSPACE``, then a ``uniflow.toml`` in
the working directory or a parent (:func:`uniflow_cli.workspace.find_workspace`). A test run from inside
a workspace, or with the variable set, would otherwise read that workspace's settings and history. So
the variable is removed and each test starts in an empty directory of its own; a test that needs the
repository's files names them from :data:`REPO`, never relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uniflow_cli.workspace import ENV_VAR as WORKSPACE_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """The same isolation for module- and session-scoped fixtures, which are set up before any test's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(WORKSPACE_ENV, raising=False)
        mp.chdir(tmp_path_factory.mktemp("session-cwd"))
        yield


@pytest.fixture(autouse=True)
def _isolated_test(monkeypatch, tmp_path_factory):
    """No $UNIFLOW_WORKSPACE and an empty working directory of the test's own (not its tmp_path, which the
    test may list or compare)."""
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
