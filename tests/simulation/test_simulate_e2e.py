"""End to end: `fedtrain simulate` on the tiny preset writes every output and actually learns.

One DiLoCo run is shared by the module (the expensive part); the DDP baseline runs once at a
small budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

OVERRIDES = [
    "model.preset=tiny",
    "data.tokenizer=byte",
    "data.silos=2",
    "data.max_chars=1500000",
    "run.token_budget=0",
    "run.rounds=4",
    "run.eval_batches=16",
    "train.inner_steps=20",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.lr=3e-3",
    "train.warmup_steps=5",
    "round.min_silos=1",
    "simulation.profiles=[]",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    args = [sys.executable, "-m", "fedtrain.cli.main", "simulate", "--quiet", "--run-dir", str(out)]
    for o in OVERRIDES:
        args += ["--set", o]
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    return out


def test_run_directory_has_every_output(run_dir):
    for name in (
        "config.toml",
        "metrics.jsonl",
        "events.jsonl",
        "summary.json",
        "model.safetensors",
        "tokenizer.json",
        "plots/loss_vs_round.png",
        "plots/loss_vs_tokens.png",
        "plots/bytes_vs_round.png",
    ):
        assert (run_dir / name).exists(), name
    assert (run_dir / "plots/loss_vs_round.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "index.sqlite").exists() and (run_dir / "blobs").is_dir()


def test_metrics_have_one_row_per_round_with_required_fields(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "round",
        "step",
        "tokens",
        "train_loss",
        "eval_loss",
        "bytes_up",
        "bytes_down",
        "wall_s",
        "sim_time_s",
    ):
        assert all(r[key] is not None for r in rows), key
    assert [r["step"] for r in rows] == [20, 40, 60, 80]
    assert rows[-1]["tokens"] == 2 * 80 * 8 * 64
    assert all(b["sim_time_s"] > a["sim_time_s"] for a, b in zip(rows, rows[1:], strict=False))


def test_bytes_are_counted_from_real_payloads(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model_bytes = summary["fp32_model_bytes"]
    for r in rows:
        # Two fp32 pseudo-gradients up: the model's bytes plus a small framing header each.
        assert 2 * model_bytes < r["bytes_up"] < 2 * model_bytes * 1.01
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)


def test_loss_falls_well_below_start_and_below_a_unigram_model(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["final_eval_loss"] <= s["initial_eval_loss"] - 0.3
    assert s["final_eval_loss"] < s["unigram_eval_loss"]
    assert s["silos"] == 2 and s["rounds"] == 4 and len(s["config_sha256"]) == 64


def test_final_weights_match_the_last_committed_state(run_dir):
    from fedtrain.storage.runstore import RunStore

    store = RunStore(run_dir)
    assert store.index.committed_rounds() == [1, 2, 3, 4]
    final = load_file(str(run_dir / "model.safetensors"))
    committed, _ = store.get_tensors(store.index.round_state(4)["global_blob"])
    assert final.keys() == committed.keys()
    assert all((final[k] == committed[k]).all() for k in final)
    # keep_checkpoints = 2: older rounds keep their metrics but not their state blobs;
    # keep_updates = 2: the weights stay for the window (3, 4) and the round before it.
    old, before, recent = (store.index.round_state(r) for r in (1, 2, 3))
    assert old.get("pruned") and "outer_blob" not in old and "outer_blob" in recent
    assert "global_blob" not in old and store.blobs.exists(before["global_blob"])
    assert "aggregate_blob" not in before and store.blobs.exists(recent["aggregate_blob"])


def test_ddp_baseline_spends_the_same_tokens_with_far_more_bytes(tmp_path):
    from fedtrain.config import load_config
    from fedtrain.simulation.runner import simulate

    common = [o for o in OVERRIDES if not o.startswith("run.rounds")]
    budget = [
        "run.rounds=0",
        f"run.token_budget={2 * 20 * 8 * 64 * 2}",
        "storage.checkpoint_every=100",
    ]
    diloco = simulate(load_config(None, common + budget), tmp_path / "d", quiet=True)
    ddp = simulate(
        load_config(None, common + budget + ["strategy.name=ddp"]), tmp_path / "p", quiet=True
    )
    assert diloco["tokens"] == ddp["tokens"] == 2 * 20 * 8 * 64 * 2
    assert ddp["rounds"] == 40 and diloco["rounds"] == 2
    # DDP exchanges a gradient every step, DiLoCo a pseudo-gradient every H=20 steps.
    assert ddp["bytes_total"] / diloco["bytes_total"] > 15


def test_int4_with_error_feedback_cuts_bytes_both_ways_and_keeps_weights_identical(
    run_dir, tmp_path
):
    import torch

    from fedtrain.config import load_config
    from fedtrain.simulation.runner import build_simulation

    fp32 = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(
        None,
        OVERRIDES
        + ["transport.codec=int4", "transport.error_feedback=true", "transport.sign_updates=true"],
    )
    sim = build_simulation(cfg, tmp_path / "int4", quiet=True)
    s = sim.execute()
    # Measured from payloads, block scales and headers included.
    assert fp32["bytes_up"] / s["bytes_up"] >= 6.0
    assert fp32["bytes_down"] / s["bytes_down"] >= 6.0
    assert s["compression_up"] > 7.0 and s["compression_down"] > 7.0
    assert s["bytes_join"] == fp32["bytes_join"]  # full weights only once, at join
    # Coordinator and every silo hold bitwise the same weights after the final broadcast.
    coord = dict(sim.model.named_parameters())
    for worker in sim.engine.workers.values():
        for n, p in coord.items():
            assert torch.equal(worker.trainer.anchor[n], p.detach()), (worker.name, n)
            assert torch.equal(worker.trainer.params[n].detach(), p.detach())
    # Error feedback residuals exist on every silo and at the coordinator.
    assert all(w.feedback is not None and w.feedback.residual for w in sim.engine.workers.values())
    assert sim.coordinator.feedback is not None and sim.coordinator.feedback.ids  # in the store
    # The curve does not notice much: still learns past the unigram model.
    assert s["final_eval_loss"] < fp32["unigram_eval_loss"]
    assert s["final_eval_loss"] < fp32["final_eval_loss"] + 0.1
