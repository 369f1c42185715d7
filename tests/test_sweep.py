"""``uniflow sweep``: grids parsed and validated before anything runs (one line per bad value), deterministic
cell ids, a tiny real sweep whose rows carry every field and are skipped on rerun, an interrupted cell that
resumes to the same rows, and the report's tables and two-standard-error rule on hand-computed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli_runner import ok, run
from tests.conftest import REPO
from uniflow_cli.errors import ConfigError, UniflowError, UsageError, WorkspaceError

TINY = """
[sweep]
name = "tiny"
task = "classify"
preset = "tiny-random"
dataset = "snli"
clients = "text:2"
scheme = "dirichlet"
train_per_client = 8
test_per_modality = 8
rounds = 2
eval_every = 1
steps = 2
batch_size = 4

[axes]
method = ["fedit", "fedA2"]
seed = [0]
"""


@pytest.fixture(autouse=True)
def _reproducible(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    monkeypatch.setenv("UNIFLOW_THREADS", "1")  # the sums' order is part of the bytes


def grid_file(tmp_path: Path, text: str, name: str = "grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, **kw):
    from uniflow_cli.sweep import load_grid

    return load_grid(grid_file(tmp_path, text), **kw)


# ---------------------------------------------------------------------------------------------- parsing
def test_axes_expand_in_file_order_with_named_variants_and_excludes(tmp_path):
    grid = load(tmp_path, TINY.replace('method = ["fedit", "fedA2"]\nseed = [0]', """seed = [0, 1]
lambda = [0.1, 1]

[axes.adapter]
lora = { adapter = "lora" }
vera = { adapter = "vera", r = 16, lr = 4e-3 }

[axes.method]
fedit = { method = "fedit" }
fedA2-warm = { method = "fedA2", warm_start = 0.5 }
svd = { method = "svd" }

