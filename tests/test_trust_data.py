"""Issue 12 (trust boundary), data side: user-dataset media paths, shard media, partition.json fields and
wrongly typed uniflow.toml values. Every bad input is one line, exit code != 0, nothing written."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import tomllib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from uniflow_cli.cli.app import app
from uniflow_cli.data.build import check_partition_info, load_split, read_partition_info
from uniflow_cli.data.schema import make_row, rows_to_dataset
from uniflow_cli.data.userdata import Columns, load_user
from uniflow_cli.errors import ConfigError, DataError, UniflowError
from uniflow_cli.models.settings import ModelSettings, PromptSettings
from uniflow_cli.workspace import AggregateSettings, LoraSettings, TrainSettings, dumps_config

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, message: str, code: int = 1) -> None:
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a UniflowError, not a TypeError
    assert "Traceback" not in res.output
    assert message in " ".join(res.output.split()), res.output


def in_thread(fn, timeout: float = 10.0):
    """fn()'s exception (or None); fails if fn is still running after ``timeout`` (a FIFO read blocks)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout} s (blocked on a FIFO?)"
    return box.get("error")


def png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ media paths
@pytest.fixture
def layout(tmp_path, monkeypatch):
    """ds/ holds the dataset and imgs/ok.png; outside/x.png lies beside it; ds/ has links and a FIFO."""
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UNIFLOW_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds" / "imgs").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "ds" / "imgs" / "ok.png").write_bytes(png())
    (tmp_path / "outside" / "x.png").write_bytes(png((0, 0, 255)))
    os.symlink(tmp_path / "outside" / "x.png", tmp_path / "ds" / "out-link.png")
    os.symlink("imgs/ok.png", tmp_path / "ds" / "in-link.png")
    os.mkfifo(tmp_path / "ds" / "fifo.png")
    return tmp_path


def fill(media: str | dict, root: Path) -> str | dict:
    if isinstance(media, dict):
        return {k: fill(v, root) if isinstance(v, str) else v for k, v in media.items()}
    return media.format(root=root)


def dataset(root: Path, media: str | dict, n_good: int = 3) -> Path:
    """ds/qa.jsonl: ``n_good`` fine rows, then one row whose image is ``media`` (row n_good + 1)."""
    rows = [{"question": f"q{i}?", "answer": "red", "image": "imgs/ok.png"} for i in range(n_good)]
    rows.append({"question": "bad?", "answer": "blue", "image": media})
    path = root / "ds" / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


OUTSIDE = "resolves to {root}/outside/x.png, outside the dataset directory {root}/ds"
REFUSED = [  # (media value, message); {root} is the test's tmp_path
    ("../outside/x.png", OUTSIDE),
    ("imgs/../../outside/x.png", OUTSIDE),
    ("{root}/outside/x.png", OUTSIDE),  # absolute
    ("out-link.png", OUTSIDE),  # a symlink inside the dataset pointing out
    ({"bytes": None, "path": "../outside/x.png"}, OUTSIDE),
    ("fifo.png", "fifo.png is a FIFO, not a regular file"),
    ("imgs", "imgs is a directory, not a regular file"),
    ("gone.png", "'gone.png' (row 4 of"),
]


@pytest.mark.parametrize(("media", "message"), REFUSED)
def test_refused_media_path(layout, media, message):
    src = load_user(dataset(layout, fill(media, layout)))
    message = message.format(root=layout)
    for step in (lambda: src.check([3]), lambda: src.fetch([3])):  # check: before writing; fetch: on its own too
        err = in_thread(step)
        assert isinstance(err, DataError), repr(err)
        assert message in str(err) and "row 4 of" in str(err)
    assert src.check([0, 1, 2]) is None and len(src.fetch([0, 1, 2])) == 3  # other rows are unaffected


@pytest.mark.parametrize("media", ["../outside/x.png", "{root}/outside/x.png", "out-link.png"])
def test_allow_media_outside_lets_a_root_in(layout, media):
    f = dataset(layout, media.format(root=layout))
    with pytest.raises(DataError, match=r"Fix: move the file under .*/ds, or pass --allow-media-outside .*/outside"):
        load_user(f).check([3])
    src = load_user(f, allow_media_outside=[layout / "outside"])
    src.check([3])
    assert Image.open(io.BytesIO(src.fetch([3])[0]["image"]["bytes"])).getpixel((0, 0)) == (0, 0, 255)


