"""DDP vs DiLoCo vs Streaming DiLoCo vs Streaming + 4-bit, at equal tokens, in one run.

For each method: final eval loss, total bytes, the largest payload per sync, and the simulated
compute utilisation (compute time / wall time, per silo) on 100 Mbit/s and 1 Gbit/s links.
All runs share one measured step time, so the simulated clocks are comparable.

    python bench/streaming.py                              # quickstart model, 200k tokens
    python bench/streaming.py --set run.token_budget=450000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedtrain.config import load_config
from fedtrain.simulation.runner import simulate

METHODS = {
    "DDP": ["strategy.name=ddp"],
    "DiLoCo": ["strategy.name=diloco"],
    "Streaming (P=4, τ=1)": ["strategy.name=streaming", "strategy.fragments=4"],
    "Streaming + int4 + EF": [
        "strategy.name=streaming",
        "strategy.fragments=4",
        "transport.codec=int4",
        "transport.error_feedback=true",
    ],
}
LINKS = {"100 Mbit/s": 100.0, "1 Gbit/s": 1000.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedtrain-streaming-"))
    base = [
        "run.token_budget=200000",
        "train.inner_steps=24",
        "storage.checkpoint_every=1000000",
        "storage.cache_bytes=0",
        *args.overrides,
    ]
    step_time = None
    rows = []
    for method, sets in METHODS.items():
        util = {}
        for link, mbps in LINKS.items():
            profile = (
                f"simulation.profiles=[{{name='link', count=4, up_mbps={mbps}, "
                f"down_mbps={mbps}, latency_ms=20.0}}]"
            )
            cfg = load_config(args.config, [*base, *sets, profile])
            tag = f"{method}-{link}".replace(" ", "_").replace("/", "").replace("+", "")
            s = simulate(cfg, out / tag, quiet=True, step_time_s=step_time)
            step_time = step_time or s["measured_step_time_s"]
            util[link] = (s["compute_utilisation"], s["sim_time_s"])
        rows.append((method, s, util))
        print(f"  {method}: eval {s['final_eval_loss']:.4f}", flush=True)

    print(f"\n(step time {step_time:.3f} s; tokens {rows[0][1]['tokens']:,}; runs in {out})")
    head = f"{'method':24} {'eval loss':>9} {'total bytes':>15} {'peak/sync':>12} " + " ".join(
        f"{'util ' + k:>16}" for k in LINKS
    )
    print(head)
    diloco_peak = rows[1][1]["max_payload_bytes"]
    for method, s, util in rows:
        total = s["bytes_up"] + s["bytes_down"]
        print(
            f"{method:24} {s['final_eval_loss']:9.4f} {total:15,} "
            f"{s['max_payload_bytes']:12,} " + " ".join(f"{util[k][0]:16.1%}" for k in LINKS)
        )
    print(
        "\npeak bytes per sync vs DiLoCo: "
        + ", ".join(f"{m}: {s['max_payload_bytes'] / diloco_peak:.3f}x" for m, s, _ in rows)
    )


if __name__ == "__main__":
    main()
