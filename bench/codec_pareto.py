"""Bytes vs loss at equal tokens: every codec (sparse ones at two densities) with AdamW and Muon.

Runs the quickstart config (or --config) once per (codec, inner optimizer) at the same token
budget and draws final eval loss against total bytes (up + down) on a log axis, the Pareto
front marked. Ratios and loss changes are against fp32 + AdamW measured in the same run.

    python bench/codec_pareto.py --json                      # 16 runs, ~40 min on 2 CPU cores
    python bench/codec_pareto.py --set run.token_budget=150000 --out pareto.png
    python bench/codec_pareto.py --only fp32 topk-int2@1.56% --optimizers adamw

With --json the last line is ``{"runs": [{"name", "codec", "optimizer", "eval_loss",
"bytes_up_vs_fp32", "bytes_down_vs_fp32", "loss_delta_pct"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from fedtrain.config import load_config
from fedtrain.simulation.runner import simulate

EF = "transport.error_feedback=true"
VARIANTS: list[tuple[str, list[str]]] = [
    ("fp32", ["transport.codec=fp32"]),
    ("int8", ["transport.codec=int8"]),
    ("int4+EF", ["transport.codec=int4", EF]),
    ("sign1+EF", ["transport.codec=sign1", EF]),
    ("topk-int2@1.56%", ["transport.codec=topk-int2", EF, "transport.density=0.0156"]),
    ("topk-int2@3.12%", ["transport.codec=topk-int2", EF, "transport.density=0.0312"]),
    ("topk-int4@1.56%", ["transport.codec=topk-int4", EF, "transport.density=0.0156"]),
    ("topk-int4@3.12%", ["transport.codec=topk-int4", EF, "transport.density=0.0312"]),
]


def _front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both bytes and loss (lower is better;
    bytes within 1% count as equal: headers differ by a few bytes)."""
    return [
        i
        for i, (b, loss) in enumerate(points)
        if not any((b2 <= 1.01 * b and l2 <= loss) and (b2, l2) != (b, loss) for b2, l2 in points)
    ]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    points = [(r["bytes_total"], r["eval_loss"]) for r in rows]
    front = set(_front(points))
    for opt, marker in (("adamw", "o"), ("muon", "s")):
        mine = [(i, r) for i, r in enumerate(rows) if r["optimizer"] == opt]
        ax.scatter(
            [r["bytes_total"] for _, r in mine],
            [r["eval_loss"] for _, r in mine],
            marker=marker,
            label=opt,
        )
        for i, r in mine:
            ax.annotate(r["name"], (r["bytes_total"], r["eval_loss"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points",
                        weight="bold" if i in front else "normal")  # fmt: skip
    ordered = sorted(front, key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("total bytes exchanged (up + down)")
    ax.set_ylabel("final eval loss")
    ax.set_title("codecs at equal tokens (dashed: Pareto front)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--optimizers", nargs="*", default=["adamw", "muon"])
    ap.add_argument("--out", type=Path, default=Path("codec_pareto.png"), help="the plot")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedtrain-pareto-"))
    rows: list[dict[str, Any]] = []
    step_time = None
    for opt in args.optimizers:
        for label, sets in VARIANTS:
            if args.only and label not in args.only:
                continue
            extra = [*args.overrides, *sets, f"train.optimizer={opt}"]
            cfg = load_config(args.config, [*extra, "storage.checkpoint_every=1000000"])
            name = f"{label} {opt}"
            s = simulate(cfg, work / name.replace(" ", "_").replace("%", "pct"), quiet=True,
                         step_time_s=step_time)  # fmt: skip
            step_time = s["measured_step_time_s"]  # the same clock for every run
            rows.append(
                {
                    "name": name,
                    "codec": cfg.transport.codec,
                    "optimizer": opt,
                    "eval_loss": s["final_eval_loss"],
                    "bytes_up": s["bytes_up"],
                    "bytes_down": s["bytes_down"],
                    "bytes_total": s["bytes_up"] + s["bytes_down"],
                    "tokens": s["tokens"],
                }
            )
            print(f"  {name}: eval {s['final_eval_loss']:.4f}, up {s['bytes_up']:,} B", flush=True)
    base = next((r for r in rows if r["name"] == "fp32 adamw"), rows[0])
    for r in rows:
        r["bytes_up_vs_fp32"] = round(base["bytes_up"] / r["bytes_up"], 2)
        r["bytes_down_vs_fp32"] = round(base["bytes_down"] / max(r["bytes_down"], 1), 2)
        r["loss_delta_pct"] = round(100 * (r["eval_loss"] / base["eval_loss"] - 1), 2)
    plot(rows, args.out)
    print(f"\n{'run':24} {'eval loss':>9} {'vs fp32':>8} {'up x':>8} {'down x':>8}")
    for r in rows:
        print(
            f"{r['name']:24} {r['eval_loss']:9.4f} {r['loss_delta_pct']:+7.2f}% "
            f"{r['bytes_up_vs_fp32']:8.1f} {r['bytes_down_vs_fp32']:8.1f}"
        )
    print(f"(baseline {base['name']}; {base['tokens']:,} tokens per run; plot {args.out})")
    if args.json:
        keys = ("name", "codec", "optimizer", "eval_loss", "bytes_up_vs_fp32",
                "bytes_down_vs_fp32", "loss_delta_pct")  # fmt: skip
        print(json.dumps({"runs": [{k: r[k] for k in keys} for r in rows]}))


if __name__ == "__main__":
    main()