def test_allowed_root_still_needs_regular_files(layout):
    src = load_user(dataset(layout, "/dev/null"), allow_media_outside=[Path("/dev")])
    with pytest.raises(DataError, match=r"/dev/null is a device or socket, not a regular file"):
        src.check([3])


def test_symlink_that_stays_inside_is_fine(layout):
    src = load_user(dataset(layout, "in-link.png"))
    src.check([3])
    assert src.fetch([3])[0]["image"]["bytes"] == png()


def test_folder_dataset_metadata_is_confined_to_the_folder(layout):
    root = layout / "ds"
    (root / "train").mkdir()
    (root / "train" / "a.png").write_bytes(png())
    # train/ resolves against itself, but may use the folder's other files; never outside the folder
    meta = [{"file_name": "a.png", "question": "q?", "answer": "a"}, {"file_name": "../imgs/ok.png", "question": "r?", "answer": "b"},
            {"file_name": "../../outside/x.png", "question": "s?", "answer": "c"}]
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    src = load_user(root)
    src.check([0, 1])
    with pytest.raises(DataError, match=r"'../../outside/x.png' \(row 3 of .*metadata.jsonl\) resolves to .*outside"):
        src.check([2])


def test_embedded_bytes_are_not_paths(layout):
    src = load_user(dataset(layout, {"bytes": None, "path": None}))
    with pytest.raises(DataError, match=r"unreadable image None \(row 4 of .*\): no media file name"):
        src.check([3])
    f = layout / "ds" / "b.jsonl"
    f.write_text(json.dumps({"question": "q?", "answer": "a", "image": {"bytes": None, "path": 7}}) + "\n")
    with pytest.raises(DataError, match=r"media column 'image' of .*b.jsonl holds 7, not a file name"):
        load_user(f, Columns())


def partition_args(*extra):
    # 4 rows, 1 test row and 3 training rows for 1 client: the bad row 4 is always chosen
    return ["partition", "-d", "ds/qa.jsonl", "--clients", "image:1", "--test-per-modality", "1", "--out", "data", *extra]


@pytest.mark.parametrize(("media", "message"), REFUSED)
def test_partition_cli_refuses_before_writing(layout, monkeypatch, media, message):
    import uniflow_cli.atomic

    dataset(layout, fill(media, layout))

    def no_publish(*_a, **_k):
        raise AssertionError("publish_dir reached: the media check must come before any write")

    monkeypatch.setattr(uniflow_cli.atomic, "publish_dir", no_publish)
    box: dict = {}
    assert in_thread(lambda: box.setdefault("res", run(*partition_args()))) is None
    assert_one_line_error(box["res"], message.format(root=layout))
    assert not (layout / "data").exists() and not [p for p in layout.iterdir() if p.name.startswith(".")]


def test_partition_cli_fifo_with_force_keeps_the_earlier_data(layout):
    dataset(layout, "imgs/ok.png")
    assert run(*partition_args()).exit_code == 0
    before = (layout / "data" / "partition.json").read_bytes()
    dataset(layout, "fifo.png")
    box: dict = {}
    assert in_thread(lambda: box.setdefault("res", run(*partition_args("--force")))) is None
    assert_one_line_error(box["res"], "fifo.png is a FIFO, not a regular file")
    assert (layout / "data" / "partition.json").read_bytes() == before
    assert not [p for p in layout.iterdir() if p.name.startswith(".")]


def test_partition_cli_allow_media_outside(layout):
    dataset(layout, "../outside/x.png")
    res = run(*partition_args())
    assert_one_line_error(res, "pass --allow-media-outside")
    res = run(*partition_args("--allow-media-outside", "outside", "--allow-media-outside", "ds/imgs"))
    assert res.exit_code == 0, res.output
    shards = [load_split(layout / "data" / d) for d in ("clients/0", "test/image")]
    assert (0, 0, 255) in {im.getpixel((0, 0)) for ds in shards for im in ds["image"]}


def test_partition_cli_allow_media_outside_must_be_a_directory(layout):
    dataset(layout, "imgs/ok.png")
    assert_one_line_error(run(*partition_args("--allow-media-outside", "nowhere")), "--allow-media-outside 'nowhere' is not a directory", code=2)
    assert not (layout / "data").exists()


