"""``uniflow sweep report``: the paper's tables and plots from a sweep's JSON rows, never typed by hand.

A table per grid and metric: rows are adapter × method (and any other axis of the grid but the seed),
columns the datasets (classify) or the test modalities and ``overall`` (qa); a cell is ``mean ± std (n)``
over the seeds at each cell's final round (sample standard deviation, n seeds). Beside it, every method
against a baseline (default FedIT): the difference of the means and its standard error, and whether it is
beyond two standard errors (:func:`compare`) — the one rule the reading may call a difference by. Plots:
each metric over rounds, the mean over seeds with a ±std band, one panel per adapter.

Pure functions on rows (:func:`summarize`, :func:`compare`, :func:`build_tables`, :func:`render_grid`) are
separate from loading and writing (:func:`make_sweep_report`). Same rows → same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import DataError, UsageError

OVERALL = "overall"
ROW_AXES = ("adapter", "method")  # the paper's row labels, first; other axes follow them
NOT_ROW_AXES = ("seed", "dataset")  # a table's repeats (seeds) and columns (datasets)
TASK_METRICS = {"classify": ("accuracy", "macro_f1", "client_accuracy", "client_macro_f1", "personal_accuracy", "personal_macro_f1", "rel_error",
                             "gap_train", "gap_test"),
                "qa": ("accuracy", "em", "bleu", "rouge_l", "bert_p", "bert_r", "bert_f1", "client_accuracy", "personal_accuracy", "rel_error", "gap_train", "gap_test")}
DEFAULT_METRICS = {"classify": ("accuracy", "client_accuracy"), "qa": ("accuracy", "bert_f1")}
PLOT_METRICS = ("accuracy", "rel_error")
GAP_METRICS = ("gap_train", "gap_test")  # plotted too where the rows measured the function-space gap
TITLES = {"accuracy": "Accuracy (%)", "macro_f1": "Macro-F1 (%)", "rel_error": "‖s·BA − U‖/‖U‖ (mean over layers)",
          "client_accuracy": "Accuracy of each client's model (%): FedSA/FedDPA personalised, mean over clients; others the global",
          "client_macro_f1": "Macro-F1 of each client's model (%)", "personal_accuracy": "Personalised accuracy (%), mean over clients",
          "personal_macro_f1": "Personalised macro-F1 (%), mean over clients",
          "gap_train": "Loss gap to the exact global (W0 + U), clients' shards", "gap_test": "Loss gap to the exact global (W0 + U), test split",
          "em": "EM (%)", "bleu": "BLEU", "rouge_l": "ROUGE-L (%)", "bert_p": "P_BERT (%)", "bert_r": "R_BERT (%)", "bert_f1": "F_BERT (%)"}
DEFAULT_BASELINE = "fedit"
PNG_DPI = 100
LINESTYLES = ("-", "--", ":", "-.")  # past the colour cycle's ten lines


# --------------------------------------------------------------------------------------------------
# Statistics (pure)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    std: float | None  # sample standard deviation (n − 1); None for n < 2

    @property
    def se(self) -> float | None:
        return self.std / math.sqrt(self.n) if self.std is not None else None


def summarize(values: Sequence[float | None]) -> Summary:
    """Mean and sample std of the values that are there (None: a seed without the value)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return Summary(0, None, None)
    mean = math.fsum(xs) / len(xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Summary(len(xs), mean, std)


@dataclass(frozen=True)
class Comparison:
    diff: float | None  # mean(a) − mean(b)
    se: float | None  # the standard error of that difference
    beyond: bool  # |diff| > 2·se: the only case the reading calls a difference

    @property
    def verdict(self) -> str:
        if self.se is None:
            return "n < 2"
        return "beyond 2 SE" if self.beyond else "within 2 SE"


def compare(a: Sequence[float], b: Sequence[float], *, paired: bool = False) -> Comparison:
    """Whether the per-seed values ``a`` and ``b`` of two methods differ beyond two standard errors.

    Unpaired (default): SE = √(s_a²/n_a + s_b²/n_b) (Welch's; conservative). ``paired``: the seeds are
    matched (the same partition and round-0 adapter per seed, as a sweep makes them), SE = s_d/√n of the
    per-seed differences d = a_i − b_i. Fewer than two values on a side (or pairs): no SE, never beyond.
    A zero SE with a non-zero difference is beyond (every seed agrees)."""
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired comparison of {len(a)} and {len(b)} values")
        d = summarize([x - y for x, y in zip(a, b)])
        diff, se = d.mean, d.se
    else:
        sa, sb = summarize(a), summarize(b)
        diff = sa.mean - sb.mean if sa.mean is not None and sb.mean is not None else None
        se = math.sqrt(sa.se ** 2 + sb.se ** 2) if sa.se is not None and sb.se is not None else None
    beyond = diff is not None and se is not None and abs(diff) > 2 * se
    return Comparison(diff, se, beyond)


def fmt_number(x: float | None) -> str:
    """Two decimals for percentages and the like; three significant digits for small values (errors)."""
    if x is None:
        return "–"
    if x == 0 or abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def fmt_summary(s: Summary) -> str:
    """``mean ± std (n)``; ``mean (1)`` for one seed; ``–`` for none."""
    if s.mean is None:
        return "–"
    return f"{fmt_number(s.mean)} ± {fmt_number(s.std)} ({s.n})" if s.std is not None else f"{fmt_number(s.mean)} ({s.n})"


def fmt_comparison(c: Comparison) -> str:
    if c.diff is None:
        return "–"
    sign = "+" if c.diff >= 0 else "−"
    se = f" ± {fmt_number(c.se)}" if c.se is not None else ""
    verdict = f"**{c.verdict}**" if c.beyond else c.verdict
    return f"{sign}{fmt_number(abs(c.diff))}{se} · {verdict}"


# --------------------------------------------------------------------------------------------------
# Rows → tables (pure)
# --------------------------------------------------------------------------------------------------
def row_value(row: Mapping[str, Any], column: str, metric: str, task: str) -> float | None:
    """The metric of a row in a column: a dataset's (classify: the row's own), a modality's or overall (qa)."""
    if task == "qa" and column != OVERALL:
        return (row.get("modalities") or {}).get(column, {}).get(metric)
    return row.get(metric)


def row_key(row: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What a table row stands for: adapter, method, then the other axes (not the seed, not the dataset)."""
    knobs = row.get("knobs") or {}
    labels = {"adapter": knobs.get("adapter", row.get("adapter")), "method": knobs.get("method", row.get("method"))}
    rest = [(k, v) for k, v in knobs.items() if k not in ROW_AXES and k not in NOT_ROW_AXES]
    return (*((k, labels[k]) for k in ROW_AXES), *((k, _hashable(v)) for k, v in rest))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def columns_of(rows: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    """Datasets (classify), or the test modalities then ``overall`` (qa), in the order the rows first name them."""
    if task == "classify":
        return list(dict.fromkeys(r["dataset"] for r in rows))
    return [*dict.fromkeys(m for r in rows for m in (r.get("modalities") or {})), OVERALL]


def final_values(rows: Sequence[Mapping[str, Any]], column: str, metric: str, task: str) -> dict[str, tuple[int, float]]:
    """Each cell's (round, value) at its last round that has the value (its final round, when evaluated there)."""
    out: dict[str, tuple[int, float]] = {}
    for r in rows:
        value = row_value(r, column, metric, task)
        if value is None or (task == "classify" and r["dataset"] != column):
            continue
        if r["cell"] not in out or r["round"] > out[r["cell"]][0]:
            out[r["cell"]] = (r["round"], value)
    return out


@dataclass
class Table:
    grid: str
    metric: str
    task: str
    axes: list[str]  # the row label columns (adapter, method, other axes)
    columns: list[str]
    rows: list[tuple[tuple[Any, ...], list[Summary]]] = field(default_factory=list)
    seeds: dict[tuple[tuple[Any, ...], str], dict[Any, float]] = field(default_factory=dict)  # (row, column) → seed → value
    rounds: list[int] = field(default_factory=list)  # the final rounds the values come from


def _ordered_keys(rows: Sequence[Mapping[str, Any]]) -> list[tuple[tuple[str, Any], ...]]:
    """Row keys sorted by adapter, then method, then the rest, each in the order the grid first ran it."""
    keys = list(dict.fromkeys(row_key(r) for r in rows))
    first: list[dict[Any, int]] = [{} for _ in keys[0]] if keys else []
    for key in keys:
        for i, (_, v) in enumerate(key):
            first[i].setdefault(v, len(first[i]))
    return sorted(keys, key=lambda k: tuple(first[i][v] for i, (_, v) in enumerate(k)))


def build_table(rows: Sequence[Mapping[str, Any]], metric: str) -> Table:
    """One grid's table of ``metric``: mean ± std over seeds of each cell's final value."""
    task = rows[0].get("task", "qa")
    keys = _ordered_keys(rows)
    table = Table(rows[0]["grid"], metric, task, [k for k, _ in keys[0]] if keys else [], columns_of(rows, task))
    by_key: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(row_key(r), []).append(r)
    rounds: set[int] = set()
    for key in keys:
        summaries = []
        for column in table.columns:
            finals = final_values(by_key[key], column, metric, task)
            seed_of = {r["cell"]: r.get("seed") for r in by_key[key]}
            values = {seed_of[cell]: v for cell, (_, v) in finals.items()}
            rounds |= {t for t, _ in finals.values()}
            table.seeds[(tuple(v for _, v in key), column)] = values
            summaries.append(summarize(list(values.values())))
        table.rows.append((tuple(v for _, v in key), summaries))
    table.rounds = sorted(rounds)
    return table


def baseline_axis(table: Table, baseline: str) -> tuple[int, str] | None:
    """Which axis a baseline names, and its value: ``AXIS=VALUE`` where AXIS is one of the table's axes
    (``stages=joint``: a grid of one method compares its schedules), else a method (a per-module spec such as
    ``encoders=fedsa,llm=fedA2`` is a method too: its left side is no axis). None: the table has no such axis."""
    axis, sep, value = baseline.partition("=")
    if sep and axis in table.axes and axis != "method":
        return table.axes.index(axis), value
    return (table.axes.index("method"), baseline) if "method" in table.axes else None


def comparisons(table: Table, baseline: str) -> list[tuple[tuple[Any, ...], list[Comparison]]]:
    """Every row whose baseline axis (the method, or the axis of ``AXIS=VALUE``) holds another value, against the
    row that differs from it only there."""
    found = baseline_axis(table, baseline)
    if found is None:
        return []
    i, value = found
    rest = lambda labels: labels[:i] + labels[i + 1:]  # the row's labels but the baseline axis
    bases = {rest(labels): labels for labels, _ in table.rows if _label(labels[i]) == value}
    out = []
    for labels, _ in table.rows:
        base = bases.get(rest(labels))
        if base is None or base == labels:
            continue
        out.append((labels, [_paired_if_matched(table.seeds[(labels, c)], table.seeds[(base, c)]) for c in table.columns]))
    return out


def _paired_if_matched(a: Mapping[Any, float], b: Mapping[Any, float]) -> Comparison:
    """Paired by seed when both rows hold the same seeds (a sweep gives every method of a seed the same partition
    and round-0 adapter, so the per-seed difference removes the seed's own effect); Welch's otherwise."""
    if a and set(a) == set(b):
        seeds = sorted(a, key=str)
        return compare([a[s] for s in seeds], [b[s] for s in seeds], paired=True)
    return compare(list(a.values()), list(b.values()))


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _label(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, tuple) else str(value)


def render_table(table: Table, baseline: str | None) -> str:
    """The markdown of one table (and its comparison with the baseline)."""
    when = f"round {table.rounds[0]}" if len(table.rounds) == 1 else f"rounds {', '.join(map(str, table.rounds))}" if table.rounds else "no round"
    head = [a.capitalize() if a in ROW_AXES else a for a in table.axes]
    lines = [f"### {TITLES.get(table.metric, table.metric)}, final round ({when})", "",
             _md_row([*head, *table.columns]), _md_row(["---"] * len(head) + ["---:"] * len(table.columns))]
    lines += [_md_row([*map(_label, labels), *map(fmt_summary, summaries)]) for labels, summaries in table.rows]
    lines += ["", "mean ± sample std over seeds (n seeds) of each cell's final-round value."]
    found = comparisons(table, baseline) if baseline else []
    if found:
        lines += ["", (f"Difference from {baseline} (same row otherwise): Δ mean ± its standard error, paired by seed (the "
                       "seeds' partitions and round-0 adapters are shared; Welch's where the seeds differ); "
                       "**beyond 2 SE** is the only case to call a difference."), "",
                  _md_row([*head, *table.columns]), _md_row(["---"] * len(head) + ["---:"] * len(table.columns))]
        lines += [_md_row([*map(_label, labels), *map(fmt_comparison, found_row)]) for labels, found_row in found]
    return "\n".join(lines) + "\n"


def wall_seconds(rows: Sequence[Mapping[str, Any]]) -> float:
    """Σ over cells of the seconds the run that finished each cell spent on it."""
    per_cell = {r["cell"]: r.get("cell_seconds") or 0.0 for r in rows}
    return math.fsum(per_cell.values())


def render_grid(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], *, baseline: str | None, plots: Sequence[str] = (),
                source: str = "") -> str:
    """The markdown page of one grid: its tables, comparisons and links to its plots."""
    grid = rows[0]["grid"]
    cells = len({r["cell"] for r in rows})
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    parts = [f"## {grid}", "",
             (f"Generated by `uniflow sweep report` from {source or 'the rows'}: {cells} cells, seeds {', '.join(map(str, seeds))}; "
              f"{wall_seconds(rows) / 60:.1f} min of cell wall time. Do not edit by hand: regenerate."), ""]
    parts += [render_table(build_table(rows, metric), baseline) for metric in metrics]
    if plots:
        parts += ["Plots: " + ", ".join(f"[{name.removesuffix('.png')}]({name})" for name in plots), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def plot_over_rounds(rows: Sequence[Mapping[str, Any]], column: str, metric: str) -> bytes:
    """PNG of ``metric`` over rounds in one column: a panel per adapter, a line per method (and other axes),
    the mean over seeds with a ±std band. Deterministic bytes (default style, Agg, no Software metadata)."""
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    task = rows[0].get("task", "qa")
    keys = _ordered_keys(rows)
    adapters = list(dict.fromkeys(dict(k)["adapter"] for k in keys))
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(1.6 + 3.8 * len(adapters), 3.8), dpi=PNG_DPI)
        FigureCanvasAgg(fig)
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        names = list(dict.fromkeys(_line_name(k) for k in keys))  # one colour per method (and other axes) in every panel
        for j, adapter in enumerate(adapters):
            ax = fig.add_subplot(1, len(adapters), j + 1)
            for key in keys:
                if dict(key)["adapter"] != adapter:
                    continue
                i = names.index(_line_name(key))
                _plot_line(ax, [r for r in rows if row_key(r) == key], column, metric, task, label=_line_name(key),
                           color=colors[i % len(colors)], linestyle=LINESTYLES[(i // len(colors)) % len(LINESTYLES)])
            ax.set_title(f"{adapter} · {column}")
            ax.set_xlabel("round")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, alpha=0.3)
            if j == 0:
                ax.set_ylabel(TITLES.get(metric, metric))
            if ax.lines:
                ax.legend(fontsize="x-small")
            else:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return buf.getvalue()


def _line_name(key: tuple[tuple[str, Any], ...]) -> str:
    return " ".join(_label(v) for k, v in key if k != "adapter")


def _plot_line(ax: Any, rows: Sequence[Mapping[str, Any]], column: str, metric: str, task: str, *, label: str, color: str,
               linestyle: str) -> None:
    by_round: dict[int, list[float]] = {}
    for r in rows:
        value = row_value(r, column, metric, task)
        if value is not None and (task != "classify" or r["dataset"] == column):
            by_round.setdefault(r["round"], []).append(value)
    if not by_round:
        return
    ts = sorted(by_round)
    stats = [summarize(by_round[t]) for t in ts]
    means = [s.mean for s in stats]
    stds = [s.std or 0.0 for s in stats]
    ax.plot(ts, means, color=color, linestyle=linestyle, marker="o", markersize=3, label=label)
    ax.fill_between(ts, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], color=color, alpha=0.15, linewidth=0)


# --------------------------------------------------------------------------------------------------
# Loading and writing
# --------------------------------------------------------------------------------------------------
def load_rows(source: str | Path) -> list[dict[str, Any]]:
    """A rows file, or every ``*.jsonl`` directly in a directory (sorted by name)."""
    from uniflow_cli.sweep import read_rows

    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix == ".jsonl" and p.is_file())
        if not files:
            raise UsageError(f"{source} holds no .jsonl rows file", fix="name a rows file, or the directory uniflow sweep run wrote it to")
    elif source.is_file():
        files = [source]
    else:
        raise UsageError(f"{source} does not exist", fix="name a rows file (.jsonl) or a directory of them")
    rows = [row for path in files for row in read_rows(path)]
    if not rows:
        raise DataError(f"{source} holds no rows", fix="run the sweep first (uniflow sweep run GRID.toml)")
    return rows


def by_grid(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grids: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        grids.setdefault(r["grid"], []).append(r)
    return grids


def check_metrics(metrics: Sequence[str] | None, task: str) -> list[str]:
    if not metrics:
        return list(DEFAULT_METRICS[task])
    known = TASK_METRICS[task]
    for metric in metrics:
        if metric not in known:
            raise UsageError(f"--metrics {metric} is not a metric of task {task}", fix=f"choose from {', '.join(known)}")
    return list(metrics)


@dataclass
class SweepReport:
    files: dict[str, bytes]  # name → bytes: <grid>.md and its PNGs
    grids: dict[str, list[Table]]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def build_sweep_report(source: str | Path, *, metrics: Sequence[str] | None = None, baseline: str | None = DEFAULT_BASELINE,
                       plots: bool = True) -> SweepReport:
    """Every grid of ``source``: ``<grid>.md`` (the tables) and ``<grid>-<column>-<metric>.png`` (nothing written)."""
    files: dict[str, bytes] = {}
    tables: dict[str, list[Table]] = {}
    for grid, rows in by_grid(load_rows(source)).items():
        task = rows[0].get("task", "qa")
        chosen = check_metrics(metrics, task)
        names = []
        measured_gap = any(r.get("gap_test") is not None or r.get("gap_train") is not None for r in rows)  # fidelity = true
        for column in columns_of(rows, task) if plots else []:
            for metric in PLOT_METRICS + (GAP_METRICS if measured_gap else ()):
                if metric in ("rel_error", *GAP_METRICS) and task == "qa" and column != OVERALL:
                    continue  # the aggregation error and the loss gap are the global's, not a modality's
                name = _safe(f"{grid}-{column}-{metric}.png")
                files[name] = plot_over_rounds(rows, column, metric)
                names.append(name)
        files[_safe(f"{grid}.md")] = render_grid(rows, chosen, baseline=baseline, plots=names, source=Path(source).name).encode("utf-8")
        tables[grid] = [build_table(rows, metric) for metric in chosen]
    return SweepReport(files, tables)


def is_sweep_report_dir(path: Path) -> bool:
    """What ``--force`` may replace: a directory of only .md and .png files."""
    from uniflow_cli.paths import is_real_dir

    return is_real_dir(path) and all(p.is_file() and not p.is_symlink() and p.suffix in (".md", ".png") for p in path.iterdir())


def make_sweep_report(source: str | Path, out_dir: str | Path, *, metrics: Sequence[str] | None = None,
                      baseline: str | None = DEFAULT_BASELINE, force: bool = False) -> SweepReport:
    """The command: check the output first, build, publish the directory atomically."""
    from uniflow_cli.atomic import check_writable_target, publish_dir

    out_dir = Path(out_dir)
    if out_dir.resolve() in (Path(source).resolve(), *Path(source).resolve().parents):  # replacing it would remove the rows
        raise UsageError(f"--out {out_dir} is or contains the rows {source}", fix="write the report to its own directory")
    check_writable_target(out_dir, force=force, replaces=is_sweep_report_dir, kind="sweep report directory")
    report = build_sweep_report(source, metrics=metrics, baseline=baseline)
    with publish_dir(out_dir, force=force, replaces=is_sweep_report_dir, kind="sweep report directory") as tmp:
        for name, data in report.files.items():
            (tmp / name).write_bytes(data)
    return report


__all__ = ["Comparison", "Summary", "SweepReport", "Table", "baseline_axis", "build_sweep_report", "build_table", "compare", "fmt_summary",
           "load_rows", "make_sweep_report", "plot_over_rounds", "render_grid", "render_table", "summarize"]
