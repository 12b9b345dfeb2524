"""Coordinator memory, round time and disk at model scale, with no training.

The real Coordinator, strategy (outer optimizer), validator, aggregation and run store, driven
by an engine whose silos answer every round at once with pre-encoded synthetic updates (random
pseudo-gradients of the model's shapes, encoded once with the codec, framed per silo and round
with a real header and checksum). One reply is built when the coordinator asks for the next, so
the engine holds one at a time, as a Flower pull does.

Reported: the coordinator process's peak resident memory (VmHWM, reset after set-up: model
construction and the synthetic bodies do not count) over the fp32 model bytes; the median round
time without the engine's own time (building replies); the run directory's growth per round
once retention has started deleting (it should be about 0).

    python bench/coordinator_scale.py --params 5e7 --silos 4 --codec int4
    python bench/coordinator_scale.py --params 1e9 --silos 8 --codec int4 --json  # ~24 GB box
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedtrain.config import load_config
from fedtrain.models.llama import build_model
from fedtrain.models.presets import ModelShape
from fedtrain.protocol.work import Work
from fedtrain.run import _open_store, _start
from fedtrain.runtime.children import peak_rss_bytes
from fedtrain.server.coordinator import Coordinator
from fedtrain.server.engine import Reply
from fedtrain.strategies import build_strategy
from fedtrain.transport.codecs import get_codec
from fedtrain.transport.framing import PayloadWriter


def model_shape(n_params: float) -> tuple[ModelShape, int]:
    """A Llama shape of about ``n_params`` parameters (tied embeddings) and its vocabulary:
    the widest one with at least 12 blocks (1e9: dim 2048, 19 blocks, as 1B Llamas are), else
    at least 4 (small models)."""
    vocab = 32_000 if n_params >= 2e8 else 4096
    for min_layers in (12, 4):
        for dim in (4096, 2048, 1024, 512, 256, 128):
            ffn = max(256, round(8 * dim / 3 / 256) * 256)
            per_layer = 4 * dim * dim + 3 * dim * ffn + 2 * dim
            layers = round((n_params - vocab * dim) / per_layer)
            if layers >= min_layers and dim >= 256:
                shape = ModelShape(dim=dim, n_layers=layers, n_heads=dim // 64, ffn_dim=ffn)
                return shape, vocab
    dim = 128
    return ModelShape(dim=dim, n_layers=1, n_heads=2, ffn_dim=256), vocab


class SyntheticEngine:
    """Silos that reply at once with one pre-encoded body per set of names (bench only)."""

    def __init__(
        self, silos: int, params: dict[str, torch.Tensor], cfg: Any, kind: str, work_dir: Path
    ) -> None:
        self.silos = [f"silo{i}" for i in range(silos)]
        self.public_keys: dict[str, Any] = {}
        self.compute_s: dict[str, float] = {}
        self.measured_step_time_s: float | None = None
        self.params = params
        self.cfg = cfg
        self.kind = kind
        self.dir = work_dir
        self.run_id = ""
        self.engine_s = 0.0
        """Seconds spent building replies (not the coordinator's)."""
        self._bodies: dict[tuple[str, ...], Path] = {}

    def _body(self, names: list[str]) -> Path:
        """The encoded body of a random update of ``names`` (one file, made once)."""
        key = tuple(sorted(names))
        if key not in self._bodies:
            t = self.cfg.transport
            codec = get_codec(t.codec, **t.codec_args())
            gen = torch.Generator().manual_seed(len(self._bodies))
            path = self.dir / f"body{len(self._bodies)}.bin"
            with path.open("wb") as f:
                for n in key:
                    x = torch.randn(self.params[n].numel(), generator=gen).mul_(1e-3)
                    f.write(codec.encode(x))
            self._bodies[key] = path
        return self._bodies[key]

    def prepare(self, works: list[Work]) -> None:
        for w in works:
            self._body(w.names or list(self.params))

    def _reply(self, silo: str, rnd: int, work: Work) -> bytearray:
        t = self.cfg.transport
        names = work.names or list(self.params)
        writer = PayloadWriter(
            {n: self.params[n] for n in names},
            codec=t.codec,
            kind=self.kind,
            run_id=self.run_id,
            round=rnd,
            sender=silo,
            meta={"tokens": 1000, "steps": work.steps, "train_loss": 5.0},
            block_size=t.codec_args()["block_size"],
            keep=t.keep,
            fragment=getattr(work, "fragment", None),
        )
        with self._body(names).open("rb") as f:
            for n in writer.names:
                writer.fill(n, f.read(writer.codec.encoded_size(self.params[n].numel())))
        return writer.finish()

    def join(self, weights_payload: bytes) -> int:
        return len(weights_payload) * len(self.silos)

    def run_round(
        self, round: int, work: dict[str, Work], downlink: bytes | None, deadline_s: float
    ) -> Iterator[Reply]:
        for i, (silo, w) in enumerate(work.items()):
            t0 = time.perf_counter()
            reply = Reply(silo=silo, payload=self._reply(silo, round, w), arrival_s=0.01 * (i + 1))
            self.engine_s += time.perf_counter() - t0
            yield reply
            del reply

    def finish(self, downlink: bytes | None) -> int:
        return len(downlink or b"") * len(self.silos)

    def save_state(self, store: Any, full: bool) -> dict[str, Any]:
        return {}

    def restore_state(self, store: Any, state: dict[str, Any]) -> None:
        return None

    def sim_time_s(self) -> float | None:
        return None

    def close_round(self, duration_s: float) -> None:
        return None

    def round_stats(self) -> dict[str, Any]:
        return {}

    def utilisation(self) -> float | None:
        return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    shape, vocab = model_shape(args.params)
    overrides = [
        f"strategy.name={args.strategy}",
        f"transport.codec={args.codec}",
        f"transport.error_feedback={'true' if args.error_feedback else 'false'}",
        f"data.silos={args.silos}",
        f"round.min_silos={args.silos}",
        f"run.rounds={args.rounds}",
        "run.token_budget=1000000000000",
        "run.eval_every_tokens=1000000000000",
        "train.inner_steps=24",
        "strategy.fragments=4" if args.strategy == "streaming" else "strategy.fragments=1",
        "storage.checkpoint_every=1000000",
        *args.set,
    ]
    cfg = load_config(None, overrides, purpose="deploy")  # no simulated hardware profiles
    torch.set_num_threads(args.threads)
    model = build_model(shape, vocab, seed=0, tie=True)
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = 4 * n_params
    run_dir = work_dir / "run"
    store = _open_store(cfg, run_dir)
    run_id = f"bench-{args.strategy}-{args.codec}"
    _start(store, cfg, run_id, "bench")
    params = dict(model.named_parameters())
    strategy = build_strategy(cfg, params, run_id=run_id, clock=lambda: None)
    engine = SyntheticEngine(args.silos, params, cfg, strategy.reply_kind, work_dir)
    engine.run_id = run_id
    plans = [strategy.plan(r, engine.silos, 24) for r in range(1, 1 + min(args.rounds, 4))]
    engine.prepare([w for plan in plans for w in plan.values()])
    round_s: list[float] = []
    disk: list[int] = []
    started: list[float] = []

    def on_start(rnd: int, steps: int) -> None:
        started.append(time.perf_counter() - engine.engine_s)

    def on_round(row: dict[str, Any]) -> None:
        round_s.append(time.perf_counter() - engine.engine_s - started[-1])
        disk.append(dir_bytes(run_dir))

    coord = Coordinator(
        cfg=cfg,
        run_id=run_id,
        model=model,
        strategy=strategy,
        engine=engine,  # type: ignore[arg-type]
        store=store,
        eval_batch=torch.randint(0, vocab, (1, 17), generator=torch.Generator().manual_seed(0)),
        on_round=on_round,
        on_round_start=on_start,
    )
    reset = reset_peak_rss()
    base_rss = peak_rss_bytes() or 0
    coord.run()
    peak = peak_rss_bytes() or 0
    window = cfg.storage.keep_updates + 1
    growth = [b - a for a, b in zip(disk, disk[1:], strict=False)][window - 1 :]
    return {
        "params": n_params,
        "silos": args.silos,
        "codec": args.codec,
        "strategy": args.strategy,
        "error_feedback": args.error_feedback,
        "peak_rss_over_model": round(peak / model_bytes, 3),
        "round_s": round(statistics.median(round_s), 3),
        "disk_bytes_per_round": int(statistics.median(growth)) if growth else None,
        "rss_at_start_over_model": round(base_rss / model_bytes, 3),
        "added_rss_over_model": round((peak - base_rss) / model_bytes, 3),
        "peak_reset": reset,
        "disk_bytes": disk,
        "shape": {"dim": shape.dim, "layers": shape.n_layers, "ffn": shape.ffn_dim, "vocab": vocab},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=5e7, help="model parameters (about)")
    ap.add_argument("--silos", type=int, default=4)
    ap.add_argument("--codec", default="int4")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--strategy", default="diloco", choices=["diloco", "streaming"])
    ap.add_argument(
        "--error-feedback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="coordinator and silo error feedback (default: on for codecs other than fp32)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    if args.error_feedback is None:
        args.error_feedback = args.codec != "fp32"
    work_dir = args.dir or Path(tempfile.mkdtemp(prefix="coordinator-scale-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        out = run(args, work_dir)
    finally:
        if args.dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
