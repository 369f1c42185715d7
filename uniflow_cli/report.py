"""``uniflow report``: compare runs the way the paper does (Tables 1–3) and plot metrics over rounds.

A run is a workspace (its ``eval/round-*.json``) or a directory of eval JSONs. The table has one
row per run with the values of its last evaluated round, preceded by the untrained base ("–",
round 0) when a run has it; columns are modality × metric. Each metric also gets a PNG of its value
over rounds, one line per run and modality. Building (:func:`build_report`) is separate from
writing (:func:`write_report`); :func:`make_report` does both for the CLI.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.atomic import check_writable_target, publish_dir
from uniflow_cli.errors import DataError, UsageError, worded
from uniflow_cli.evaluation_io import read_eval_json
from uniflow_cli.metrics import CLASSIFY_METRIC_KEYS, METRIC_KEYS, METRIC_TITLES, OVERALL

#: The paper's Tables 1–3 columns.
DEFAULT_METRICS: tuple[str, ...] = ("acc", "bert_p", "bert_r", "bert_f1")
#: Each task's metric keys (a classify run: Table 4's accuracy, and macro-F1) and its default columns.
TASK_METRICS: dict[str, tuple[str, ...]] = {"qa": METRIC_KEYS, "classify": CLASSIFY_METRIC_KEYS}
TASK_DEFAULTS: dict[str, tuple[str, ...]] = {"qa": DEFAULT_METRICS, "classify": CLASSIFY_METRIC_KEYS}
ALL_METRIC_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for keys in TASK_METRICS.values() for k in keys))
BASE_LABEL = "–"
REPORT_MD = "report.md"
PNG_DPI = 100
_ROUND_FILE = re.compile(r"^round-(\d+)\.json$")


@dataclass
class RunEvals:
    """All eval payloads of one run, by round."""

    name: str
    source: Path
    rounds: dict[int, dict[str, Any]]

    @property
    def last_round(self) -> int:
        return max(self.rounds)

    def trained_round(self) -> int | None:
        """The last round after training (> 0), or None when only the base was evaluated."""
        trained = [t for t in self.rounds if t > 0]
        return max(trained) if trained else None


@dataclass
class ReportTable:
    """Rows of ``(label, round, values)``; ``values[i]`` belongs to ``columns[i] = (modality, metric)``."""

    columns: list[tuple[str, str]]
    rows: list[tuple[str, int, list[float | None]]] = field(default_factory=list)


@dataclass
class Report:
    runs: list[RunEvals]
    metrics: list[str]
    table: ReportTable
    markdown: str
    pngs: dict[str, bytes]
    out_dir: Path | None = None


# --------------------------------------------------------------------------------------------------
# Loading runs
# --------------------------------------------------------------------------------------------------
def _eval_files(run_dir: Path) -> tuple[Path, list[Path]]:
    """Where a run's eval JSONs are: ``<ws>/eval/round-*.json`` for a workspace, else the dir itself."""
    if (run_dir / "uniflow.toml").is_file() or (run_dir / "eval").is_dir():
        where = run_dir / "eval"
        files = sorted(where.glob("round-*.json")) if where.is_dir() else []
    else:
        where = run_dir
        files = sorted(run_dir.glob("round-*.json")) or sorted(run_dir.glob("*.json"))
    # Hidden files are unfinished atomic writes by convention.
    return where, [f for f in files if not f.name.startswith(".") and f.is_file()]


def default_run_name(run_dir: Path) -> str:
    """The directory's name; for a workspace's ``eval/`` directory, the workspace's name."""
    resolved = run_dir.resolve()
    if resolved.name == "eval" and resolved.parent.name:
        return resolved.parent.name
    return resolved.name or str(run_dir)


