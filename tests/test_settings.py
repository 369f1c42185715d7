"""The one settings resolver, the method registry and ConfigError in library terms (issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from uniflow_cli.aggregation.registry import METHOD_NAMES, SPECS, method_spec
from uniflow_cli.errors import ConfigError
from uniflow_cli.settings import AggregateSettings, LoraSettings, TrainSettings, resolve, resolve_model, resolve_train
from uniflow_cli.workspace import Workspace


def workspace(tmp_path: Path, toml: str) -> Workspace:
    (tmp_path / "uniflow.toml").write_text(toml)
    return Workspace(tmp_path.resolve())


# ------------------------------------------------------------------------------------------- the resolver
def test_defaults_then_table_then_overrides(tmp_path):
    ws = workspace(tmp_path, '[train]\ntau = 0.5\nsteps = 7\nstages = "joint"\nweight_decay = 0.01\n')
    assert resolve_train(None) == TrainSettings()
    got = resolve_train(ws, {"tau": None, "steps": 3})
    assert (got.tau, got.steps, got.stages, got.weight_decay) == (0.5, 3, "joint", 0.01)  # stages/weight_decay honoured


@pytest.mark.parametrize(("table", "overrides", "steps", "epochs"), [
    ("steps = 7", {"epochs": 2.0}, None, 2.0),  # an epochs flag beats the table's steps
    ("epochs = 2.0", {}, None, 2.0),  # the table's epochs beats the default steps
    ("epochs = 2.0", {"steps": 5}, 5, None),  # a steps flag beats the table's epochs
    ("", {}, 20, None),
])
def test_steps_and_epochs_are_alternatives(tmp_path, table, overrides, steps, epochs):
    got = resolve_train(workspace(tmp_path, f"[train]\n{table}\n"), overrides)
    assert (got.steps, got.epochs) == (steps, epochs)


def test_both_in_one_table_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="steps=7 and epochs=2 were both given"):
        resolve_train(workspace(tmp_path, "[train]\nsteps = 7\nepochs = 2.0\n"))


@pytest.mark.parametrize(("cls", "section", "key", "hint"), [
    (TrainSettings, "train", "stpes", "did you mean 'steps'?"),
    (LoraSettings, "lora", "lora_alhpa", "did you mean 'lora_alpha'?"),
    (AggregateSettings, "aggregate", "lamda", "did you mean 'lambda'?"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, cls, section, key, hint):
    ws = workspace(tmp_path, f"[{section}]\n{key} = 1\n")
    with pytest.raises(ConfigError) as err:
        resolve(cls, ws)
    message = str(err.value)
    assert f"uniflow.toml [{section}]: unknown key '{key}'" in message and hint in message and "known keys:" in message


def test_unknown_model_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\]: unknown key 'pressett'.*did you mean 'preset'"):
        resolve_model(workspace(tmp_path, '[model]\npressett = "smol"\n'))


def test_table_error_names_the_file_and_key(tmp_path):
    ws = workspace(tmp_path, "[aggregate]\nlambda = -1.0\n")
    with pytest.raises(ConfigError) as err:
        resolve(AggregateSettings, ws)
    assert str(err.value) == (f"{ws.config_path} [aggregate]: lambda=-1.0 must be a finite number >= 0. "
                              f"Fix: write lambda = 1.0 in {ws.config_path} [aggregate]")


def test_override_error_keeps_its_field(tmp_path):
    ws = workspace(tmp_path, "[train]\ntau = 0.5\n")
    with pytest.raises(ConfigError) as err:
        resolve_train(ws, {"tau": 1.5})
    assert err.value.field == "tau" and str(err.value) == "tau=1.5 must be in [0, 1]. Fix: set tau = 0.25"


def test_old_lambda_underscore_key_still_reads(tmp_path):
    assert resolve(AggregateSettings, workspace(tmp_path, "[aggregate]\nlambda_ = 0.5\n")).lambda_ == 0.5


# ------------------------------------------------------------------------------------------- ConfigError
@pytest.mark.parametrize(("style", "name", "where", "expected"), [
    ("flag", "--stage-tau", None, "--stage-tau 1.5 must be in [0, 1]. Fix: use --stage-tau 0.25"),
    ("toml", "tau", "fed/uniflow.toml [train]", "fed/uniflow.toml [train]: tau=1.5 must be in [0, 1]. Fix: write tau = 0.25 in fed/uniflow.toml [train]"),
    ("key", "run-config stage-tau", None, "run-config stage-tau=1.5 must be in [0, 1]. Fix: set run-config stage-tau=0.25"),
])
def test_config_error_renamed(style, name, where, expected):
    exc = ConfigError.invalid("tau", 1.5, "must be in [0, 1]", example=0.25)
    assert str(exc.renamed(name, style=style, where=where)) == expected


def test_cli_names_the_flag_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from uniflow_cli.cli.app import app

    result = CliRunner().invoke(app, ["aggregate", str(tmp_path / "a"), "--out", str(tmp_path / "g"), "--lambda", "-1"])
    assert result.exit_code == 2 and "--lambda -1.0 must be a finite number >= 0. Fix: use --lambda 1.0" in " ".join(result.output.split())


def test_flower_names_the_run_config_key():
    from uniflow_cli.flower.settings import FlowerRunSettings, in_run_config_terms

    settings = FlowerRunSettings(tau=1.5)
    with pytest.raises(ConfigError, match=r"^run-config tau=1.5 must be in \[0, 1\]"):
        in_run_config_terms(lambda: resolve_train(None, settings.train_overrides()))


# ------------------------------------------------------------------------------------------- the registry
@pytest.mark.parametrize(("name", "uploads", "frozen_A", "stacks", "merges", "residual", "private_B", "line_up"), [
    ("fedit", ("A", "B"), False, False, False, False, False, True),
    ("ffa", ("B",), True, False, False, False, False, False),
    ("fedsa", ("A",), False, False, False, False, True, False),
    ("fedex", ("A", "B"), False, False, False, True, False, False),
    ("fedA2", ("A", "B"), False, False, False, False, False, True),
    ("svd", ("A", "B"), False, False, False, False, False, True),
    ("flora", ("A", "B"), False, True, True, False, False, False),
    ("lora-fair", ("A", "B"), False, False, False, False, False, True),
    ("flexlora", ("A", "B"), False, False, False, False, False, False),
    ("hetlora", ("A", "B"), False, False, False, False, False, False),
    ("fedsvd", ("B",), True, False, False, False, False, False),
    ("rolora", ("A", "B"), False, False, False, False, False, False),  # over two rounds; each round one (test_rolora.py)
])
def test_registry_table(name, uploads, frozen_A, stacks, merges, residual, private_B, line_up):
    s = method_spec(name)
    assert (s.uploads, s.frozen_A, s.stacks_ranks, s.merges_into_base, s.residual, s.private_B, s.line_up) == (
        uploads, frozen_A, stacks, merges, residual, private_B, line_up)
    assert s.folds_history == (merges or residual) and s.pads == (not stacks)
    assert s.shares("llm.x.lora_A.weight") == ("A" in uploads) and s.shares("llm.x.lora_B.weight") == ("B" in uploads)
    assert s.shares("projectors.image.weight")


def test_registry_matches_the_fusing_functions():
    from uniflow_cli.aggregation.methods import METHODS

    assert tuple(METHODS) == METHOD_NAMES and all(METHODS[n].spec is SPECS[n] for n in METHOD_NAMES)
    assert METHODS["ffa"].frozen_A and METHODS["flora"].stacks_ranks  # attributes forward to the spec


def test_unknown_method_suggests_the_closest():
    with pytest.raises(ConfigError, match=r'method="fedA3" is not one of .* \(did you mean fedA2\?\)'):
        method_spec("fedA3")


def test_registry_and_settings_import_no_torch():
    code = "import sys, uniflow_cli.aggregation.registry, uniflow_cli.settings, uniflow_cli.workspace; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_method_name_branches_outside_the_registry():
    import re

    root = Path(__file__).resolve().parents[1] / "uniflow_cli"
    pattern = re.compile(r"""(method(\.name)?|options\.method)\s*(==|!=|in)\s*\(?["'](fedit|ffa|fedsa|feddpa|fedex|fedA2|svd|flora|lora-fair|flexlora|hetlora|fedsvd|rolora)["']""")
    hits = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name != "registry.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ------------------------------------------------------------------------------------------- worded errors
def test_worded_names_settings_in_library_terms_and_keeps_values_literal():
    from uniflow_cli.errors import UsageError, reword, worded

    exc = worded(UsageError, "{round_} {t}: nothing in {path}", "pick another {round_}", t=3, path="/x/{odd}")
    assert str(exc) == "round 3: nothing in /x/{odd}. Fix: pick another round"  # braces in a value stay
    told = reword(exc, {"round_": "--round"}.get)
    assert isinstance(told, UsageError) and str(told) == "--round 3: nothing in /x/{odd}. Fix: pick another --round"


def test_the_cli_words_a_library_error_with_its_flags(tmp_path):
    from typer.testing import CliRunner

    from uniflow_cli.cli.app import app
    from uniflow_cli.errors import UsageError
    from uniflow_cli.report import parse_metrics

    with pytest.raises(UsageError, match=r"^metrics is empty"):
        parse_metrics("")
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--metrics", ",", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--metrics is empty" in result.output