[[exclude]]
adapter = "vera"
method = "svd"
"""))
    assert grid.name == "tiny" and grid.axes == ["seed", "lambda", "adapter", "method"]
    assert len(grid.cells) == 2 * 2 * (2 * 3 - 1)
    assert [c.id for c in grid.cells[:6]] == ["s0_lambda-0.1_lora_fedit", "s0_lambda-0.1_lora_fedA2-warm", "s0_lambda-0.1_lora_svd",
                                              "s0_lambda-0.1_vera_fedit", "s0_lambda-0.1_vera_fedA2-warm", "s0_lambda-1_lora_fedit"]
    warm = grid.cells[4].settings
    assert (warm.aggregate.method, warm.aggregate.lambda_, warm.run.warm_start, warm.run.warm_rounds) == ("fedA2", 0.1, 0.5, 1)
    assert (warm.lora.adapter, warm.lora.r, warm.train.lr, warm.lora.projection_prng_key) == ("vera", 16, 4e-3, 0)
    assert warm.model.labels == ["entailment", "neutral", "contradiction"]  # a built-in's labels by default
    assert warm.train.stages == "joint" and warm.partition.seed == 0
    assert grid.cells[-1].settings.run.seed == 1 and grid.cells[-1].settings.partition.seed == 1


def test_set_overrides_a_knob_or_an_axis_and_full_applies_its_table(tmp_path):
    text = TINY + "\n[full]\nrounds = 9\nsteps = 5\n"
    grid = load(tmp_path, text, sets=["seed=[3, 4]", "lr=0.01", "adapter=rslora"])
    assert [c.id for c in grid.cells] == ["fedit_s3", "fedit_s4", "fedA2_s3", "fedA2_s4"]
    s = grid.cells[0].settings
    assert s.train.lr == 0.01 and s.lora.use_rslora and s.adapter == "rslora"
    full = load(tmp_path, text, full=True)
    assert full.name == "tiny-full" and full.cells[0].settings.run.rounds == 9 and full.cells[0].settings.train.steps == 5


BAD = [
    ("unknown [sweep] key", ("steps = 2", "stpes = 2"), ConfigError, r"\[sweep\]: unknown key 'stpes'.*did you mean 'steps'"),
    ("unknown axis", ('method = ["fedit", "fedA2"]', 'metod = ["fedit"]'), ConfigError, r"unknown key 'metod'.*did you mean 'method'"),
    ("unknown table", ("[axes]", "[axis]"), ConfigError, r"unknown table 'axis'.*did you mean 'axes'"),
    ("unknown method", ('"fedA2"]', '"fedA3"]'), ConfigError, r"cell fedA3_s0: method=\"fedA3\" is not one of .*did you mean fedA2"),
    ("svd on VeRA", ('"fedA2"]', '"svd"]\nadapter = ["vera"]'), ConfigError, r"svd_vera_s0: method=\"svd\" is not defined for VeRA.*\[\[exclude\]\]"),
    ("bad rank", ("steps = 2", "steps = 2\nr = 0"), ConfigError, r"cell fedit_s0: r=0 must be a positive integer"),
    ("bad adapter", ("steps = 2", 'steps = 2\nadapter = "dora"'), ConfigError, r"adapter=\"dora\" is not one of lora, vera"),
    ("no rounds", ("rounds = 2\n", ""), ConfigError, r"no rounds"),
    ("rounds not a number", ("rounds = 2", 'rounds = "2"'), ConfigError, r"rounds=\"2\" must be a whole number >= 1"),
    ("warm start of fedsa", ('"fedA2"]', '"fedsa"]\nwarm_start = [0.5]'), ConfigError, r"warm_start with method fedsa"),
    ("warm start of no round", ('"fedA2"]', '"fedA2"]\nwarm_start = [0.1]'), ConfigError, r"warm_start=0.1 of rounds=2 gives 0 FedIT rounds"),
    ("exclude matching nothing", ("seed = [0]", 'seed = [0]\n[[exclude]]\nmethod = "ffa"'), ConfigError, r"matches no cell"),
    ("exclude of no axis", ("seed = [0]", 'seed = [0]\n[[exclude]]\nadapter = "vera"'), ConfigError, r"'adapter' is not an axis"),
    ("two axes, one knob", ("seed = [0]", "seed = [0]\n[axes.variant]\na = { method = \"ffa\" }"), ConfigError, r"both set method"),
    ("empty axis", ("seed = [0]", "seed = []"), ConfigError, r"\[axes\] seed is empty"),
    ("a value twice", ("seed = [0]", "seed = [0, 0]"), ConfigError, r"lists a value twice"),
    ("bad clients", ('clients = "text:2"', 'clients = "txt:2"'), ConfigError, r"clients=\"txt:2\": bad clients entry 'txt:2'"),
    ("unknown dataset", ('dataset = "snli"', 'dataset = "nope"\nlabels = "a,b"'), ConfigError, r"dataset 'nope' is neither a built-in"),
    ("bad train_clients", ("steps = 2", 'steps = 2\ntrain_clients = ["cars"]'), ConfigError, r"train_clients=.*names 'cars'"),
    ("bad partition type", ("train_per_client = 8", 'train_per_client = "8"'), ConfigError, r"train_per_client=\"8\" must be an integer"),
    ("classify staging", ("steps = 2", 'steps = 2\nstages = "two-stage"'), ConfigError, r"stages=\"two-stage\" does not apply to a classify model"),
    ("bad name", ('name = "tiny"', 'name = "a/b"'), ConfigError, r"name='a/b' is not a plain name"),
    ("not TOML", ("[axes]", "[axes"), ConfigError, r"is not valid TOML"),
]


@pytest.mark.parametrize(("case", "edit", "error", "match"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_grid_is_one_error_naming_the_value(tmp_path, case, edit, error, match):
    old, new = edit
    assert old in TINY
    with pytest.raises(error, match=match) as caught:
        load(tmp_path, TINY.replace(old, new, 1))
    assert "\n" not in str(caught.value)


def test_bad_overrides_are_named(tmp_path):
    with pytest.raises(UsageError, match="--set 'rounds' is not KEY=VALUE"):
        load(tmp_path, TINY, sets=["rounds"])
    with pytest.raises(ConfigError, match="seed is an axis, so its value must be a list"):
        load(tmp_path, TINY, sets=["seed=3"])
    with pytest.raises(UsageError, match="has no \\[full\\] table"):
        load(tmp_path, TINY, full=True)
    with pytest.raises(UsageError, match="does not exist"):
        from uniflow_cli.sweep import load_grid

        load_grid(tmp_path / "missing.toml")


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "paper").glob("*.toml")), ids=lambda p: p.name)
def test_the_published_grids_are_valid_and_sized(path):
    from uniflow_cli.sweep import load_grid

    text = path.read_text()
    assert "# SIZE: " in text and " min on this" in text and "[full]" in text  # the estimate, and the full size elsewhere
    small, full = load_grid(path), load_grid(path, full=True)
    assert len(small.cells) == len(full.cells) > 0 and full.name == f"{small.name}-full"
    assert {c.settings.run.seed for c in small.cells} >= {0, 1, 2}  # at least three seeds


def test_cell_ids_are_deterministic_readable_and_short():
    from uniflow_cli.sweep import cell_id

    assert cell_id({"method": "fedA2", "seed": 0, "lambda_": 0.01, "ridge": "always"}) == "fedA2_s0_lambda-0.01_ridge-always"
    assert cell_id({"dataset": "rotten-tomatoes", "adapter": "vera", "variant": "two-stage"}, named={"variant"}) == "rotten-tomatoes_vera_two-stage"
    long = {f"knob{i}": "x" * 10 for i in range(8)}
    assert len(cell_id(long)) == 64 and cell_id(long) == cell_id(dict(long)) != cell_id({**long, "knob0": "y" * 10})


def test_dry_run_lists_the_cells_and_writes_nothing(tmp_path):
    path = grid_file(tmp_path, TINY)
    result = ok("sweep", "run", path, "--out", tmp_path / "out", "--dry-run", "--json")
    plan = json.loads(result.stdout)
    assert [(c["cell"], c["status"]) for c in plan["cells"]] == [("fedit_s0", "new"), ("fedA2_s0", "new")]
    assert plan["rows"] == str(tmp_path / "out" / "tiny.jsonl") and not (tmp_path / "out").exists()
    table = ok("sweep", "run", path, "--out", tmp_path / "out", "--dry-run").stdout
    assert "fedit_s0" in table and "fedA2_s0" in table and "2 to run" in table
    bad = run("sweep", "run", grid_file(tmp_path, TINY.replace("stpes", "x").replace("steps = 2", "stpes = 2"), "bad.toml"), "--dry-run")
    assert bad.exit_code != 0 and "did you mean 'steps'" in bad.output


# ---------------------------------------------------------------------------------------------- a real sweep
REQUIRED = ("grid", "cell", "adapter", "method", "seed", "dataset", "round", "accuracy", "macro_f1", "rel_error", "knobs", "config",
            "train_seconds", "cell_seconds")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny grid run once through the CLI: (grid file, out dir, rows path, the --json outcome)."""
    import os

    os.environ["UNIFLOW_THREADS"] = "1"  # module scope: the autouse fixture has not run yet
    root = tmp_path_factory.mktemp("sweep")
    path = grid_file(root, TINY)
    result = ok("sweep", "run", path, "--out", root / "out", "--rows", root / "rows" / "tiny.jsonl", "--json")
    return path, root / "out", root / "rows" / "tiny.jsonl", json.loads(result.stdout)


