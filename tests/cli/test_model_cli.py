"""`fedtrain export | eval | generate` and TensorBoard event files, on one real (tiny) run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtrain.models.trained import load_trained
from tests.cli.helpers import cli, simulate_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "run"
    sets = ["model.tie_embeddings=false", "data.silos=2", "run.rounds=4", "train.inner_steps=6"]
    return simulate_tiny(out, *sets, "run.tensorboard=true")


def _eval(run_dir: Path, *args: str) -> dict:
    r = cli("eval", str(run_dir), "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_eval_reproduces_the_runs_final_eval_loss(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    final = _eval(run_dir)
    assert final["round"] is None and final["tokens"] == 4 * 32
    assert final["loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-9)
    assert final["perplexity"] == pytest.approx(2.718281828459045 ** final["loss"])
    initial = _eval(run_dir, "--round", "0")
    assert initial["loss"] > final["loss"] + 0.5  # training did something


def test_eval_on_given_text_and_round_errors(run_dir, tmp_path):
    text = tmp_path / "psalm.txt"
    text.write_text("The LORD is my shepherd; I shall not want. " * 200)
    scored = _eval(run_dir, "--data", str(text), "--windows", "3")
    assert scored["tokens"] == 3 * 32 and scored["data"] == str(text)
    # Round 1's weights: older than the kept checkpoints and updates → pruned; the error says
    # how to keep them.
    r = cli("eval", str(run_dir), "--round", "1")
    assert r.returncode == 2 and "no longer kept" in r.stderr and "storage.keep_weights" in r.stderr
    r = cli("eval", str(run_dir), "--round", "9")
    assert r.returncode == 2 and "round 9 was not committed" in r.stderr
    r = cli("eval", str(tmp_path))
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_export_of_a_round_loads_in_transformers_with_equal_logits(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    r = cli("export", str(run_dir), "--out", str(out), "--round", "2")
    assert r.returncode == 0, r.stderr
    assert "round 2" in r.stdout
    ours = load_trained(run_dir, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("Blessed are the meek: for they shall inherit the earth.")["input_ids"]
    assert ids == ours.tokenizer.encode("Blessed are the meek: for they shall inherit the earth.")
    x = torch.tensor([ids])
    with torch.no_grad():
        assert float((ours.model(x) - hf(x).logits).abs().max()) < 1e-4
    again = cli("export", str(run_dir), "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_generate_is_deterministic_for_a_seed(run_dir):
    def gen(*args: str) -> str:
        r = cli("generate", str(run_dir), "--prompt", "And God said", "-n", "24", *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("And God said")
        return r.stdout

    a, b, c = gen("--seed", "1"), gen("--seed", "1"), gen("--seed", "2", "-t", "1.5")
    assert a == b and a != c
    assert len(a) > len("And God said") + 5
    assert gen("-t", "0", "--seed", "1") == gen("-t", "0", "--seed", "7")  # greedy
    r = cli("generate", str(run_dir), "--prompt", "x", "--temperature", "-1")
    assert r.returncode == 2 and "--temperature" in r.stderr


def test_tensorboard_event_files_hold_the_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("eval_loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx([r["eval_loss"] for r in rows], rel=1e-6)
    tok = EventAccumulator(str(run_dir / "tensorboard" / "by_tokens"))
    tok.Reload()
    by_tokens = [e.step for e in tok.Scalars("by_tokens/eval_loss")]
    assert by_tokens == [r["tokens"] for r in rows]
    assert "bytes_up" in acc.Tags()["scalars"]


def test_status_of_a_finished_run(run_dir):
    r = cli("status", str(run_dir), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert st["state"] == "finished" and st["round"] == st["expected_rounds"] == 4
    assert st["in_progress"] is None and st["eta_s"] is None
    assert st["tokens"] == rows[-1]["tokens"] and st["eval_loss"] == rows[-1]["eval_loss"]
    assert st["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert [s["silo"] for s in st["silos"]] == ["silo0", "silo1"]
    assert all(s["last_round"] == 4 and s["strikes"] == 0 for s in st["silos"])
    assert [h["round"] for h in st["history"]] == [1, 2, 3, 4]
    table = cli("status", str(run_dir))
    assert table.returncode == 0 and "finished, round 4/4" in table.stdout
    assert "silo1" in table.stdout
