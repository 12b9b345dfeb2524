"""Progress display for long runs (rich): rounds, inner steps, losses and bytes."""

from __future__ import annotations

from types import TracebackType
from typing import Any

__all__ = ["RunProgress"]


class RunProgress:
    """Two bars (rounds; inner steps of the current round over all silos) and a line per eval."""

    def __init__(self, *, quiet: bool, silos: int, rounds: int) -> None:
        self.quiet = quiet
        self.silos = silos
        self.rounds = rounds
        self._progress: Any = None
        if not quiet:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.console = Console(stderr=True)
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._rounds = self._progress.add_task("rounds", total=rounds)
            self._steps = self._progress.add_task("inner steps", total=1)

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def header(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def round_start(self, rnd: int, steps: int) -> None:
        if self._progress is not None:
            self._progress.reset(
                self._steps, total=steps * self.silos, description=f"round {rnd} inner steps"
            )

    def step(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._steps, n)

    def round_done(self, row: dict[str, Any]) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._rounds, 1)
        if row.get("eval_loss") is not None:
            self._progress.console.print(
                f"round {row['round']:>4}  tokens {row['tokens']:>10,}  "
                f"train {row['train_loss']:.3f}  eval {row['eval_loss']:.3f}  "
                f"up {row['bytes_up'] / 1e6:8.2f} MB  down {row['bytes_down'] / 1e6:8.2f} MB"
                + (f"  sim {row['sim_time_s']:.1f}s" if row.get("sim_time_s") is not None else "")
            )

    def footer(self, s: dict[str, Any]) -> None:
        if self.quiet:
            return
        self.console.print(
            f"done: eval loss {s['initial_eval_loss']:.3f} -> {s['final_eval_loss']:.3f} "
            f"(unigram {s['unigram_eval_loss']:.3f}); {s['tokens']:,} tokens; "
            f"{(s['bytes_up'] + s['bytes_down']) / 1e6:.1f} MB exchanged; "
            + (f"simulated {s['sim_time_s']:.1f}s; " if s.get("sim_time_s") is not None else "")
            + f"wall {s['wall_s']:.1f}s"
        )
        if s.get("rejected") or s.get("quarantined"):
            quarantined = ", ".join(f"{k} (round {v})" for k, v in s["quarantined"].items())
            self.console.print(
                f"[yellow]{s['rejected']} updates rejected (see events.jsonl); quarantined: "
                f"{quarantined or 'none'}[/yellow]"
            )
