"""``uniflow init`` and ``uniflow models`` through the CLI (tiny-random preset: fast)."""

from __future__ import annotations

import tomllib

import pytest
from typer.testing import CliRunner

from uniflow_cli.adapters import read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.models import ModelSettings, load_model, model_from_adapter
from uniflow_cli.models.workspace_init import settings_from_config
from uniflow_cli.workspace import find_workspace

runner = CliRunner()


def _init(path, *extra):
    return runner.invoke(app, ["init", str(path), "--preset", "tiny-random", *extra])


def test_init_writes_config_and_round0_global(tmp_path):
    ws = tmp_path / "fed"
    result = _init(ws, "--r", "4", "--lora-alpha", "8", "--rslora", "--modalities", "image", "--seed", "5")
    assert result.exit_code == 0, result.output
    config = tomllib.loads((ws / "uniflow.toml").read_text())
    assert set(config) == {"model", "lora", "train", "aggregate"}
    assert config["lora"]["r"] == 4 and config["lora"]["use_rslora"] is True and config["lora"]["lora_alpha"] == 8.0
    assert config["model"]["preset"] == "tiny-random" and config["model"]["modalities"] == ["image"]
    assert config["train"]["seed"] == 5
    model_settings, lora = settings_from_config(config)
    assert model_settings == ModelSettings(preset="tiny-random", modalities=["image"])

    adapter = read_adapter(ws / "rounds" / "0" / "global")
    meta = adapter.meta
    assert (meta.role, meta.round, meta.method, meta.extra["seed"]) == ("global", 0, None, 5)
    assert meta.extra["settings"]["model"]["preset"] == "tiny-random" and meta.extra["settings"]["lora"]["r"] == 4  # explicit mode needs no --preset
    assert meta.base_fingerprint.startswith("tiny-random:") and meta.modalities == ["image"]
    assert adapter.peft_config["r"] == 4 and adapter.peft_config["modules_to_save"] == ["projectors.image"]
    # exactly the seeded PEFT init, and it loads back into the configured model
    expected = load_model(model_settings, lora, seed=5)
    from uniflow_cli.models import adapter_tensors

    ref = adapter_tensors(expected)
    assert ref.keys() == adapter.tensors.keys()
    assert all((ref[k] == adapter.tensors[k]).all() for k in ref)
    model_from_adapter(model_settings, adapter, lora)
    assert find_workspace(ws).root == ws.resolve()


def test_init_is_deterministic(tmp_path):
    assert _init(tmp_path / "a", "--seed", "1").exit_code == 0
    assert _init(tmp_path / "b", "--seed", "1").exit_code == 0
    rel = "rounds/0/global/adapter_model.safetensors"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / "uniflow.toml").read_bytes() == (tmp_path / "b" / "uniflow.toml").read_bytes()


def test_init_refuses_to_overwrite_without_force(tmp_path):
    ws = tmp_path / "fed"
    assert _init(ws, "--seed", "1").exit_code == 0
    before = (ws / "rounds/0/global/adapter_model.safetensors").read_bytes()
    toml_before = (ws / "uniflow.toml").read_bytes()
    result = _init(ws, "--seed", "2")
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert (ws / "rounds/0/global/adapter_model.safetensors").read_bytes() == before
    assert (ws / "uniflow.toml").read_bytes() == toml_before
    assert _init(ws, "--seed", "2", "--force").exit_code == 0
    assert (ws / "rounds/0/global/adapter_model.safetensors").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--preset", "huge"], 2, "unknown model preset 'huge'"),
        (["--preset", "tiny-random", "--modalities", "image,video"], 1, "unknown modality 'video'"),
        (["--preset", "tiny-random", "--r", "0"], 2, "--r 0 must be a positive integer. Fix: use --r 8"),  # a bad flag value: usage, exit 2 (boundary.py)
        (["--preset", "tiny-random", "--pool", "max"], 1, "pool='max'"),
        (["--preset", "custom"], 1, "preset 'custom' needs an llm directory"),
    ],
)
def test_init_bad_input_writes_nothing(tmp_path, args, code, message):
    ws = tmp_path / "fed"
    result = runner.invoke(app, ["init", str(ws), *args])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())
    assert not ws.exists()


def test_init_custom_dir_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["init", str(tmp_path / "fed"), "--preset", "custom", "--llm", str(tmp_path / "empty"), "--modalities", ""])
    assert result.exit_code == 1
    assert "is not a Hugging Face model directory" in " ".join(result.output.split())
    assert not (tmp_path / "fed").exists()


def test_models_list_and_prepare_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path))
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "tiny-random" in result.output and "smol" in result.output
    result = runner.invoke(app, ["models", "prepare", "--preset", "tiny-random"])
    assert result.exit_code == 0 and "needs no conversion" in result.output
    result = runner.invoke(app, ["models", "prepare", "--modalities", "video"])
    assert result.exit_code == 1 and "unknown modality 'video'" in result.output


def test_models_prepare_minilm_checks_its_package():
    """The classify encoder is read as its package ships it: prepare only checks it is there."""
    import json

    from uniflow_cli.models.presets import minilm_dir

    result = runner.invoke(app, ["models", "prepare", "--preset", "minilm", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["needs_conversion"] is False and payload["parts"]["encoder"]["entry"] == str(minilm_dir())


def test_help_shows_examples():
    for args in (["init", "--help"], ["models", "--help"], ["models", "prepare", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Examples" in result.output
