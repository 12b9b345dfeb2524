"""`fedtrain simulate --engine flower`: the real Flower ServerApp and ClientApp under Flower's
simulation runtime (Ray), three virtual silos served by a pool of two actors.

The final global weights equal the in-process engine's BITWISE for the same config and seeds:
both run the same silo trainer code with the same thread count (``train.threads = 1``), and the
Flower engine hands replies to the aggregator in silo order, as the in-process engine does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import tomli_w
from safetensors.torch import load_file

from fedtrain.config import load_config
from fedtrain.runtime.children import pids_matching
from fedtrain.simulation.ray_runtime import _process_table
from fedtrain.simulation.runner import simulate
from tests.conftest import tiny_config_dict

SILOS = 3


def _config(path: Path, **sections: dict) -> Path:
    base = tiny_config_dict(
        run={"name": "flower", "rounds": 2},
        data={"silos": SILOS},
        train={"threads": 1},
        round={"timeout_s": 240.0},
    )
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    path.write_text(tomli_w.dumps(base))
    return path


def _fedtrain(*args: str, env: dict[str, str] | None = None, timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "fedtrain.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _events(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


@pytest.fixture(scope="module")
def ray_tmp():
    """A short private RAY_TMPDIR: every Ray process of the run names it on its command line."""
    path = Path(tempfile.mkdtemp(prefix="ft", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_tmp):
    root = tmp_path_factory.mktemp("flower")
    cfg = _config(root / "run.toml")
    t0 = time.perf_counter()
    flower = _fedtrain(
        "simulate",
        "-q",
        "-c",
        str(cfg),
        "--run-dir",
        str(root / "flower"),
        "--engine",
        "flower",
        env={"RAY_TMPDIR": str(ray_tmp)},
    )
    assert flower.returncode == 0, flower.stderr[-3000:]
    t1 = time.perf_counter()
    simulate(load_config(cfg), root / "inproc", quiet=True)
    print(f"wall: flower {t1 - t0:.1f}s (CLI process), in-process {time.perf_counter() - t1:.1f}s")
    return {"flower": root / "flower", "inproc": root / "inproc", "proc": flower}


@pytest.mark.slow
def test_flower_weights_equal_inprocess_bitwise(runs):
    a = load_file(str(runs["flower"] / "model.safetensors"))
    b = load_file(str(runs["inproc"] / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, different
    fs = json.loads((runs["flower"] / "summary.json").read_text())
    ins = json.loads((runs["inproc"] / "summary.json").read_text())
    assert fs["rounds"] == ins["rounds"] == 2
    assert fs["final_eval_loss"] == ins["final_eval_loss"] < fs["initial_eval_loss"]
    for key in ("tokens", "bytes_up", "bytes_down", "bytes_join"):
        assert fs[key] == ins[key], key
    assert fs["sim_time_s"] is None and ins["sim_time_s"] is not None  # no virtual clock


@pytest.mark.slow
def test_sparse_codec_and_muon_through_the_flower_apps_equal_inprocess(tmp_path, ray_tmp):
    """topk-int2 + error feedback both ways and the Muon inner optimizer through the
    deployment's ServerApp and silo daemon (FSDP trainer): the same bits as in-process."""
    train = {"threads": 1, "optimizer": "muon"}
    transport = {"codec": "topk-int2", "error_feedback": True, "chunk": 1024}
    cfg = _config(tmp_path / "run.toml", train=train, transport=transport)
    r = _fedtrain("simulate", "-q", "-c", str(cfg), "--run-dir", str(tmp_path / "flower"),
                  "--engine", "flower", env={"RAY_TMPDIR": str(ray_tmp)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    simulate(load_config(cfg), tmp_path / "inproc", quiet=True)
    a = load_file(str(tmp_path / "flower" / "model.safetensors"))
    b = load_file(str(tmp_path / "inproc" / "model.safetensors"))
    assert [k for k in a if not (a[k] == b[k]).all()] == []
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["codec"] == "topk-int2"
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    # One reply: 3 silos' payloads of ~0.9M values at 1.56% density, 2 rounds.
    fp32_up = 4 * summary["parameters"] * 3 * 2
    assert fp32_up / summary["bytes_up"] > 40


@pytest.mark.slow
def test_same_run_directory_as_inprocess(runs):
    run = runs["flower"]
    for name in ("config.toml", "summary.json", "metrics.jsonl", "model.safetensors"):
        assert (run / name).is_file(), name
    plots = {p.name for p in (run / "plots").glob("*.png")}
    assert {"loss_vs_round.png", "loss_vs_tokens.png", "bytes_vs_round.png"} <= plots
    assert plots <= {p.name for p in (runs["inproc"] / "plots").glob("*.png")}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["sim_time_s"] is None for r in rows)
    assert [r["silos"] for r in rows] == [SILOS, SILOS]
    assert 'engine = "flower"' in (run / "config.toml").read_text()
    assert not (run / "silos").exists()  # silo snapshots are dropped once the run is finished
    assert runs["proc"].stdout.strip() == str(run)


@pytest.mark.slow
def test_silos_ran_as_flower_clientapps_with_state_in_files(runs):
    run = runs["flower"]
    assert sorted(e["silo"] for e in _events(run, "silo_joined")) == [
        f"silo{i}" for i in range(SILOS)
    ]
    reports = _events(run, "silo_report")
    for i in range(SILOS):
        mine = [e for e in reports if e["silo"] == f"silo{i}"]
        # Each message may land on any actor, yet the step count (and AdamW state) carried on.
        assert [e["round"] for e in mine] == [1, 2]
        assert [e["step"] for e in mine] == [10, 20]
    actors = {e["mailbox_pid"] for e in reports}
    assert 1 <= len(actors) <= (os.cpu_count() or 1)  # the pool: one actor per core
    # gone with Ray: no live ray:: process under those pids (a zombie waiting for init, or a
    # pid the system reused since, is not an actor)
    procs = _process_table()
    still = [
        p for p in actors if p in procs and procs[p][1] != "Z" and procs[p][2].startswith("ray::")
    ]
    assert not still


@pytest.mark.slow
def test_nothing_left_running_and_terminal_stays_quiet(runs, ray_tmp):
    assert not pids_matching(str(ray_tmp)), "Ray processes were left running"
    assert not list(ray_tmp.iterdir()), "Ray's temporary directory was left behind"
    out = runs["proc"].stdout + runs["proc"].stderr
    assert not re.search(r"\bray\b|flwr|Traceback|DEPRECATED", out, re.IGNORECASE), out[-2000:]
    assert (runs["flower"] / "logs" / "flower.log").stat().st_size > 0


@pytest.mark.slow
def test_silo_that_cannot_start_stops_the_run_with_its_reason(tmp_path, ray_tmp):
    # A file where the silos' work dirs go: every ClientApp fails (in its Ray actor).
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "silos").write_text("not a directory")
    r = _fedtrain(
        "simulate",
        "-q",
        "-c",
        str(_config(tmp_path / "run.toml")),
        "--run-dir",
        str(tmp_path / "run"),
        "--engine",
        "flower",
        env={"RAY_TMPDIR": str(ray_tmp)},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a virtual silo could not join the run: NotADirectoryError")
    assert not re.search(r"\bray\b|Traceback", r.stderr, re.IGNORECASE), r.stderr
    assert not pids_matching(str(ray_tmp)) and not list(ray_tmp.iterdir())


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("strategy.coding='frc'", "strategy.coding"),
        ("strategy.name='ddp'", "strategy.name = 'ddp'"),
        ("simulation.bursty_b=2", "simulation.bursty_b"),
    ],
)
def test_config_the_flower_engine_cannot_run_is_refused(tmp_path, override, named):
    cfg = _config(tmp_path / "run.toml")
    r = _fedtrain(
        "simulate", "-c", str(cfg), "--run-dir", str(tmp_path / "run"), "--engine", "flower",
        "--set", override,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and named in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_unknown_engine_names_the_choices(tmp_path):
    r = _fedtrain("simulate", "-c", str(_config(tmp_path / "run.toml")), "--engine", "ray")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: simulation.engine: 'ray' is not allowed; expected 'inprocess' or 'flower'"
    )


def test_without_ray_says_what_to_install(tmp_path):
    # A real interpreter on which `import ray` fails, as where flwr[simulation] is missing.
    no_ray = (
        "import sys, importlib.abc\n"
        "class NoRay(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoRay())\n"
        "from fedtrain.cli.main import main\n"
        "sys.argv = ['fedtrain'] + sys.argv[1:]\n"
        "main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", no_ray, "simulate", "-c", str(_config(tmp_path / "run.toml"))]
        + ["--run-dir", str(tmp_path / "run"), "--engine", "flower"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: simulation.engine = 'flower' needs Flower's simulation runtime (Ray), which is "
        "not installed: pip install '.[simulation]'"
    ]
