"""``fedtrain report``: one self-contained page comparing run directories.

A report holds a summary table (from each run's ``summary.json``), the config keys whose values
differ between the runs, comparison plots drawn from every ``metrics.jsonl`` (eval loss vs round,
vs bytes on the wire, vs simulated time) and each run's own ``plots/*.png``. HTML embeds every
image as a base64 data URI (one file, nothing external); Markdown writes the images into
``<name>_files/`` next to the ``.md`` and links them relatively.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from fedtrain.storage.rundir import atomic_write_bytes
from fedtrain.storage.runs import ReportError, RunRecord, expand_run_dirs, load_run

__all__ = [
    "ReportError",
    "RunRecord",
    "comparison_plots",
    "config_differences",
    "summary_table",
    "write_report",
]

_SAFE = re.compile(r"[^A-Za-z0-9._+=,-]+")


def _labels(paths: list[Path]) -> list[str]:
    full = [p.resolve() for p in paths]
    names = [p.name for p in full]
    longer = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in full]
    return [n if longer.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(longer)]


def _show(v: Any) -> str:
    if v is None:
        return "-"
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    return f"{s:.3g} s"


def _ratio(x: Any) -> str:
    return f"{x:.1f}x" if isinstance(x, (int, float)) else "-"


SUMMARY_COLUMNS = (
    "run",
    "strategy",
    "codec",
    "silos",
    "model",
    "rounds",
    "final eval loss",
    "bytes total",
    "compression up/down",
    "sim time",
    "utilisation",
    "wall",
)


def summary_table(runs: list[RunRecord]) -> list[list[str]]:
    """One row of :data:`SUMMARY_COLUMNS` per run, as display strings."""
    rows = []
    for r in runs:
        s, c = r.summary, r.config
        rounds = s.get("rounds", len(r.metrics))
        failed = s.get("rounds_failed") or 0
        loss = s.get("final_eval_loss")
        util = s.get("compute_utilisation")
        rows.append(
            [
                r.label if s else f"{r.label} (unfinished)",
                _show(s.get("strategy", c.get("strategy.name"))),
                _show(s.get("codec", c.get("transport.codec"))),
                _show(s.get("silos", c.get("data.silos"))),
                _show(s.get("model_preset", c.get("model.preset"))),
                f"{rounds} ({failed} failed)" if failed else str(rounds),
                f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                _bytes(s.get("bytes_total")),
                f"{_ratio(s.get('compression_up'))} / {_ratio(s.get('compression_down'))}",
                _seconds(s.get("sim_time_s")),
                f"{100 * util:.1f}%" if isinstance(util, (int, float)) else "-",
                _seconds(s.get("wall_s")),
            ]
        )
    return rows


def config_differences(runs: list[RunRecord]) -> list[tuple[str, list[str]]]:
    """Config keys whose values are not the same in every run, with each run's value."""
    keys = sorted({k for r in runs for k in r.config})
    diffs = []
    for k in keys:
        shown = [_show(r.config[k]) if k in r.config else "(absent)" for r in runs]
        if len(set(shown)) > 1:
            diffs.append((k, shown))
    return diffs


