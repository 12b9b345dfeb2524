"""Everyday deployment commands: --version, keys silo/add, the flwr wrapper, the server's
default address, --resume with the config repeated, and the silo's --data check."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import tomli_w
from typer.testing import CliRunner

import fedtrain
from fedtrain.cli.main import app
from fedtrain.config import config_to_dict, load_config


def _fedtrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedtrain.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_version_prints_the_version_without_torch_or_flwr():
    code = (
        "import sys\nfrom fedtrain.cli.main import main\nsys.argv = ['fedtrain', '--version']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"fedtrain {fedtrain.__version__}", "[]"]
    r = _fedtrain("--version")
    assert r.returncode == 0 and r.stdout == f"fedtrain {fedtrain.__version__}\n"


def test_keys_silo_then_keys_add_from_hands_over_only_public_keys(tmp_path):
    keys, on_silo = tmp_path / "keys", tmp_path / "on-silo"
    runner = CliRunner()
    r = runner.invoke(app, ["keys", "init", str(keys), "--silo", "silo0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["keys", "silo", "--silo", "silo1", "--out", str(on_silo)])
    assert r.exit_code == 0, r.output
    assert f"{on_silo / 'auth_key.pub'} {on_silo / 'sign_key.pub'}" in r.output
    assert (on_silo / "auth_key").stat().st_mode & 0o777 == 0o600
    # Handing over the whole directory (private keys included) is refused in one line.
    r = _fedtrain("keys", "add", str(keys), "--silo", "silo1", "--from", str(on_silo))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: --from") and len(r.stderr.strip().splitlines()) == 1
    assert "holds private key auth_key, sign_key" in r.stderr
    handed = tmp_path / "handed"
    handed.mkdir()
    for name in ("auth_key.pub", "sign_key.pub"):
        (handed / name).write_bytes((on_silo / name).read_bytes())
    r = runner.invoke(app, ["keys", "add", str(keys), "--silo", "silo1", "--from", str(handed)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (keys / "silos" / "silo1").iterdir()) == [
        "auth_key.pub",
        "sign_key.pub",
    ]
    r = runner.invoke(app, ["keys", "add", str(keys), "--silo", "silo2"])
    assert r.exit_code == 0, r.output
    assert len(list((keys / "silos" / "silo2").iterdir())) == 4
    r = _fedtrain("keys", "add", str(keys), "--silo", "silo2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: silo silo2 already has keys in {keys / 'silos' / 'silo2'}; choose another name"
    ]


def _fake_flwr(tmp_path: Path, stdout: str) -> dict[str, str]:
    """PATH with a ``flwr`` that prints its FLWR_HOME and arguments, then ``stdout``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "flwr"
    script.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        "print('FLWR_HOME=' + os.environ.get('FLWR_HOME', ''))\n"
        "print('ARGS=' + ' '.join(sys.argv[1:]))\n"
        f"sys.stdout.write({stdout!r})\nsys.exit(3 if 'fail' in sys.argv else 0)\n"
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _run_dir(tmp_path: Path, events: list[dict] | None = None) -> Path:
    run = tmp_path / "run"
    (run / "flwr").mkdir(parents=True)
    (run / "flwr" / "config.toml").write_text('[superlink]\ndefault = "coordinator"\n')
    lines = [json.dumps(e) for e in events or []]
    (run / "events.jsonl").write_text("\n".join([*lines, '{"event": "trunc']))  # a partial line
    return run


NODE = 12745450460804675447