def load_run(run_dir: str | Path, name: str | None = None) -> RunEvals:
    """Read every eval JSON of one run (validated), keyed by the payload's round."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist", fix="pass a workspace or a directory of eval JSON files")
    where, files = _eval_files(run_dir)
    if not files:
        raise DataError(
            f"no eval JSON found in {where}", fix="run 'uniflow evaluate' in that workspace first, or pass the right directory"
        )
    rounds: dict[int, dict[str, Any]] = {}
    origin: dict[int, Path] = {}
    for path in files:
        payload = read_eval_json(path)
        t = payload["round"]
        m = _ROUND_FILE.match(path.name)
        if m and int(m.group(1)) != t:
            raise DataError(f"eval file {path} says round {t} but is named round-{m.group(1)}", fix=f"rename it round-{t}.json")
        if t in rounds:
            raise DataError(
                f"round {t} is evaluated twice in {where} ({origin[t].name} and {path.name})", fix="keep one of the two files"
            )
        rounds[t] = payload
        origin[t] = path
    return RunEvals(name=name or default_run_name(run_dir), source=run_dir, rounds=dict(sorted(rounds.items())))


def parse_metrics(spec: str | Sequence[str] | None, task: str | None = "qa") -> list[str]:
    """``"acc,bert_f1"`` → ``["acc", "bert_f1"]``; unknown names are a UsageError listing the valid ones.

    ``task`` (``qa`` | ``classify``) picks the valid names and the default (None: any task's names, the
    QA default; the runs' task is checked once they are read)."""
    keys = TASK_METRICS[task] if task is not None else ALL_METRIC_KEYS
    if spec is None:
        return list(TASK_DEFAULTS[task or "qa"])
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    if not items:
        raise worded(UsageError, "{metrics} is empty", "pass a comma-separated list of {keys}", keys=",".join(keys))
    for item in items:
        if item not in keys:
            scope = f" for {task} runs" if task is not None and item in ALL_METRIC_KEYS else ""  # another task's metric
            raise UsageError(f"unknown metric {item!r}{scope}", fix=f"use a comma-separated list of {','.join(keys)}")
    if len(set(items)) != len(items):
        raise worded(UsageError, "{metrics} {items} names a metric twice", "name each metric once", items=",".join(items))
    return items


def load_runs(run_dirs: Sequence[str | Path], names: Sequence[str] | None = None) -> list[RunEvals]:
    if not run_dirs:
        raise UsageError("no RUN_DIR given", fix="pass one or more workspaces or directories of eval JSON files")
    if names is not None and len(names) != len(run_dirs):
        raise UsageError(
            f"--names has {len(names)} name(s) for {len(run_dirs)} RUN_DIR(s)", fix="give exactly one name per RUN_DIR"
        )
    runs = [load_run(d, names[i] if names else None) for i, d in enumerate(run_dirs)]
    seen: dict[str, Path] = {}
    for run in runs:
        if run.name in seen:
            raise worded(UsageError,
                "two runs are named {name!r} ({first} and {second})", "pass {names} a,b,... to tell them apart", name=run.name, first=seen[run.name], second=run.source
            )
        seen[run.name] = run.source
    return runs


def runs_task(runs: Sequence[RunEvals]) -> str:
    """The task every payload of ``runs`` was evaluated for (``qa`` records none); two tasks are one line."""
    tasks = {(run.name, p.get("task", "qa")) for run in runs for p in run.rounds.values()}
    names = sorted({task for _, task in tasks})
    if len(names) > 1:
        example = {task: run for run, task in sorted(tasks)}
        raise UsageError(f"the runs mix {' and '.join(names)} evaluations (e.g. {', '.join(f'{r}: {t}' for t, r in example.items())})",
                         fix="report the runs of each task separately")
    return names[0] if names else "qa"


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def _modalities(payloads: Sequence[dict[str, Any]]) -> list[str]:
    names = sorted({m for p in payloads for m in p["metrics"] if m != OVERALL})
    # "overall" only adds information when there is more than one modality.
    return names + [OVERALL] if len(names) > 1 else names


def _values(payload: dict[str, Any], columns: Sequence[tuple[str, str]]) -> list[float | None]:
    out: list[float | None] = []
    for modality, metric in columns:
        entry = payload["metrics"].get(modality)
        out.append(None if entry is None else entry.get(metric))
    return out


def build_table(runs: Sequence[RunEvals], metrics: Sequence[str]) -> ReportTable:
    """Rows: the base ("–", round 0) then one per run (its last round > 0); columns: modality × metric."""
    shown = [r.rounds[t] for r in runs for t in (0, r.trained_round()) if t is not None and t in r.rounds]
    columns = [(m, k) for m in _modalities(shown) for k in metrics]
    table = ReportTable(columns=columns)
    bases = [(r.name, _values(r.rounds[0], columns)) for r in runs if 0 in r.rounds]
    if bases:
        if all(values == bases[0][1] for _, values in bases):
            table.rows.append((BASE_LABEL, 0, bases[0][1]))
        else:  # the runs were evaluated on different bases or data: keep every base visible
            table.rows.extend((f"{BASE_LABEL} ({name})", 0, values) for name, values in bases)
    for run in runs:
        t = run.trained_round()
        if t is not None:
            table.rows.append((run.name, t, _values(run.rounds[t], columns)))
    return table


def format_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(table: ReportTable, metrics: Sequence[str]) -> str:
    """The paper's layout in one markdown header row: ``Method | Round | <modality> <metric> ...``."""
    header = ["Method", "Round"] + [f"{m} {METRIC_TITLES[k]}" for m, k in table.columns]
    lines = [
        "# uniflow report",
        "",
        f"Metrics in % ({', '.join(METRIC_TITLES[k] for k in metrics)}); each run's row holds its last evaluated "
        f"round; '{BASE_LABEL}' is the untrained base (round 0). Definitions: docs/evaluation.md.",
        "",
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join(["---", "---:"] + ["---:"] * len(table.columns)) + "|",
    ]
    for label, t, values in table.rows:
        cells = [_md_escape(label), str(t)] + [format_value(v) for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_metric(runs: Sequence[RunEvals], metric: str) -> bytes:
    """PNG bytes of ``metric`` over rounds: one panel per modality, one colour (and legend entry) per run.

    Panels keep many runs readable (a method comparison has ten); the legend sits to the right of the
    panels. Byte-for-byte deterministic: matplotlib's default style (ignoring the user's matplotlibrc),
    the Agg canvas without pyplot's global state, a fixed size and dpi, and no "Software" metadata.
    """
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    payloads = [p for r in runs for p in r.rounds.values()]
    modalities = _modalities(payloads) or ["(none)"]
    with matplotlib.style.context("default"):
        width = 1.0 + 3.6 * len(modalities) + (2.6 if len(runs) > 1 else 0.0)
        fig = Figure(figsize=(width, 3.6), dpi=PNG_DPI)
        FigureCanvasAgg(fig)
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        handles: dict[str, Any] = {}
        axes = [fig.add_subplot(1, len(modalities), j + 1) for j in range(len(modalities))]
        for j, (ax, modality) in enumerate(zip(axes, modalities)):
            for i, run in enumerate(runs):
                points = [
                    (t, p["metrics"][modality][metric])
                    for t, p in run.rounds.items()
                    if modality in p["metrics"] and p["metrics"][modality].get(metric) is not None
                ]
                if not points:
                    continue
                xs, ys = zip(*points)
                (line,) = ax.plot(xs, ys, color=colors[i % len(colors)], linestyle=_LINESTYLES[(i // len(colors)) % len(_LINESTYLES)],
                                  marker=_MARKERS[i % len(_MARKERS)], label=run.name)
                handles.setdefault(run.name, line)
            ax.set_title(modality)
            ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(f"{METRIC_TITLES[metric]} over rounds")
        if handles:
            if len(runs) > 1:
                fig.legend(list(handles.values()), list(handles), loc="center right", fontsize="small", frameon=False)
                fig.tight_layout(rect=(0, 0, 1 - 2.6 / width, 1))
            else:
                axes[0].legend(fontsize="small")
                fig.tight_layout()
        else:
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------------
def build_report(
    run_dirs: Sequence[str | Path], *, names: Sequence[str] | None = None, metrics: str | Sequence[str] | None = None
) -> Report:
    """Load the runs and build the table, its markdown and one PNG per metric (nothing written)."""
    parse_metrics(metrics, None)  # the names first, before any run is read
    runs = load_runs(run_dirs, names)
    metric_list = parse_metrics(metrics, runs_task(runs))
    table = build_table(runs, metric_list)
    markdown = render_markdown(table, metric_list)
    pngs = {f"{metric}.png": plot_metric(runs, metric) for metric in metric_list}
    return Report(runs=runs, metrics=metric_list, table=table, markdown=markdown, pngs=pngs)


def is_report_dir(path: Path) -> bool:
    """What ``report --force`` may replace: a directory of report.md and plots, as this command writes."""
    from uniflow_cli.paths import is_real_dir

    if not is_real_dir(path) or not (path / REPORT_MD).is_file():
        return False
    return all(p.is_file() and not p.is_symlink() and p.suffix in (".md", ".png") for p in path.iterdir())


def write_report(report: Report, out_dir: str | Path, *, force: bool = False) -> Path:
    """Publish ``report.md`` and the PNGs into ``out_dir`` atomically (refuses to replace it without force)."""
    out_dir = Path(out_dir)
    with publish_dir(out_dir, force=force, replaces=is_report_dir, kind="uniflow report directory") as tmp:
        (tmp / REPORT_MD).write_text(report.markdown, encoding="utf-8")
        for name, data in report.pngs.items():
            (tmp / name).write_bytes(data)
    report.out_dir = out_dir
    return out_dir


def make_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
    force: bool = False,
) -> Report:
    """The ``uniflow report`` command: check the output first (no wasted work), build, publish."""
    for run_dir in run_dirs:  # replacing out_dir must never remove a run (the README's `report . --out report/` is fine)
        if Path(out_dir).resolve() in (Path(run_dir).resolve(), *Path(run_dir).resolve().parents):
            raise worded(UsageError, "{out} {path} is or contains the run {run}", "write the report to its own directory, e.g. {out} report/", path=out_dir, run=run_dir)
    check_writable_target(Path(out_dir), force=force, replaces=is_report_dir, kind="uniflow report directory")
    report = build_report(run_dirs, names=names, metrics=metrics)
    write_report(report, out_dir, force=force)
    return report