def strip_timing(rows):
    from uniflow_cli.sweep import TIMING_FIELDS

    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def test_a_tiny_sweep_writes_one_row_per_cell_and_round(swept):
    from uniflow_cli.sweep import read_rows

    _, out, rows_path, outcome = swept
    assert outcome["ran"] == ["fedit_s0", "fedA2_s0"] and outcome["rows_written"] == 4
    rows = read_rows(rows_path)
    assert [(r["cell"], r["round"]) for r in rows] == [("fedit_s0", 1), ("fedit_s0", 2), ("fedA2_s0", 1), ("fedA2_s0", 2)]
    for r in rows:
        assert set(REQUIRED) <= set(r)
        assert (r["grid"], r["adapter"], r["dataset"], r["seed"], r["task"]) == ("tiny", "lora", "snli", 0, "classify")
        assert 0 <= r["accuracy"] <= 100 and r["n"] == 8 and r["clients"] == 2 and r["rel_error"] >= 0
        assert r["config"]["train"]["steps"] == 2 and r["config"]["aggregate"]["method"] == r["method"] == r["round_method"]
    report = json.loads((out / "runs" / "fedA2_s0" / "rounds" / "2" / "report.json").read_text())
    assert rows[3]["rel_error"] == report["rel_error_mean"]  # the server's own per-round error
    ws = out / "runs" / "fedit_s0"
    assert (ws / "uniflow.toml").is_file() and (ws / "data" / "partition.json").is_file() and (ws / "eval" / "round-2.json").is_file()


