"""Zeroth-order (one byte per projected gradient) vs DiLoCo + int4 vs DDP, in one run.

Part 1: bytes one silo sends per round, measured from the stored payloads, for the same model.
Part 2: eval loss vs real wall time of ZO fine-tuning (embedding only) and of first-order
training (DDP, all parameters) on CPU; the first-order loss is read at ZO's final wall time.

    python bench/zo.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedtrain.config import load_config
from fedtrain.simulation.runner import simulate

COMMON = [
    "model.preset=tiny",
    "data.tokenizer=byte",
    "data.silos=2",
    "data.max_chars=1000000",
    "run.token_budget=0",
    "run.eval_batches=16",
    "train.batch_size=8",
    "train.seq_len=32",
    "round.min_silos=1",
    "simulation.profiles=[]",
    "storage.cache_bytes=0",
    "storage.checkpoint_every=1000000",
]
ZO = [
    "strategy.name=zo",
    "strategy.zo_trainable=tok_emb.*",
    "strategy.zo_lr=1e-2",
    "strategy.zo_samples_per_round=8",
]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zo-rounds", type=int, default=40)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedtrain-zo-"))

    print("Part 1: bytes sent by one silo per round (same tiny model, 0.84M parameters)")
    per_round = {}
    for label, sets in (
        ("ZO (K=8 one-byte codes)", ZO),
        (
            "DiLoCo + int4 + EF",
            ["transport.codec=int4", "transport.error_feedback=true", "train.inner_steps=8"],
        ),
        ("DDP (fp32 gradient)", ["strategy.name=ddp"]),
    ):
        run = out / label.split()[0].lower().replace("+", "")
        s = simulate(load_config(None, COMMON + sets + ["run.rounds=2"]), run, quiet=True)
        per_round[label] = s["bytes_up"] / s["rounds"] / s["silos"]
    base = per_round["DDP (fp32 gradient)"]
    for label, b in per_round.items():
        print(f"  {label:26} {b:14,.0f} bytes   DDP/this = {base / b:12,.0f}x")

    print(f"\nPart 2: eval loss vs wall time ({args.zo_rounds} ZO rounds)")
    zo = simulate(
        load_config(
            None, COMMON + ZO + [f"run.rounds={args.zo_rounds}", "run.eval_every_tokens=1"]
        ),
        out / "zo-curve",
        quiet=True,
    )
    fo = simulate(
        load_config(
            None, COMMON + ["strategy.name=ddp", "run.rounds=400", "run.eval_every_tokens=2048"]
        ),
        out / "fo-curve",
        quiet=True,
    )
    zo_rows = rows(out / "zo-curve")
    fo_rows = [r for r in rows(out / "fo-curve") if r["eval_loss"] is not None]
    t_end = zo_rows[-1]["wall_s"]
    fo_at = [r for r in fo_rows if r["wall_s"] <= t_end]
    fo_loss = fo_at[-1]["eval_loss"] if fo_at else zo["initial_eval_loss"]
    print(f"  start (no updates)             eval {zo['initial_eval_loss']:.4f}")
    print(f"  ZO, embedding only, {t_end:5.1f} s     eval {zo_rows[-1]['eval_loss']:.4f}")
    print(f"  first-order (DDP), {t_end:5.1f} s     eval {fo_loss:.4f}")
    print(
        f"  first-order (DDP), {fo_rows[-1]['wall_s']:5.1f} s     "
        f"eval {fo_rows[-1]['eval_loss']:.4f}"
    )
    print(f"  ZO bytes up in total: {zo['bytes_up']:,}; first-order: {fo['bytes_up']:,}")
    print(f"(runs in {out})")


if __name__ == "__main__":
    main()
