"""Learning quality per codec at equal tokens: final eval loss and bytes, in one run.

Runs the quickstart config (or --config) with fp32, int8, int4+EF, fp4-e2m1+EF and sign1+EF
and prints each one's final eval loss, its gap to fp32, and bytes up/down with the ratio to fp32.

    python bench/codec_quality.py                          # ~13 min on 2 CPU cores
    python bench/codec_quality.py --set run.token_budget=200000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedtrain.config import load_config
from fedtrain.simulation.runner import simulate

VARIANTS = [
    ("fp32", ["transport.codec=fp32"]),
    ("int8", ["transport.codec=int8"]),
    ("int4+EF", ["transport.codec=int4", "transport.error_feedback=true"]),
    ("fp4-e2m1+EF", ["transport.codec=fp4-e2m1", "transport.error_feedback=true"]),
    ("sign1+EF", ["transport.codec=sign1", "transport.error_feedback=true"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedtrain-codecs-"))
    results = {}
    step_time = None
    for label, sets in VARIANTS:
        if args.only and label not in args.only:
            continue
        cfg = load_config(args.config, [*args.overrides, *sets, "storage.checkpoint_every=1000000"])
        s = simulate(cfg, out / label.replace("+", "_"), quiet=True, step_time_s=step_time)
        step_time = s["measured_step_time_s"]
        results[label] = s
        print(f"  {label}: eval {s['final_eval_loss']:.4f}", flush=True)
    base = results.get("fp32")
    print(
        f"\n{'codec':12} {'eval loss':>10} {'vs fp32':>9} {'bytes up':>14} {'bytes down':>14} "
        f"{'up x':>7} {'down x':>7}"
    )
    for label, s in results.items():
        gap = (s["final_eval_loss"] / base["final_eval_loss"] - 1) * 100 if base else float("nan")
        up = base["bytes_up"] / s["bytes_up"] if base else float("nan")
        down = base["bytes_down"] / s["bytes_down"] if base else float("nan")
        print(
            f"{label:12} {s['final_eval_loss']:10.4f} {gap:+8.2f}% {s['bytes_up']:14,} "
            f"{s['bytes_down']:14,} {up:7.2f} {down:7.2f}"
        )
    print(f"(tokens per run: {next(iter(results.values()))['tokens']:,}; runs in {out})")


if __name__ == "__main__":
    main()
