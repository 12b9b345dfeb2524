"""DiLoCo vs synchronous data parallel at the same token budget, in one run.

Prints each strategy's final eval loss, the bytes it exchanged (measured from payloads) and the
ratio DDP/DiLoCo, plus the simulated wall time on the config's network profiles.

    python bench/diloco_vs_ddp.py                       # the quickstart config (~6 min on 2 cores)
    python bench/diloco_vs_ddp.py --set run.token_budget=200000 --set train.inner_steps=50
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedtrain.config import load_config
from fedtrain.simulation.runner import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="run config (default: the quickstart)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config override KEY=VALUE (repeatable)",
    )
    ap.add_argument("--out", default=None, help="keep run directories here")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    args = ap.parse_args()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedtrain-bench-"))
    results = {}
    for name in ("diloco", "ddp"):
        cfg = load_config(
            args.config,
            [*args.overrides, f"strategy.name={name}", "storage.checkpoint_every=1000000"],
        )
        # The same measured step time for both runs, so simulated times are comparable.
        results[name] = simulate(
            cfg,
            out / name,
            quiet=True,
            step_time_s=results["diloco"]["measured_step_time_s"] if name == "ddp" else None,
        )

    d, p = results["diloco"], results["ddp"]
    rows = [
        ("tokens", d["tokens"], p["tokens"]),
        ("rounds (syncs)", d["rounds"], p["rounds"]),
        ("initial eval loss", d["initial_eval_loss"], p["initial_eval_loss"]),
        ("final eval loss", d["final_eval_loss"], p["final_eval_loss"]),
        ("unigram eval loss", d["unigram_eval_loss"], p["unigram_eval_loss"]),
        ("bytes up", d["bytes_up"], p["bytes_up"]),
        ("bytes down", d["bytes_down"], p["bytes_down"]),
        ("simulated wall time (s)", d["sim_time_s"], p["sim_time_s"]),
        ("real wall time (s)", d["wall_s"], p["wall_s"]),
    ]
    ratio = p["bytes_total"] / d["bytes_total"]
    loss_gap = d["final_eval_loss"] - p["final_eval_loss"]
    if args.json:
        print(json.dumps({"diloco": d, "ddp": p, "bytes_ratio_ddp_over_diloco": ratio}, indent=2))
        return
    print(f"{'':28}{'DiLoCo':>16}{'DDP':>16}")
    for label, a, b in rows:
        fmt = (lambda v: f"{v:16,.0f}") if isinstance(a, int) else (lambda v: f"{v:16.4f}")
        print(f"{label:28}{fmt(a)}{fmt(b)}")
    print(f"\nbytes exchanged, DDP / DiLoCo: {ratio:.1f}x")
    print(f"eval loss, DiLoCo - DDP:      {loss_gap:+.4f} nats")
    print(f"simulated time, DDP / DiLoCo: {p['sim_time_s'] / d['sim_time_s']:.2f}x")
    print(f"(run directories in {out})")


if __name__ == "__main__":
    main()