def test_a_personalising_method_reports_its_clients_models(swept, tmp_path):
    """FedDPA's clients have their own models: the rows carry their mean (personal_*) and what a client uses
    (client_*); FedIT's clients use the global, and have no personal value."""
    from uniflow_cli.evaluation_io import read_eval_json
    from uniflow_cli.sweep import eval_metrics, read_rows

    path = grid_file(tmp_path, TINY.replace('method = ["fedit", "fedA2"]', 'method = ["feddpa"]').replace("rounds = 2", "rounds = 1"))
    ok("sweep", "run", path, "--out", tmp_path / "out", "--rows", tmp_path / "rows.jsonl")
    (row,) = read_rows(tmp_path / "rows.jsonl")
    ws = tmp_path / "out" / "runs" / "feddpa_s0"
    own = [eval_metrics(read_eval_json(ws / "eval" / "clients" / k / "round-1.json"), "classify") for k in ("0", "1")]
    assert row["personal_clients"] == 2 and row["personal_accuracy"] == pytest.approx(sum(o["accuracy"] for o in own) / 2)
    assert row["client_accuracy"] == row["personal_accuracy"] and row["client_macro_f1"] == row["personal_macro_f1"]
    fedit = read_rows(swept[2])[1]
    assert fedit["personal_accuracy"] is None and fedit["client_accuracy"] == fedit["accuracy"] and fedit["personal_clients"] == 0


def test_a_rerun_skips_finished_cells_and_keeps_the_rows(swept):
    path, out, rows_path, _ = swept
    before = rows_path.read_bytes()
    again = json.loads(ok("sweep", "run", path, "--out", out, "--rows", rows_path, "--json").stdout)
    assert again["ran"] == [] and again["skipped"] == ["fedit_s0", "fedA2_s0"] and rows_path.read_bytes() == before
    assert [c["status"] for c in again["cells"]] == ["done", "done"]


def test_an_interrupted_cell_resumes_to_the_same_rows(swept, tmp_path, monkeypatch):
    from uniflow_cli import simulate
    from uniflow_cli.sweep import load_grid, plan_sweep, read_rows, run_sweep

    path, _, rows_path, _ = swept
    real = simulate.aggregate_round

    def killed(plan, t, **kw):
        if t == 2 and plan.aggregate.method == "fedA2":
            raise KeyboardInterrupt  # a kill after round 2's local training of the second cell
        return real(plan, t, **kw)

    monkeypatch.setattr(simulate, "aggregate_round", killed)
    grid = load_grid(path)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan_sweep(grid, tmp_path / "out"))
    states = plan_sweep(grid, tmp_path / "out").states
    assert [(s.status, s.round) for s in states] == [("done", 0), ("partial", 1)]
    assert [r["cell"] for r in read_rows(tmp_path / "out" / "tiny.jsonl")] == ["fedit_s0"] * 2  # whole cells only
    round1 = (tmp_path / "out" / "runs" / "fedA2_s0" / "rounds" / "1" / "global").stat().st_ino
    monkeypatch.setattr(simulate, "aggregate_round", real)
    outcome = run_sweep(plan_sweep(load_grid(path), tmp_path / "out"))
    assert outcome.ran == ["fedA2_s0"] and outcome.skipped == ["fedit_s0"]
    assert (tmp_path / "out" / "runs" / "fedA2_s0" / "rounds" / "1" / "global").stat().st_ino == round1  # not trained again
    assert strip_timing(read_rows(tmp_path / "out" / "tiny.jsonl")) == strip_timing(read_rows(rows_path))


