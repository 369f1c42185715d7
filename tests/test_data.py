"""Built-in datasets, user datasets, media decoding and the shard schema."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from uniflow_cli.data import builtin, speech
from uniflow_cli.data.build import load_split, resolve_source
from uniflow_cli.data.media import encode_wav, load_audio, load_image
from uniflow_cli.data.schema import COLUMNS, make_row, rows_to_dataset
from uniflow_cli.data.source import TEST, TRAIN
from uniflow_cli.data.userdata import Columns, load_user
from uniflow_cli.errors import DataError, MissingDependencyError, UsageError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- built-ins
def test_question_pool_is_large_distinct_and_checkable():
    pool = builtin.question_pool()
    assert len(pool) > 20_000
    assert len({q for q, _a, _k in pool}) == len(pool)
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    checked = 0
    for q, a, _kind in pool:
        if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", q):
            assert int(a) == ops[m[2]](int(m[1]), int(m[3])), q
            checked += 1
        elif m := re.fullmatch(r"Which is (larger|smaller), (\d+) or (\d+)\?", q):
            assert int(a) == (max if m[1] == "larger" else min)(int(m[2]), int(m[3])), q
            checked += 1
        elif m := re.fullmatch(r"How many letters are in the word (\w+)\?", q):
            assert int(a) == len(m[1])
            checked += 1
    assert checked > 20_000
    kinds = {k for _q, _a, k in pool}
    assert len(kinds) >= 8


def test_text_and_spoken_share_a_fixed_split():
    text, spoken = builtin.text_qa(0), builtin.spoken_qa(5)
    assert np.array_equal(text.roles, spoken.roles)
    frac = float((text.roles == TEST).mean())
    assert 0.15 < frac < 0.25
    assert set(np.unique(text.roles)) == {TRAIN, TEST}


def test_text_qa_rows():
    rows = builtin.text_qa().fetch([0, 10_001])
    assert rows[0]["question"] == "What is 0 plus 0?" and rows[0]["answer"] == "0"
    assert rows[1]["modality"] == "text" and rows[1]["image"] is None and rows[1]["audio"] is None
    assert rows[1]["label"] == rows[1]["answer"]


def test_easy_vqa_rows_are_valid_images():
    src = builtin.easy_vqa()
    assert src.modality == "image" and len(set(src.answers)) == 13
    assert (src.roles == TRAIN).sum() > 30_000 and (src.roles == TEST).sum() > 9_000
    test_row = int(np.flatnonzero(src.roles == TEST)[0])
    rows = src.fetch([0, 1, test_row])
    for row in rows:
        im = load_image(row["image"])
        assert im.mode == "RGB" and im.size == (64, 64)
        assert np.asarray(im).std() > 0  # not a blank image
    assert rows[2]["id"].startswith("easy-vqa-test-")
    assert set(src.labels("kind")) == {"yes/no", "shape", "color"}


def test_spoken_qa_is_16k_mono_nonsilent_and_cached(monkeypatch):
    src = builtin.spoken_qa(0)
    rows = src.fetch([3, 12_345])
    for row in rows:
        assert row["modality"] == "audio" and row["image"] is None
        data = row["audio"]["bytes"]
        info = sf.info(io.BytesIO(data))
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        wave = load_audio(row["audio"])
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert 0.5 < len(wave) / 16_000 < 8.0
        assert float(np.sqrt(np.mean(wave**2))) > 0.01  # speech, not silence
    # cached: a second fetch must not call espeak-ng at all
    monkeypatch.setattr(speech, "_synthesise_one", lambda *a: pytest.fail("synthesised again"))
    monkeypatch.setattr(speech.shutil, "which", lambda _name: None)
    again = src.fetch([3, 12_345])
    assert [r["audio"]["bytes"] for r in again] == [r["audio"]["bytes"] for r in rows]


def test_spoken_voices_and_speeds_vary():
    pool = builtin.question_pool()
    picks = {builtin._voice_for(q, 0) for q, _a, _k in pool[:200]}
    assert len({v for v, _s in picks}) >= 6 and len({s for _v, s in picks}) >= 3
    assert builtin._voice_for(pool[0][0], 0) == builtin._voice_for(pool[0][0], 0)


def test_espeak_missing_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(MissingDependencyError, match=r"espeak-ng is not installed.*Fix: apt-get install espeak-ng"):
        builtin.spoken_qa(0).fetch([7])


def test_unknown_dataset():
    with pytest.raises(UsageError, match=r"unknown dataset 'cifar-99'.*easy-vqa, spoken-qa, text-qa"):
        resolve_source("cifar-99")


# ---------------------------------------------------------------- media
def _png(color=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _wav(sr=44_100, seconds=0.25, channels=2) -> bytes:
    t = np.arange(int(sr * seconds)) / sr
    wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([wave] * channels, axis=1) if channels > 1 else wave, sr, format="WAV")
    return buf.getvalue()


def test_load_image_accepts_every_form(tmp_path):
    data = _png()
    (tmp_path / "a.png").write_bytes(data)
    for value in (data, tmp_path / "a.png", str(tmp_path / "a.png"), {"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "a.png")}):
        im = load_image(value)
        assert im.size == (8, 6) and im.getpixel((0, 0)) == (200, 30, 30)
    assert load_image(Image.new("L", (3, 3))).mode == "RGB"


def test_load_audio_resamples_and_downmixes():
    wave = load_audio({"bytes": _wav(sr=44_100, seconds=0.5, channels=2), "path": "x.wav"})
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 8_000
    assert abs(float(np.abs(wave).max()) - 0.5) < 0.02
    assert len(load_audio(_wav(sr=16_000, seconds=1, channels=1), sampling_rate=8_000)) == 8_000
    back = load_audio(encode_wav(wave))
    assert np.max(np.abs(back - wave)) < 1e-3  # PCM16 round trip


@pytest.mark.parametrize(("fn", "what"), [(load_image, "image"), (load_audio, "audio")])
def test_unreadable_media(fn, what):
    with pytest.raises(DataError, match=f"unreadable {what}"):
        fn(b"definitely not media")


def test_schema_round_trip(tmp_path):
    rows = [
        make_row(id="i", modality="image", question="q?", answer="red", image_bytes=_png()),
        make_row(id="a", modality="audio", question="q2?", answer="4", audio_bytes=encode_wav(np.zeros(160, np.float32) + 0.1), label="kind"),
        make_row(id="t", modality="text", question="q3?", answer="yes"),
    ]
    rows_to_dataset(rows).save_to_disk(str(tmp_path / "ds"))
    ds = load_split(tmp_path / "ds")
    assert ds.column_names == list(COLUMNS) and len(ds) == 3
    assert load_image(ds[0]["image"]).size == (8, 6) and ds[0]["audio"] is None
    assert ds[1]["image"] is None and len(load_audio(ds[1]["audio"])) == 160 and ds[1]["label"] == "kind"
    assert ds[2]["label"] == "yes"


def test_load_split_errors(tmp_path):
    with pytest.raises(DataError, match=r"no dataset directory at .*nope.*Fix: run 'uniflow partition'"):
        load_split(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"not a saved dataset \(no state.json\)"):
        load_split(tmp_path / "plain")
    rows_to_dataset([make_row(id="t", modality="text", question="q?", answer="a")]).select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"empty \(0 rows\)"):
        load_split(tmp_path / "empty")


# ---------------------------------------------------------------- user datasets
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_jsonl_with_relative_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "r.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "imgs" / "g.png").write_bytes(_png((0, 255, 0)))
    f = _write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "colour?", "answer": "red", "image": "imgs/r.png", "topic": "c"},
            {"question": "colour?", "answer": "green", "image": "imgs/g.png", "topic": "c"},
        ],
    )
    src = load_user(f)
    assert src.modality == "image" and src.kind == "user" and len(src) == 2
    rows = src.fetch([1, 0])
    assert load_image(rows[0]["image"]).getpixel((0, 0)) == (0, 255, 0)
    assert rows[1]["answer"] == "red" and rows[0]["id"] == "qa-1"
    assert src.labels("topic") == ["c", "c"]


def test_user_jsonl_with_audio_is_stored_as_16k_mono_wav(tmp_path):
    (tmp_path / "a.wav").write_bytes(_wav(sr=22_050, seconds=0.5))
    f = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "what?", "a": "beep", "sound": "a.wav"}])
    src = load_user(f, Columns(question="q", answer="a", media="sound"))
    assert src.modality == "audio"
    data = src.fetch([0])[0]["audio"]["bytes"]
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.frames) == (16_000, 1, 8_000)


def test_user_csv_and_parquet_text(tmp_path):
    (tmp_path / "qa.csv").write_text("prompt,reply\nhi?,hello\n2+2?,4\n")
    src = load_user(tmp_path / "qa.csv", Columns(question="prompt", answer="reply"))
    assert src.modality == "text" and src.answers == ["hello", "4"]
    import datasets

    datasets.Dataset.from_dict({"question": ["a?", "b?"], "answer": ["1", "2"]}).to_parquet(str(tmp_path / "qa.parquet"))
    assert load_user(tmp_path / "qa.parquet").questions == ["a?", "b?"]


def test_user_save_to_disk_dict_keeps_its_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"question": ["a?", "b?", "c?"], "answer": ["1", "2", "3"]}),
            "test": datasets.Dataset.from_dict({"question": ["d?"], "answer": ["4"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    src = load_user(tmp_path / "hf")
    assert src.roles.tolist() == [TRAIN, TRAIN, TRAIN, TEST]


def test_user_save_to_disk_with_image_feature(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"question": ["c?"], "answer": ["red"], "image": [{"bytes": _png(), "path": None}]},
        features=datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image()}),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    src = load_user(tmp_path / "hf")
    assert src.modality == "image"
    assert load_image(src.fetch([0])[0]["image"]).size == (8, 6)


def test_user_imagefolder_with_metadata(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        (root / split / "x.png").write_bytes(_png())
        _write_jsonl(root / split / "metadata.jsonl", [{"file_name": "x.png", "question": "q?", "answer": split}])
    src = load_user(root)
    assert src.modality == "image" and src.roles.tolist() == [TEST, TRAIN]  # sorted: test/, train/
    assert src.fetch([0])[0]["answer"] == "test"


def test_user_audiofolder_with_metadata(tmp_path):
    root = tmp_path / "af"
    root.mkdir()
    (root / "c.flac").write_bytes(b"")
    sf.write(str(root / "c.flac"), np.zeros(1600, np.float32) + 0.2, 16_000)
    (root / "metadata.csv").write_text("file_name,question,answer\nc.flac,what sound?,hum\n")
    src = load_user(root)
    assert src.modality == "audio" and len(load_audio(src.fetch([0])[0]["audio"])) == 1600


def test_missing_columns_are_named_with_those_present(tmp_path):
    f = _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "x?", "reply": "y"}])
    with pytest.raises(DataError, match=r"column\(s\) 'question', 'answer' missing from .*qa.jsonl \(present: prompt, reply\).*--question-column"):
        load_user(f)
    with pytest.raises(DataError, match=r"column\(s\) 'pic' missing .*present: prompt, reply.*--media-column"):
        load_user(f, Columns(question="prompt", answer="reply", media="pic"))


def test_unreadable_image_names_file_and_row(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    f = _write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "a?", "answer": "1", "image": "ok.png"}, {"question": "b?", "answer": "2", "image": "bad.png"},
         {"question": "c?", "answer": "3", "image": "gone.png"}],
    )
    src = load_user(f)
    assert len(src.fetch([0])) == 1
    with pytest.raises(DataError, match=r"unreadable image .*bad.png \(row 2 of .*qa.jsonl\)"):
        src.fetch([1])
    with pytest.raises(DataError, match=r"unreadable image 'gone.png' \(row 3 of .*qa.jsonl\)"):
        src.fetch([2])


def test_unreadable_audio_names_file_and_row(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    f = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "answer": "1", "audio": "bad.wav"}])
    with pytest.raises(DataError, match=r"unreadable audio .*bad.wav \(row 1 of .*qa.jsonl\)"):
        load_user(f).fetch([0])


@pytest.mark.parametrize("content", ["", "\n"])
def test_empty_user_dataset(tmp_path, content):
    (tmp_path / "qa.jsonl").write_text(content)
    with pytest.raises(DataError, match=r"empty \(0 rows\)"):
        load_user(tmp_path / "qa.jsonl")


def test_empty_csv_with_header(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match=r"empty \(0 rows\)"):
        load_user(tmp_path / "qa.csv")


def test_unsupported_file_and_plain_folder(tmp_path):
    (tmp_path / "qa.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported dataset file .*qa.txt"):
        load_user(tmp_path / "qa.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"neither a save_to_disk dataset nor a folder with metadata"):
        load_user(tmp_path / "d")