def test_flwr_wrapper_sets_flwr_home_and_names_silos(tmp_path):
    run = _run_dir(tmp_path, [{"event": "silo_joined", "node": NODE, "silo": "silo0", "time": 1.0}])
    table = f"│ {NODE}                 │ online │\n│ 99 │\n"
    env = _fake_flwr(tmp_path, table)
    r = _fedtrain("flwr", "--run-dir", str(run), "supernode", "ls", "--verbose", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"FLWR_HOME={(run / 'flwr').resolve()}"
    assert lines[1] == "ARGS=supernode ls --verbose"
    assert lines[2] == f"│ {NODE} (silo0)         │ online │"  # same width as before
    assert len(lines[2]) == len(table.splitlines()[0])
    assert lines[3] == "│ 99 │"
    # Other subcommands only get FLWR_HOME; Flower's exit code comes back.
    r = _fedtrain("flwr", "--run-dir", str(run), "stop", "fail", env=env)
    assert r.returncode == 3
    assert r.stdout.splitlines()[:2] == [
        f"FLWR_HOME={(run / 'flwr').resolve()}",
        "ARGS=stop fail",
    ]
    assert "(silo0)" not in r.stdout


def test_flwr_wrapper_json_output_gains_silo_field(tmp_path):
    run = _run_dir(tmp_path, [{"event": "silo_joined", "node": NODE, "silo": "silo0"}])
    from fedtrain.cli.flwr import annotate_json, node_silos

    names = node_silos(run)
    assert names == {NODE: "silo0"}
    got = annotate_json({"nodes": [{"node-id": str(NODE)}, {"node-id": "5"}]}, names)
    assert got == {"nodes": [{"node-id": str(NODE), "silo": "silo0"}, {"node-id": "5"}]}


def test_flwr_wrapper_refuses_a_missing_run_dir_in_one_line(tmp_path):
    env = _fake_flwr(tmp_path, "")
    r = _fedtrain("flwr", "--run-dir", str(tmp_path / "nope"), "ls", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --run-dir {tmp_path / 'nope'}: no such run directory (`fedtrain server` makes it)"
    ]
    (tmp_path / "empty").mkdir()
    r = _fedtrain("flwr", "--run-dir", str(tmp_path / "empty"), "ls", env=env)
    assert r.returncode == 2 and "no Flower settings (flwr/config.toml)" in r.stderr
    assert "FLWR_HOME" not in r.stdout  # Flower never ran (it would start a stray SuperLink)


def test_server_address_defaults_to_loopback():
    from fedtrain.cli.deploy import server
    from fedtrain.server.launcher import ServerOptions

    assert inspect.signature(server).parameters["address"].default == "127.0.0.1:9092"
    assert ServerOptions(config=None, run_dir=None).address == "127.0.0.1:9092"


def _stored_run(tmp_path: Path, overrides: list[str]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, overrides)
    (run / "config.toml").write_text(tomli_w.dumps(config_to_dict(cfg)))
    return run


def test_resume_accepts_the_runs_own_config_and_names_differing_keys(tmp_path):
    run = _stored_run(tmp_path, ["train.inner_steps=50", "run.rounds=4"])
    runner = CliRunner()
    same = ["--set", "train.inner_steps=50", "--set", "run.rounds=4"]
    r = runner.invoke(app, ["simulate", "--resume", "--run-dir", str(run), *same])
    # Past the config check: refused only because the run has no index to resume from.
    assert r.exit_code == 2 and "has no run index to resume from" in r.output, r.output
    other = ["--set", "train.inner_steps=20", "--set", "run.rounds=6"]
    r = runner.invoke(app, ["simulate", "--resume", "--run-dir", str(run), *other])
    assert r.exit_code == 2
    assert (
        "error: --resume: the given config differs from the run's in "
        "run.rounds (6 vs 4), train.inner_steps (20 vs 50) "
        "(drop --config/--set to continue with the run's own)"
    ) in r.output


def test_config_differences_is_empty_for_the_same_config():
    from fedtrain.cli.simulate import config_differences

    a = load_config(None, ["run.rounds=4"])
    assert config_differences(a, load_config(None, ["run.rounds=4"])) == ""
    many = [f"train.{k}" for k in ("inner_steps=7", "lr=0.5", "batch_size=3")]
    got = config_differences(load_config(None, [*many, "run.rounds=9", "run.seed=5"]), a, 2)
    assert got.endswith(", and 3 more") and got.count(" vs ") == 2


def _client(*args: str) -> subprocess.CompletedProcess:
    return _fedtrain("client", "--silo", "silo0", "--server", "127.0.0.1:1", *args)


def test_client_refuses_bad_data_before_starting_anything(tmp_path):
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    cases = {
        str(tmp_path / "missing.txt"): "no such file",
        str(tmp_path / "none-*.txt"): "no files match",
        str(tmp_path / "empty.txt"): "no text found (1 file(s), all empty)",
        str(tmp_path / "bin.txt"): "is not a text file (binary data)",
        str(tmp_path / "latin1.txt"): "is not UTF-8 text",
        str(tmp_path / "bad.jsonl"): "expected JSON lines with a 'text' field",
    }
    for data, reason in cases.items():
        work = tmp_path / f"work-{abs(hash(data))}"
        r = _client("--data", data, "--work-dir", str(work))
        assert r.returncode == 2, (data, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --data {data!r}: "), lines
        assert reason in lines[0], (data, lines)
        assert not work.exists()  # nothing started: no work dir, no daemon, no logs


def test_check_data_accepts_text_and_samples_only_the_start(tmp_path):
    from fedtrain.client.launcher import check_data

    (tmp_path / "a.txt").write_text("hello\n")
    # Valid UTF-8 at the start, junk far past the sample: not read, so not refused.
    (tmp_path / "b.txt").write_bytes("é".encode() * 100_000 + b"\xff\x00")
    (tmp_path / "c.jsonl").write_text('{"text": "hi"}\n' * 3)
    assert check_data(str(tmp_path / "*.txt")) == 2
    assert check_data(str(tmp_path / "c.jsonl")) == 1


def test_server_refuses_strategies_it_cannot_deploy_before_starting_anything(tmp_path: Path):
    """``fedtrain server`` with zo or ddp stops at start naming the key (it used to start and
    fail every round); nothing is started and the run directory is not created."""
    for name in ("zo", "ddp"):
        run_dir = tmp_path / name
        r = _fedtrain(
            "server",
            "--run-dir",
            str(run_dir),
            "--address",
            "127.0.0.1:0",
            "--set",
            f"strategy.name={name}",
        )
        assert r.returncode != 0
        assert f"strategy.name = '{name}'" in r.stderr + r.stdout
        assert "not available in deployment" in r.stderr + r.stdout
        assert "Traceback" not in r.stderr
        assert not run_dir.exists()