def test_a_changed_grid_or_a_foreign_rows_file_is_refused(swept, tmp_path):
    from uniflow_cli.sweep import load_grid, plan_sweep

    path, out, rows_path, _ = swept
    changed = load_grid(path, sets=["steps=3"])
    with pytest.raises(WorkspaceError, match=r"cell fedit_s0 .* another config \(train.steps: 2 then, 3 now\)"):
        plan_sweep(changed, out, rows_path)
    assert [s.status for s in plan_sweep(changed, out, rows_path, force=True).states] == ["redo", "redo"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"grid": "else", "cell": "x"}\n')
    with pytest.raises(WorkspaceError, match="is not the rows file of grid tiny"):
        plan_sweep(load_grid(path), out, other)
    with pytest.raises(WorkspaceError, match="holds rows of cell fedit_s0"):
        plan_sweep(load_grid(path), tmp_path / "elsewhere", rows_path)  # its rows would be dropped
    notes = tmp_path / "notes.jsonl"
    notes.write_text("not json\n")
    with pytest.raises(UniflowError, match="not a sweep rows file"):
        plan_sweep(load_grid(path), out, notes, force=True)


def test_the_report_command_writes_tables_and_plots_from_the_rows(swept, tmp_path):
    _, _, rows_path, _ = swept
    result = ok("sweep", "report", rows_path, "--out", tmp_path / "rep", "--metrics", "accuracy,rel_error", "--json")
    data = json.loads(result.stdout)
    assert sorted(Path(f).name for f in data["files"]) == ["tiny-snli-accuracy.png", "tiny-snli-rel_error.png", "tiny.md"]
    table = data["grids"]["tiny"][0]
    assert table["metric"] == "accuracy" and table["columns"] == ["snli"] and table["rounds"] == [2]
    assert [r["labels"] for r in table["rows"]] == [["lora", "fedit"], ["lora", "fedA2"]] and table["rows"][0]["values"]["snli"]["n"] == 1
    again = run("sweep", "report", rows_path, "--out", tmp_path / "rep")
    assert again.exit_code != 0 and "already exists" in again.output
    ok("sweep", "report", rows_path.parent, "--out", tmp_path / "rep", "--force")
    assert (tmp_path / "rep" / "tiny.md").read_text().startswith("## tiny")
    bad = run("sweep", "report", rows_path, "--out", tmp_path / "r2", "--metrics", "bleu")
    assert bad.exit_code == 2 and "--metrics bleu is not a metric of task classify" in bad.output


# ---------------------------------------------------------------------------------------------- report (pure)
def hand_rows():
    """Two methods × two datasets × three seeds; round 1 differs from the final round 2 on purpose."""
    finals = {("fedit", "a"): [80, 82, 84], ("fedA2", "a"): [85, 86, 87], ("fedit", "b"): [70, 75, 80], ("fedA2", "b"): [74, 76, 78]}
    rows = []
    for (method, dataset), values in finals.items():
        for seed, value in enumerate(values):
            for t in (1, 2):
                rows.append({"grid": "g", "cell": f"{dataset}_{method}_s{seed}", "task": "classify", "dataset": dataset, "adapter": "lora",
                             "method": method, "seed": seed, "round": t, "accuracy": value if t == 2 else 0.0, "rel_error": 0.01 * (seed + 1),
                             "knobs": {"seed": seed, "dataset": dataset, "method": method}, "cell_seconds": 30.0})
    return rows


