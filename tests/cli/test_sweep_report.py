"""`fedtrain sweep` and `fedtrain report` end to end on the tiny preset.

One 2x2 sweep (4 real simulated runs, 2 rounds each) is shared by the module; the tests that
must fail before training use fresh directories.
"""

from __future__ import annotations

import base64
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from fedtrain.config import ConfigError
from fedtrain.simulation.sweep_plan import parse_grid, plan_sweep, split_values
from tests.conftest import tiny_config_dict

PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtrain.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    d = tiny_config_dict(
        run={"rounds": 2, "eval_batches": 2},
        train={"inner_steps": 2, "threads": 1},  # 2 threads on a busy 2-core box spin
        data={"max_chars": 100_000},
        # a fixed step time: no calibration steps, and simulated times that repeat exactly
        simulation={"profiles": [{"name": "lab", "count": 2, "step_time_s": 0.05}]},
    )
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(tomli_w.dumps(d))
    return path


GRIDS = ["--grid", "train.inner_steps=2,3", "--grid", "transport.codec=fp32,int4"]


@pytest.fixture(scope="module")
def sweep(config_file, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("sweep") / "s"
    r = _run("sweep", "--config", str(config_file), *GRIDS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_grid_values_split_outside_brackets_and_quotes():
    assert split_values("25, 50,100") == ["25", "50", "100"]
    assert split_values('[1, 2],[3],\'a,b\',"c,\\"d"') == ["[1, 2]", "[3]", "'a,b'", '"c,\\"d"']
    assert split_values("[{name='x', count=2}],[]") == ["[{name='x', count=2}]", "[]"]
    with pytest.raises(ValueError, match="unclosed"):
        split_values("[1,2")
    g = parse_grid("train.lr=1e-3,3e-3")
    assert g.key == "train.lr" and g.values == (1e-3, 3e-3)
    assert parse_grid("transport.codec=fp32,'int4'").values == ("fp32", "int4")
    with pytest.raises(ConfigError, match="empty value"):
        parse_grid("train.lr=1e-3,,3e-3")
    with pytest.raises(ConfigError, match="expected section.key"):
        parse_grid("inner_steps=1,2")


def test_plan_names_each_point_and_validates_every_one(config_file):
    points = plan_sweep(config_file, ["train.inner_steps=2,3", "transport.codec=fp32,int4"], [])
    assert [p.name for p in points] == [
        "inner_steps=2,codec=fp32",
        "inner_steps=2,codec=int4",
        "inner_steps=3,codec=fp32",
        "inner_steps=3,codec=int4",
    ]
    assert [(p.cfg.train.inner_steps, p.cfg.transport.codec) for p in points] == [
        (2, "fp32"),
        (2, "int4"),
        (3, "fp32"),
        (3, "int4"),
    ]
    # the last point is the bad one: still refused before anything runs
    with pytest.raises(ConfigError, match=r"train\.inner_steps=-1: train\.inner_steps: -1"):
        plan_sweep(config_file, ["train.inner_steps=2,-1"], [])
    with pytest.raises(ConfigError, match="both in --set and --grid"):
        plan_sweep(config_file, ["train.inner_steps=2,3"], ["train.inner_steps=4"])


def test_2x2_grid_writes_four_rows_with_the_grid_values_and_the_plot(sweep):
    out, r = sweep
    rows = _rows(out)
    assert [(row["train.inner_steps"], row["transport.codec"]) for row in rows] == [
        ("2", "fp32"),
        ("2", "int4"),
        ("3", "fp32"),
        ("3", "int4"),
    ]
    for row in rows:
        assert row["error"] == ""
        run_dir = Path(row["run_dir"])
        assert (run_dir / "summary.json").exists()
        assert run_dir.parent == out
        assert float(row["final_eval_loss"]) > 0
        assert int(row["bytes_total"]) >= int(row["bytes_up"]) + int(row["bytes_down"]) > 0
        assert row["rounds"] == "2" and row["rounds_failed"] == "0"
        assert float(row["sim_time_s"]) > 0 and 0 < float(row["compute_utilisation"]) <= 1
    by_codec = {row["transport.codec"]: int(row["bytes_up"]) for row in rows[:2]}
    assert by_codec["int4"] * 4 < by_codec["fp32"]  # int4 payloads are ~8x smaller
    assert (out / "sweep.png").read_bytes().startswith(PNG)
    progress = [line for line in r.stdout.splitlines() if re.match(r"\[\d/4\]", line)]
    assert len(progress) == 4
    assert progress[1].startswith("[2/4] inner_steps=2 codec=int4: final eval loss")


def test_rerun_skips_finished_runs_and_rereads_their_results(sweep, config_file):
    out, _ = sweep
    before = _rows(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert len(stamps) == 4
    r = _run("sweep", "--config", str(config_file), *GRIDS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("skipped (finished before)") == 4
    assert _rows(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps


def test_bad_grid_key_fails_before_any_run(config_file, tmp_path):
    out = tmp_path / "bad"
    r = _run(
        "sweep", "--config", str(config_file), "--grid", "train.inner_steps=2,3",
        "--grid", "train.inner_stepz=1", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "unknown key 'train.inner_stepz'" in r.stderr
    assert not out.exists()


def test_failed_run_is_a_row_with_its_error(config_file, tmp_path):
    out = tmp_path / "fail"
    r = _run(
        "sweep", "--config", str(config_file), "--set", "data.corpus='files'",
        "--grid", f"data.files=['{tmp_path / 'missing.txt'}']", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 1
    (row,) = _rows(out)
    assert "missing.txt" in row["error"] and row["final_eval_loss"] == ""
    assert "FAILED" in r.stdout and (out / "sweep.png").exists()


def test_html_report_is_self_contained(sweep, tmp_path):
    out, _ = sweep
    page = tmp_path / "report.html"
    r = _run("report", str(out), "--out", str(page))
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    for row in _rows(out):
        name = Path(row["run_dir"]).name
        assert f"<td>{name}</td><td>diloco</td><td>{row['transport.codec']}</td>" in text
        assert f"<td>{float(row['final_eval_loss']):.4f}</td>" in text
    # only the grid keys differ between the runs
    assert "<td>train.inner_steps</td>" in text and "<td>transport.codec</td>" in text
    assert "<td>model.preset</td>" not in text
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) >= 3 + 4 * 3  # 3 comparison plots + each run's own plots
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1]).startswith(PNG)
    assert not re.search(r"<(link|script)\b|href=|url\(", text)


def test_markdown_report_links_pngs_written_next_to_it(sweep, tmp_path):
    out, _ = sweep
    runs = sorted(p for p in out.iterdir() if p.is_dir())[:2]
    md = tmp_path / "md" / "cmp.md"
    r = _run("report", *map(str, runs), "--out", str(md))
    assert r.returncode == 0, r.stderr
    text = md.read_text()
    assert f"| {runs[0].name} | diloco |" in text and f"| {runs[1].name} | diloco |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 3 + 2 * 3
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("cmp_files/")
        assert (md.parent / link).read_bytes().startswith(PNG)


def test_report_on_a_non_run_dir_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("report", str(empty))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {empty} is not a run directory (needs config.toml and summary.json or "
        "metrics.jsonl) and holds no runs"
    ]
    r = _run("report", str(tmp_path / "nope"))
    assert (
        r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such directory"
    )
    assert not (empty / "report.html").exists()
