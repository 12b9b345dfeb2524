import json
import subprocess
import sys


def _run(*args: str, **kw):
    return subprocess.run(
        [sys.executable, "-m", "fedtrain.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def test_help_works_without_importing_torch_or_flwr():
    code = (
        "import sys\nfrom fedtrain.cli.main import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0 and 'simulate' in r.output, r.output\n"
        "r = CliRunner().invoke(app, ['simulate', '--help'])\n"
        "assert r.exit_code == 0 and '--set' in r.output, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bad_config_value_is_one_clear_line_and_exit_2(tmp_path):
    r = _run("simulate", "--run-dir", str(tmp_path / "r"), "--set", "train.inner_steps=-3")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: train.inner_steps: -3 is not allowed; expected an integer >= 1"
    )
    assert "Traceback" not in r.stderr


def test_existing_run_directory_is_not_overwritten(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"keep": True}))
    r = _run("simulate", "--run-dir", str(run), "--set", "model.preset=tiny")
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert json.loads((run / "summary.json").read_text()) == {"keep": True}