def test_the_table_is_mean_std_n_over_seeds_at_the_final_round():
    from uniflow_cli.sweep_report import build_table, render_table

    table = build_table(hand_rows(), "accuracy")
    assert table.axes == ["adapter", "method"] and table.columns == ["a", "b"] and table.rounds == [2]
    assert render_table(table, "fedit") == "\n".join([
        "### Accuracy (%), final round (round 2)", "",
        "| Adapter | Method | a | b |",
        "| --- | --- | ---: | ---: |",
        "| lora | fedit | 82.00 ± 2.00 (3) | 75.00 ± 5.00 (3) |",
        "| lora | fedA2 | 86.00 ± 1.00 (3) | 76.00 ± 2.00 (3) |", "",
        "mean ± sample std over seeds (n seeds) of each cell's final-round value.", "",
        ("Difference from fedit (same row otherwise): Δ mean ± its standard error, paired by seed (the seeds' partitions and round-0 "
         "adapters are shared; Welch's where the seeds differ); **beyond 2 SE** is the only case to call a difference."), "",
        "| Adapter | Method | a | b |",
        "| --- | --- | ---: | ---: |",
        # paired by seed: a: d = 5, 4, 3 → 4 ± 1/√3; b: d = 4, 1, −2 → 1 ± 3/√3 (Welch's would be ± 1.29 and ± 3.11)
        "| lora | fedA2 | +4.00 ± 0.577 · **beyond 2 SE** | +1.00 ± 1.73 · within 2 SE |",
    ]) + "\n"
    errors = build_table(hand_rows(), "rel_error")
    assert [s.mean for _, s in [(l, v[0]) for l, v in errors.rows]] == pytest.approx([0.02, 0.02])


def test_a_baseline_may_name_another_axis_than_the_method():
    """``stages=joint``: a grid of one method compares its schedules; a per-module method's ``=`` is no axis."""
    from uniflow_cli.sweep_report import baseline_axis, build_table, comparisons

    rows = [{**r, "method": "fedA2", "knobs": {**r["knobs"], "method": "fedA2", "stages": r["method"]}} for r in hand_rows()]
    rows = [{**r, "knobs": {**r["knobs"], "stages": {"fedit": "joint", "fedA2": "two-stage"}[r["knobs"]["stages"]]}} for r in rows]
    table = build_table(rows, "accuracy")
    assert table.axes == ["adapter", "method", "stages"] and baseline_axis(table, "stages=joint") == (2, "joint")
    (labels, found), = comparisons(table, "stages=joint")
    assert labels == ("lora", "fedA2", "two-stage")
    assert (found[0].diff, found[1].diff) == pytest.approx((4.0, 1.0)) and found[0].beyond  # the method test's numbers, along stages
    assert comparisons(table, "fedit") == [] and comparisons(table, "stages=reverse") == []  # no such row: nothing compared
    assert baseline_axis(table, "encoders=fedsa,llm=fedA2") == (1, "encoders=fedsa,llm=fedA2")  # a method, not an axis


def test_a_grid_page_and_plots_come_from_the_rows_only():
    from uniflow_cli.sweep_report import plot_over_rounds, render_grid

    page = render_grid(hand_rows(), ["accuracy"], baseline="fedit", plots=["g-a-accuracy.png"], source="g.jsonl")
    assert page.startswith("## g\n\nGenerated by `uniflow sweep report` from g.jsonl: 12 cells, seeds 0, 1, 2; 6.0 min of cell wall time.")
    assert "[g-a-accuracy](g-a-accuracy.png)" in page
    png = plot_over_rounds(hand_rows(), "a", "accuracy")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == plot_over_rounds(hand_rows(), "a", "accuracy")  # same rows, same bytes


