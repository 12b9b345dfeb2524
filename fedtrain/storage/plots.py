"""PNG plots of a run's metrics (loss vs round and tokens, bytes and utilisation vs round)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_metrics"]


def plot_metrics(rows: list[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """Draw the standard plots from metrics rows into ``out_dir``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in rows]
    ev = [(r["round"], r["tokens"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    written = []

    def _save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    for xkey, name, xlabel in (
        ("round", "loss_vs_round.png", "round"),
        ("tokens", "loss_vs_tokens.png", "training tokens"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r[xkey] for r in rows], [r["train_loss"] for r in rows], label="train")
        if ev:
            ax.plot(
                [e[0] if xkey == "round" else e[1] for e in ev],
                [e[2] for e in ev],
                marker="o",
                label="eval",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
        _save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r["bytes_up"] / 1e6 for r in rows], label="up")
    ax.plot(rounds, [r["bytes_down"] / 1e6 for r in rows], label="down")
    ax.set_xlabel("round")
    ax.set_ylabel("MB per round (all silos)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, "bytes_vs_round.png")

    timed = [r for r in rows if r.get("utilisation") is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["round"] for r in timed], [100 * r["utilisation"] for r in timed], label="mean")
        if all("utilisation_min" in r for r in timed):
            ax.plot(
                [r["round"] for r in timed],
                [100 * r["utilisation_min"] for r in timed],
                label="slowest silo",
                linestyle="--",
            )
        ax.set_xlabel("round")
        ax.set_ylabel("compute utilisation (%)")
        ax.set_ylim(0, 105)
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
        _save(fig, "utilisation_vs_round.png")
    return written
