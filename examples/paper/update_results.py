"""Regenerate the sweep tables in docs/results.md from the rows in docs/results/*.jsonl (never typed by hand).

    .venv/bin/python examples/paper/update_results.py            # every rows file with a marker in docs/results.md

For each ``docs/results/<grid>.jsonl`` it writes ``docs/results/<grid>/`` with ``uniflow sweep report`` (the
grid's markdown page and its plots), then replaces what stands between ``<!-- sweep:<grid> -->`` and
``<!-- /sweep:<grid> -->`` in docs/results.md with that page (its headings one level down, its plot links
relative to docs/). Text outside the markers (the reading) is left as it is; a rows file without markers is
reported and skipped. The metrics per task are the report's own defaults plus the aggregation error and, where
the rows carry it, the function-space gap.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"
PAGE = REPO / "docs" / "results.md"


def metrics_for(rows_path: Path) -> list[str]:
    """accuracy (+ the clients' own models' accuracy for classify), rel_error, and gap_test where measured."""
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    task = rows[0].get("task", "classify") if rows else "classify"
    chosen = ["accuracy", "client_accuracy"] if task == "classify" else ["accuracy", "bert_f1"]
    chosen.append("rel_error")
    if any(r.get("gap_test") is not None for r in rows):
        chosen += ["gap_train", "gap_test"]
    return chosen


def section(grid: str, rows_path: Path) -> str:
    from uniflow_cli.sweep_report import make_sweep_report

    out = RESULTS / grid
    report = make_sweep_report(rows_path, out, metrics=metrics_for(rows_path), force=True)
    page = report.files[f"{grid}.md"].decode("utf-8") if f"{grid}.md" in report.files else next(
        v.decode("utf-8") for k, v in report.files.items() if k.endswith(".md"))
    page = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", page, flags=re.M)  # one level below the page's sections
    page = re.sub(r"\]\(([^)/]+\.png)\)", lambda m: f"](results/{grid}/{m.group(1)})", page)
    return page.strip() + "\n"


def main() -> int:
    text = PAGE.read_text()
    for rows_path in sorted(RESULTS.glob("*.jsonl")):
        grid = rows_path.stem
        start, end = f"<!-- sweep:{grid} -->", f"<!-- /sweep:{grid} -->"
        if start not in text or end not in text:
            print(f"skipped {rows_path.name}: no {start} … {end} in {PAGE.relative_to(REPO)}")
            continue
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + start + "\n" + section(grid, rows_path) + end + after
        print(f"updated {grid}")
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