def comparison_plots(runs: list[RunRecord]) -> list[tuple[str, str, bytes]]:
    """(file name, title, PNG bytes) of eval loss vs round, vs bytes and vs simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for name, title, xlabel in (
        ("compare_loss_vs_round.png", "eval loss vs round", "round"),
        ("compare_loss_vs_bytes.png", "eval loss vs bytes", "cumulative MB sent (up + down)"),
        ("compare_loss_vs_sim_time.png", "eval loss vs simulated time", "simulated time (s)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs_all: list[float] = []
        for r in runs:
            xs, ys, sent = [], [], 0.0
            initial = r.summary.get("initial_eval_loss")
            if name == "compare_loss_vs_round.png" and isinstance(initial, (int, float)):
                xs.append(0.0)
                ys.append(initial)
            for m in r.metrics:
                sent += (m.get("bytes_up") or 0) + (m.get("bytes_down") or 0)
                if m.get("eval_loss") is None:
                    continue
                x = {
                    "compare_loss_vs_round.png": m.get("round"),
                    "compare_loss_vs_bytes.png": sent / 1e6,
                    "compare_loss_vs_sim_time.png": m.get("sim_time_s"),
                }[name]
                if x is not None:
                    xs.append(float(x))
                    ys.append(m["eval_loss"])
            ax.plot(xs, ys, marker="o", markersize=4, label=r.label)
            xs_all += xs
        positive = [x for x in xs_all if x > 0]
        if name != "compare_loss_vs_round.png" and positive and len(positive) == len(xs_all):
            if max(positive) / min(positive) > 10:
                ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss (nats/token)")
        ax.set_title(title)
        if runs:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out.append((name, title, buf.getvalue()))
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:4px;border:1px solid #eee}
code{background:#f6f6f6;padding:0 3px}
.run img{max-width:32%}
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sections(runs: list[RunRecord]) -> tuple[list[list[str]], list[str], list[list[str]]]:
    diffs = config_differences(runs)
    return (
        summary_table(runs),
        ["key", *(r.label for r in runs)],
        [[k, *vals] for k, vals in diffs],
    )


def _render_html(runs: list[RunRecord], plots: list[tuple[str, str, bytes]]) -> str:
    summary, diff_header, diff_rows = _sections(runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fedtrain report: {len(runs)} runs</title><style>{_CSS}</style></head><body>",
        f"<h1>fedtrain report: {len(runs)} runs</h1>",
        f"<p>Generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
        "<h2>Summary</h2>",
        _html_table(list(SUMMARY_COLUMNS), summary),
        "<h2>Config differences</h2>",
        _html_table(diff_header, diff_rows)
        if diff_rows
        else "<p>The runs' configs are identical.</p>",
        "<h2>Comparison</h2>",
        "<div>" + "".join(_img(png, title) for _, title, png in plots) + "</div>",
        "<h2>Runs</h2>",
    ]
    for r in runs:
        parts.append(
            f"<h3>{html.escape(r.label)}</h3><p><code>{html.escape(str(r.path))}</code></p>"
        )
        imgs = "".join(_img(p.read_bytes(), f"{r.label}: {p.stem}") for p in r.plots)
        parts.append(f'<div class="run">{imgs}</div>' if imgs else "<p>No plots.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _render_markdown(runs: list[RunRecord], plots: list[tuple[str, str, bytes]], out: Path) -> str:
    summary, diff_header, diff_rows = _sections(runs)
    assets = out.parent / f"{out.stem}_files"
    assets.mkdir(parents=True, exist_ok=True)

    def link(name: str, png: bytes, alt: str) -> str:
        (assets / name).write_bytes(png)
        return f"![{alt}]({assets.name}/{name})"

    parts = [
        f"# fedtrain report: {len(runs)} runs",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "## Summary",
        _md_table(list(SUMMARY_COLUMNS), summary),
        "## Config differences",
        _md_table(diff_header, diff_rows) if diff_rows else "The runs' configs are identical.",
        "## Comparison",
        "\n".join(link(name, png, title) for name, title, png in plots),
        "## Runs",
    ]
    for i, r in enumerate(runs, 1):
        parts.append(f"### {r.label}\n\n`{r.path}`")
        safe = _SAFE.sub("_", r.label)[:80]
        links = [
            link(f"run{i:02d}-{safe}-{p.name}", p.read_bytes(), f"{r.label}: {p.stem}")
            for p in r.plots
        ]
        parts.append("\n".join(links) if links else "No plots.")
    return "\n\n".join(parts) + "\n"


def write_report(paths: list[Path], out: Path) -> Path:
    """Render the report on ``paths`` (runs or sweeps) to ``out`` (``.html`` or ``.md``)."""
    kind = out.suffix.lower()
    if kind not in (".html", ".htm", ".md"):
        raise ReportError(f"--out {out}: expected a file ending in .html or .md")
    dirs = expand_run_dirs(paths)
    runs = [load_run(p, label) for p, label in zip(dirs, _labels(dirs), strict=True)]
    plots = comparison_plots(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = _render_markdown(runs, plots, out) if kind == ".md" else _render_html(runs, plots)
    atomic_write_bytes(out, text.encode("utf-8"))
    return out