@pytest.mark.parametrize(("a", "b", "paired", "diff", "se", "beyond"), [
    ([1, 2, 3], [1, 2, 3], False, 0.0, math.sqrt(2 / 3), False),
    ([10, 11, 12], [1, 2, 3], False, 9.0, math.sqrt(2 / 3), True),  # 9 > 2·0.816
    ([1, 2, 3], [2, 3, 4], False, -1.0, math.sqrt(2 / 3), False),  # 1 < 1.633
    ([2, 2], [1, 1], False, 1.0, 0.0, True),  # every seed agrees
    ([5], [1, 2, 3], False, 3.0, None, False),  # one seed: no standard error, never a difference
    ([1, 2, 3], [0.5, 1.6, 2.4], True, 0.5, 0.1 / math.sqrt(3), True),  # paired: d = 0.5, 0.4, 0.6
    ([1, 2, 3], [0.5, 1.6, 2.4], False, 0.5, math.sqrt(1 / 3 + 0.91 / 3), False),  # unpaired: s_b² = 0.91, within
])
def test_two_standard_errors_on_hand_computed_cases(a, b, paired, diff, se, beyond):
    from uniflow_cli.sweep_report import compare

    c = compare(a, b, paired=paired)
    assert c.diff == pytest.approx(diff) and c.beyond is beyond
    assert (c.se is None) if se is None else c.se == pytest.approx(se, rel=1e-6)


def test_summaries_skip_missing_values_and_format_as_mean_std_n():
    from uniflow_cli.sweep_report import Summary, fmt_summary, summarize

    assert summarize([1, None, 3]) == Summary(2, 2.0, math.sqrt(2))
    assert fmt_summary(summarize([85.2])) == "85.20 (1)" and fmt_summary(summarize([])) == "–"
    assert fmt_summary(summarize([0.0336, 0.0330])) == "0.0333 ± 4.24e-04 (2)"  # small values: 3 significant digits


def test_a_second_sweep_into_the_same_out_stops_with_one_line_and_runs_nothing(tmp_path):
    import fcntl
    import os

    from uniflow_cli.sweep import LOCK_NAME, load_grid, plan_sweep, run_sweep

    out = tmp_path / "out"
    plan = plan_sweep(load_grid(grid_file(tmp_path, TINY)), out)
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 4242, since 2026-12-01 10:00:00")
    fd = os.open(out / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first sweep, as another process would hold it
    try:
        with pytest.raises(UsageError, match=r"another uniflow sweep is running in .*out \(pid 4242, since 2026-12-01 10:00:00\).*another --out"):
            run_sweep(plan)
        assert not (out / "runs").exists() and not plan.rows.exists()
    finally:
        os.close(fd)  # the holder ends: the lock goes with it, nothing to clean up
    with pytest.raises(Exception) as nothing:  # now it is free: the same call goes on (into its first cell's work)
        from uniflow_cli.sweep import one_sweep_at_a_time

        with one_sweep_at_a_time(out):
            raise RuntimeError("inside")
    assert str(nothing.value) == "inside" and (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}, since ")


def test_rows_with_the_function_space_gap_plot_it_too(tmp_path):
    from uniflow_cli.sweep_report import build_sweep_report

    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in hand_rows()))
    assert sorted(build_sweep_report(plain).files) == ["g-a-accuracy.png", "g-a-rel_error.png", "g-b-accuracy.png", "g-b-rel_error.png", "g.md"]
    gapped = tmp_path / "gap.jsonl"
    gapped.write_text("".join(json.dumps({**r, "gap_train": 0.01 * r["round"], "gap_test": 0.02 * r["seed"]}) + "\n" for r in hand_rows()))
    files = build_sweep_report(gapped).files
    assert {"g-a-gap_train.png", "g-a-gap_test.png", "g-b-gap_test.png"} <= set(files)
    assert files["g-a-gap_test.png"].startswith(b"\x89PNG") and files["g-a-gap_test.png"] != files["g-a-gap_train.png"]
