"""Stragglers on the virtual clock: sync DiLoCo vs gradient coding s=1 vs SR-SGC vs Compass.

Two scenarios over 4 silos: one silo 4x slower all the time, and random (B=2, W=3, λ=2)-bursty
stragglers (a straggling silo's steps take 4x longer). For each method: mean round time, idle
fraction (1 − compute/elapsed per silo) and compute spent per useful token, as ratios to the
uncoded synchronous round with the same stragglers, plus eval loss at equal (virtual) wall time.
Sync, GC and Compass train for real (tiny preset, public corpus); SR-SGC is simulated at the
job level on the same clock (its jobs must be independent — e.g. concurrent runs — so it has
no single learning curve here).

    python bench/stragglers.py
    python bench/stragglers.py --only bursty --rounds 20 --set model.preset=mini
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from fedtrain.config import load_config
from fedtrain.data.stream import derive_seed
from fedtrain.simulation.runner import simulate
from fedtrain.strategies.sgc import SRSGC, BurstyModel, bursty_pattern

SILOS, STEP_S, SLOW, H = 4, 0.5, 4.0, 20
BURSTY = {"b": 2, "w": 3, "lam": 2, "rate": 0.8}
SCENARIOS = {
    "one silo 4x slower": [
        f"simulation.profiles=[{{name='fast', count={SILOS - 1}, step_time_s={STEP_S}}}, "
        f"{{name='slow', count=1, step_time_s={STEP_S}, slowdown={SLOW}}}]"
    ],
    "bursty (B=2, W=3, λ=2)": [
        f"simulation.profiles=[{{name='all', count={SILOS}, step_time_s={STEP_S}}}]",
        f"simulation.bursty_b={BURSTY['b']}",
        f"simulation.bursty_w={BURSTY['w']}",
        f"simulation.bursty_lambda={BURSTY['lam']}",
        f"simulation.bursty_rate={BURSTY['rate']}",
        f"simulation.straggler_slowdown={SLOW}",
    ],
}
METHODS = {
    "sync DiLoCo": [],
    "GC s=1 (frc)": ["strategy.coding=frc", "strategy.stragglers=1"],
    "Compass": ["strategy.scheduling=compass", f"strategy.q_min={H // 5}", f"strategy.q_max={H}"],
}


def _train(out: Path, sets: list[str]) -> dict[str, Any]:
    cfg = load_config(None, sets)
    s = simulate(cfg, out, quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    compute = sum(s["silo_compute_s"].values())
    return {
        "round_s": s["sim_time_s"] / max(1, s["rounds"]),
        "idle": 1.0 - s["compute_utilisation"],
        "compute_per_token": compute / max(1, s["tokens"]),
        "curve": [(r["sim_time_s"], r["eval_loss"]) for r in rows if r["eval_loss"] is not None],
        "rounds": s["rounds"],
    }


def _sgc(scenario: str, rounds: int, seed: int) -> dict[str, Any]:
    """SR-SGC on the same clock: job t = H steps on each of n shards; a worker computes s+1
    shards' worth per round; the master waits for its non-stragglers (all of them when the
    round breaks the straggler model)."""
    model = BurstyModel(SILOS, BURSTY["b"], BURSTY["w"], BURSTY["lam"])
    if scenario.startswith("one silo"):
        pattern = [{SILOS - 1} for _ in range(rounds)]
    else:
        # The engine's pattern: same seed, generated round by round, so the same prefix.
        rng = random.Random(derive_seed(seed, "bursty"))
        pattern = bursty_pattern(model, rounds, BURSTY["rate"], rng)
    sgc = SRSGC(SILOS, model)
    task = (sgc.s + 1) * H * STEP_S
    elapsed = compute = 0.0
    for t, late in enumerate(pattern):
        outcome = sgc.run_round(t, late)
        times = {w: task * (SLOW if w in late else 1.0) for w in range(SILOS)}
        round_s = max(times[w] for w in outcome.delivered)
        elapsed += round_s
        compute += sum(min(times[w], round_s) for w in range(SILOS))
    jobs = len(sgc.decoded)
    return {
        "round_s": elapsed / rounds,
        "idle": 1.0 - compute / (SILOS * elapsed),
        "compute_per_job": compute / max(1, jobs),
        "waits": sgc.waits,
        "s": sgc.s,
    }


def _loss_at(curve: list[tuple[float, float]], t: float) -> float | None:
    done = [loss for when, loss in curve if when <= t + 1e-9]
    return done[-1] if done else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--only", choices=["slow", "bursty"], default=None, help="one scenario")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedtrain-stragglers-"))
    base = [
        "model.preset=tiny",
        "data.tokenizer=byte",
        f"data.silos={SILOS}",
        "data.max_chars=1500000",
        "run.token_budget=0",
        f"run.rounds={args.rounds}",
        "run.eval_every_tokens=1",
        "run.eval_batches=16",
        "round.min_silos=1",
        f"train.inner_steps={H}",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.lr=3e-3",
        "train.warmup_steps=5",
        "storage.checkpoint_every=1000000",
        "storage.cache_bytes=0",
        *args.overrides,
    ]
    print(f"{SILOS} silos, H={H}, {STEP_S} s/step (virtual), {args.rounds} rounds\n")
    for scenario, sets in SCENARIOS.items():
        if args.only and not scenario.startswith(
            {"slow": "one silo", "bursty": "bursty"}[args.only]
        ):
            continue
        res = {
            m: _train(out / f"{scenario[:3]}-{m[:4]}".replace(" ", "_"), [*base, *sets, *x])
            for m, x in METHODS.items()
        }
        base_r = res["sync DiLoCo"]
        t_equal = min(r["curve"][-1][0] for r in res.values())
        sgc = _sgc(scenario, args.rounds, load_config(None, base).run.seed)
        print(f"## {scenario}  (eval loss compared at t = {t_equal:.1f} s virtual)")
        print(
            f"{'method':<16}{'round s':>9}{'ratio':>7}{'idle':>7}{'silo-s/token':>14}"
            f"{'work':>6}{'loss@t':>8}"
        )
        for m, r in res.items():
            loss = _loss_at(r["curve"], t_equal)
            cpt = r["compute_per_token"] / base_r["compute_per_token"]
            work = 2.0 if m.startswith("GC") else 1.0  # shards trained per shard used: s+1
            print(
                f"{m:<16}{r['round_s']:>9.2f}{r['round_s'] / base_r['round_s']:>7.2f}"
                f"{r['idle']:>7.1%}{cpt:>13.2f}x{work:>5.1f}x"
                f"{loss if loss is not None else float('nan'):>8.3f}"
            )
        sync_job = base_r["round_s"]  # one uncoded job per round: the same unit as SGC's
        print(
            f"{'SR-SGC s=' + str(sgc['s']):<16}{sgc['round_s']:>9.2f}"
            f"{sgc['round_s'] / sync_job:>7.2f}{sgc['idle']:>7.1%}"
            f"{sgc['compute_per_job'] / (SILOS * H * STEP_S):>13.2f}x{sgc['s'] + 1:>5.1f}x"
            f"{'(jobs)':>8}"
            f"   waits for all: {sgc['waits']}/{args.rounds} rounds"
        )
        print()
    print(
        "silo-s/token: silo compute seconds per useful token vs sync (a 4x-slow silo's steps "
        "cost 4x the seconds); work: shards trained per shard used (s+1 with coding). "
        "SR-SGC: per decoded job vs one uncoded job."
    )


if __name__ == "__main__":
    main()