# ------------------------------------------------------------------------------------------------ shard media
def test_shard_naming_a_path_is_refused_by_load_split_and_data_show(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.png").write_bytes(png())
    import pyarrow as pa

    rows = [make_row(id=i, modality="image", question="q?", answer="a", image_bytes=png()) for i in "ij"]
    rows_to_dataset(rows).save_to_disk(str(tmp_path / "shard"))
    # save_to_disk embeds files itself: a hostile shard is an Arrow file edited by hand
    (arrow,) = (tmp_path / "shard").glob("*.arrow")
    table = pa.ipc.open_stream(arrow.read_bytes()).read_all()
    images = table.column("image").to_pylist()
    images[1] = {"bytes": None, "path": str(tmp_path / "secret.png")}
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, type=table.schema.field("image").type))
    with pa.ipc.new_stream(str(arrow), table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(DataError, match=r"shard: row 2 holds a path to its image, not the embedded bytes"):
        load_split(tmp_path / "shard")
    assert_one_line_error(run("data", "show", "shard", "--preview", "prev"), "row 2 holds a path to its image")
    assert not (tmp_path / "prev").exists()


def test_shard_with_untyped_media_columns_is_refused(tmp_path):
    import datasets

    cols = ("id", "modality", "question", "answer", "image", "audio", "label", "text_pair")
    datasets.Dataset.from_dict({c: ["x"] for c in cols}).save_to_disk(str(tmp_path / "shard"))
    with pytest.raises(DataError, match=r"column 'image' is Value\(.*string.*\), not embedded image bytes"):
        load_split(tmp_path / "shard")


# ------------------------------------------------------------------------------------------------ partition.json
def _info(**client):
    return {"clients": [{"id": 0, "modalities": ["image"], "count": 3, "counts": {"image": 3}, **client}],
            "modalities": {"image": {"clients": [0], "train_rows": 3, "test_rows": 1}}}


BAD_INFOS = [
    (["not", "an", "object"], "holds a JSON list, not an object"),
    ({"clients": {"0": {}}}, "clients={'0': {}} must be a list of objects"),
    ({"clients": ["0"]}, "clients[0]='0' must be an object with an id"),
    ({"clients": [{"modalities": ["image"]}]}, "clients[0].id=None is not a client id"),
    (_info(id="../x"), "clients[0].id='../x' is not a client id"),
    (_info(id="a/b"), "clients[0].id='a/b' is not a client id"),
    (_info(id="a..b"), "clients[0].id='a..b' is not a client id"),
    (_info(id="x" * 65), "is not a client id"),
    (_info(id=True), "clients[0].id=True is not a client id"),
    (_info(id=-1), "clients[0].id=-1 is not a client id"),
    (_info(id=1.5), "clients[0].id=1.5 is not a client id"),
    ({"clients": [{"id": 0}, {"id": "0"}]}, "clients[1].id='0' is listed twice"),
    (_info(modalities="image"), "clients[0].modalities='image' must be a list of modality names"),
    (_info(modalities=["video"]), "clients[0].modalities=['video'] must be a list of modality names"),
    (_info(modalities=[3]), "clients[0].modalities=[3] must be a list"),
    (_info(count=-1), "clients[0].count=-1 must be an integer >= 0"),
    (_info(count=2.5), "clients[0].count=2.5 must be an integer >= 0"),
    (_info(count=True), "clients[0].count=True must be an integer >= 0"),
    (_info(count="3"), "clients[0].count='3' must be an integer >= 0"),
    (_info(counts=[3]), "clients[0].counts=[3] must be an object"),
    (_info(counts={"image": "3"}), "clients[0].counts.image='3' must be an integer >= 0"),
    (_info(counts={"video": 3}), "clients[0].counts key=['video']"),
    ({"clients": [], "modalities": ["image"]}, "modalities=['image'] must be an object keyed by modality"),
    ({"clients": [], "modalities": {"video": {}}}, "modalities key=['video']"),
    ({"clients": [], "modalities": {"image": 3}}, "modalities.image=3 must be an object"),
    ({"clients": [], "modalities": {"image": {"clients": ["../x"]}}}, "modalities.image.clients[0]='../x' is not a client id"),
    ({"clients": [], "modalities": {"image": {"clients": "0"}}}, "modalities.image.clients='0' must be a list"),
    ({"clients": [], "modalities": {"image": {"test_rows": -2}}}, "modalities.image.test_rows=-2 must be an integer >= 0"),
]


@pytest.mark.parametrize(("info", "message"), BAD_INFOS)
def test_bad_partition_json_fields(tmp_path, info, message):
    with pytest.raises(DataError, match="re-run 'uniflow partition --force'") as err:
        check_partition_info(info, "p.json")
    assert message in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "partition.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"partition.json: |partition.json holds"):
        read_partition_info(tmp_path / "partition.json")


@pytest.mark.parametrize("info", [_info(), _info(id="client-a.1"), {"clients": [{"id": 0, "modalities": ["image"]}]}, {}])
def test_good_partition_json(tmp_path, info):
    (tmp_path / "partition.json").write_text(json.dumps(info))
    assert read_partition_info(tmp_path / "partition.json") == info


def test_partition_json_file_problems(tmp_path):
    with pytest.raises(DataError, match="no partition summary at"):
        read_partition_info(tmp_path / "partition.json")
    (tmp_path / "partition.json").write_text("{not json")
    with pytest.raises(DataError, match="partition.json is unreadable"):
        read_partition_info(tmp_path / "partition.json")
    (tmp_path / "partition.json").unlink()
    os.mkfifo(tmp_path / "partition.json")
    err = in_thread(lambda: read_partition_info(tmp_path / "partition.json"))
    assert isinstance(err, UniflowError) and "FIFO" in str(err)


def test_partition_writes_ids_its_readers_accept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("partition", "-d", "text-qa", "--clients", "text:2,mixed:1", "--train-per-client", "2", "--test-per-modality", "1", "--out", "d")
    assert res.exit_code == 0, res.output
    info = read_partition_info(tmp_path / "d" / "partition.json")
    assert [c["id"] for c in info["clients"]] == [0, 1, 2] and list(info["modalities"]) == ["text"]


# ------------------------------------------------------------------------------------------------ config types
BAD_SETTINGS = [
    (LoraSettings, {"r": "8"}, "r='8' must be an integer, not a string. Fix: write r = 8 in the [lora] table"),
    (LoraSettings, {"r": 8.0}, "r=8.0 must be an integer, not a float"),
    (LoraSettings, {"r": True}, "r=true must be an integer, not a boolean"),
    (LoraSettings, {"lora_alpha": "16"}, "lora_alpha='16' must be a number, not a string. Fix: write lora_alpha = 16.0"),
    (LoraSettings, {"lora_alpha": 0}, "lora_alpha=0 must be a positive number"),
    (LoraSettings, {"lora_alpha": False}, "lora_alpha=false must be a number, not a boolean"),
    (LoraSettings, {"lora_dropout": "0.1"}, "lora_dropout='0.1' must be a number"),
    (LoraSettings, {"use_rslora": "yes"}, "use_rslora='yes' must be true or false, not a string"),
    (LoraSettings, {"use_rslora": 1}, "use_rslora=1 must be true or false, not an integer"),
    (LoraSettings, {"llm_target_modules": "q_proj"}, "llm_target_modules='q_proj' must be a list of strings, not a string"),
    (LoraSettings, {"llm_target_modules": 3}, "llm_target_modules=3 must be a list of strings, not an integer"),
    (LoraSettings, {"encoder_target_modules": ["query", 3]}, "encoder_target_modules=['query', 3] must be a list of strings, not a list holding 3"),
    (TrainSettings, {"tau": "x"}, "tau='x' must be a number, not a string. Fix: write tau = 0.25 in the [train] table"),
    (TrainSettings, {"steps": 2.5}, "steps=2.5 must be an integer, not a float"),
    (TrainSettings, {"steps": True}, "steps=true must be an integer, not a boolean"),
    (TrainSettings, {"batch_size": "4"}, "batch_size='4' must be an integer"),
    (TrainSettings, {"lr": "2e-4"}, "lr='2e-4' must be a number"),
    (TrainSettings, {"lr": float("inf")}, "lr=inf must be a finite number > 0"),
    (TrainSettings, {"seed": 1.0}, "seed=1.0 must be an integer"),
    (TrainSettings, {"seed": -1}, "seed=-1 must be >= 0"),
    (AggregateSettings, {"lambda_": "1"}, "lambda='1' must be a number, not a string. Fix: write lambda = 1.0 in the [aggregate] table"),
    (AggregateSettings, {"lambda_": [1]}, "lambda=[1] must be a number, not a list"),
    (AggregateSettings, {"method": 3}, "method=3 must be a string"),
    (AggregateSettings, {"ridge": True}, "ridge=true must be a string, not a boolean"),
    (AggregateSettings, {"weighting": {"a": 1}}, "weighting={'a': 1} must be a string, not a table"),
    (ModelSettings, {"preset": 3}, 'preset=3 must be a string, not an integer. Fix: write preset = "smol" in the [model] table'),
    (ModelSettings, {"modalities": "image"}, "modalities='image' must be a list of strings, not a string"),
    (ModelSettings, {"modalities": ["image", 1]}, "modalities=['image', 1] must be a list of strings"),
    (ModelSettings, {"pool": 1}, "pool=1 must be a string"),
    (ModelSettings, {"pool_tokens": True}, "pool_tokens=true must be an integer, not a boolean"),
    (ModelSettings, {"image_size": 112.0}, "image_size=112.0 must be an integer, not a float"),
    (ModelSettings, {"audio_max_seconds": "10"}, "audio_max_seconds='10' must be a number"),
    (ModelSettings, {"preset": "custom", "llm": 3}, "llm=3 must be a string, not an integer"),
    (ModelSettings, {"prompt": "hello"}, "prompt='hello' must be a table, not a string"),
    (ModelSettings, {"prompt": {"before": 3}}, "before=3 must be a string, not an integer. Fix: write before = "),
    (PromptSettings, {"use_chat_template": "true"}, "use_chat_template='true' must be true or false"),
    (PromptSettings, {"modality_open": ["<{Modality}>"]}, "modality_open=['<{Modality}>'] must be a string, not a list"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), BAD_SETTINGS)
def test_wrongly_typed_settings(cls, kwargs, message):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("data", [3, "smol", ["preset"]])
def test_model_table_must_be_a_table(data):
    with pytest.raises(ConfigError, match=r"\[model\] in uniflow.toml must be a table"):
        ModelSettings.from_dict(data)


def test_well_typed_settings_pass():
    assert LoraSettings(r=4, lora_alpha=8, llm_target_modules=("q_proj",)).llm_target_modules == ["q_proj"]  # int alpha, tuple
    assert TrainSettings(tau=0, lr=1).tau == 0
    assert AggregateSettings(lambda_=0).lambda_ == 0
    assert ModelSettings(preset="tiny-random", modalities=("audio", "image")).modalities == ["image", "audio"]


# Through the CLI: the value is written into uniflow.toml of a real (tiny-random) workspace.
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    from tests.workspace_factory import make_workspace

    return make_workspace(tmp_path_factory.mktemp("tpl") / "fed", {"0": "image"}, test=("image",))


def _set(ws: Path, table: str, key: str, value) -> None:
    config = tomllib.loads((ws / "uniflow.toml").read_text())
    section = config
    for name in table.split("."):
        section = section[name]
    if key == "lambda":
        section.pop("lambda_", None)  # init writes the field name; the server reads either
    section[key] = value
    (ws / "uniflow.toml").write_text(dumps_config(config))


CLI_CASES = [
    (["local-train", "--client", "0", "--steps", "1"], "train", "steps", 2.5, "steps=2.5 must be an integer", "rounds/1/clients/0"),
    (["local-train", "--client", "0", "--steps", "1"], "train", "tau", "x", "tau='x' must be a number", "rounds/1/clients/0"),
    (["local-train", "--client", "0"], "train", "steps", True, "steps=true must be an integer", "rounds/1/clients/0"),
    (["local-train", "--client", "0", "--steps", "1"], "lora", "r", "8", "r='8' must be an integer", "rounds/1/clients/0"),
    (["local-train", "--client", "0", "--steps", "1"], "lora", "llm_target_modules", 3, "llm_target_modules=3 must be a list of strings", "rounds/1/clients/0"),
    (["local-train", "--client", "0", "--steps", "1"], "model", "preset", 3, "preset=3 must be a string", "rounds/1/clients/0"),
    (["evaluate", "--round", "0"], "lora", "lora_alpha", "16", "lora_alpha='16' must be a number", "eval/round-0.json"),
    (["evaluate", "--round", "0"], "lora", "lora_alpha", 0, "lora_alpha=0 must be a positive number", "eval/round-0.json"),
    (["evaluate", "--round", "0"], "model", "modalities", ["image", 3], "modalities=['image', 3] must be a list of strings", "eval/round-0.json"),
    (["evaluate", "--round", "0"], "model.prompt", "before", 3, "before=3 must be a string", "eval/round-0.json"),
    (["aggregate", "--round", "1"], "aggregate", "lambda", "1", "lambda='1' must be a number", "rounds/1/global"),
    (["aggregate", "--round", "1"], "aggregate", "method", 3, "method=3 must be a string", "rounds/1/global"),
]


@pytest.mark.parametrize(("args", "table", "key", "value", "message", "output"), CLI_CASES)
def test_wrongly_typed_toml_via_cli(template, tmp_path, args, table, key, value, message, output):
    ws = tmp_path / "fed"
    shutil.copytree(template, ws)
    _set(ws, table, key, value)
    res = run(*args, "-w", ws)
    assert_one_line_error(res, message)
    assert not (ws / output).exists()
