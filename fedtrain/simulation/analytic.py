"""Analytic mode: the virtual clock without training, for scales that cannot train here.

A run is driven by a model size (parameters, layers), a token budget and per-silo hardware and
link profiles. It answers "how long, how busy, how many bytes" — there is no learning curve.

The communication model (written down in full because Table 4 of Streaming DiLoCo depends on it):

- One inner step is ``step_time_s`` of pure compute: forward, then a backward pass that takes
  ``backward_fraction`` (2/3) of the step and finishes layer after layer.
- A synchronisation moves the exchanged values layer by layer. Data parallel's gradients exist
  during the backward pass: a layer's chunk may start once the backward pass has finished *one*
  layer and the link is free (chunks queue on the link), so the sync overlaps the remaining
  backward pass of the step it follows. A pseudo-gradient (DiLoCo's whole model, a Streaming
  DiLoCo fragment) exists only after the optimizer step that ends the inner steps: its sync is
  exposed in full, less the τ further inner steps Streaming DiLoCo's overlap lets it hide
  behind.
- Data parallel syncs every step; DiLoCo every H steps (the whole model); Streaming DiLoCo one
  fragment every H/P steps, and with overlap τ a fragment's exchange may also hide behind the
  next τ inner steps (the silo waits only for what exceeds them).
- Topology (``simulation.topology``): "star" (fedtrain's coordinator) sends S bits up and S
  down over each silo's link, with one latency each way; the coordinator's own link
  (``simulation.coordinator_mbps``) carries every taking-part silo's S, so a sync takes at
  least M·S / coordinator bandwidth each way. "ring" is an all-reduce among the M silos:
  2(M-1) hops of S/M each (2(M-1)/M x S per silo), every hop at the slowest silo's bandwidth
  and charged the largest one-way latency.
  ``latency_ms`` is silo-to-coordinator on a star (paid up and down) and one silo-to-silo hop
  on a ring.
- :class:`SyncModel` (the Streaming DiLoCo Table 4 bench) keeps the paper's simulator's
  assumptions instead (there a 2-worker ring without latency, every sync overlapping the
  backward pass).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtrain.config import Config, ConfigError
from fedtrain.simulation.clock import SiloTiming, StragglerModel, profile_step_time
from fedtrain.simulation.syncmodel import (
    BANDWIDTH_GRID_GBPS,
    METHODS,
    SyncModel,
    exposed_comm_s,
    required_bandwidth,
    utilisation,
)

__all__ = [
    "BANDWIDTH_GRID_GBPS",
    "SyncModel",
    "analytic_run",
    "codec_bits_per_value",
    "exposed_comm_s",
    "model_size",
    "required_bandwidth",
    "utilisation",
]


def codec_bits_per_value(codec: str, block_size: int = 64, keep: int = 0) -> float:
    """Bits on the wire per exchanged value for a transport codec (block scales included; a
    sparse codec: its chunk bytes — scale, indices, values — over the chunk)."""
    if codec.startswith("topk-"):
        from fedtrain.transport.codecs import get_codec

        return float(get_codec(codec, block_size=block_size, keep=keep).bits_per_value)
    scale = 16.0 / block_size  # one bf16 scale per block
    bits = {"fp32": 32.0, "bf16": 16.0, "int8": 8 + scale, "int4": 4 + scale}
    bits.update({"fp4-e2m1": 4 + scale, "sign1": 1 + scale})
    if codec not in bits:
        raise ValueError(f"no bit width known for codec {codec!r}")
    return bits[codec]


def model_size(cfg: Config) -> tuple[float, int]:
    """(parameters, layers) of the run's model: ``simulation.analytic_params`` /
    ``analytic_layers`` when set, else the preset's shape with the configured vocabulary."""
    from fedtrain.models.presets import PRESETS

    shape = PRESETS[cfg.model.preset]
    layers = cfg.simulation.analytic_layers or shape.n_layers
    if cfg.simulation.analytic_params:
        return float(cfg.simulation.analytic_params), layers
    vocab = 256 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
    d = shape.dim
    block = 4 * d * d + 3 * d * shape.ffn_dim + 2 * d
    emb = vocab * d * (1 if cfg.model.tie_embeddings else 2)
    return float(emb + shape.n_layers * block + d), layers


def _method(cfg: Config) -> str:
    from fedtrain.strategies.registry import setting, spec_for

    spec = spec_for(cfg)
    method = spec.analytic
    if method is None or method not in METHODS:
        raise ConfigError(
            f"{setting(spec, cfg)}: analytic mode models synchronous rounds without gradient "
            f"coding of {', '.join(METHODS)}, not strategy {spec.name!r}"
        )
    return method


@dataclass(kw_only=True, slots=True)
class _Plan:
    """What every round of an analytic run shares: the silos, their timings, the sync's shape."""

    silos: list[str]
    timings: dict[str, SiloTiming]
    stragglers: StragglerModel
    layers: int
    """Layers of the model (a sync moves one chunk per layer)."""
    fragments: int
    """Fragments the model is synchronised in (1 unless streaming)."""
    payload_bytes: int
    """Bytes of one fragment's payload."""
    tau: int
    """Inner steps a fragment's exchange may hide behind (streaming overlap)."""
    overlap: bool
    """Whether a sync may start during the last step's backward pass (data parallel's
    gradients; not a pseudo-gradient, which exists only after the last optimizer step)."""
    topology: str
    """``simulation.topology``: 'star' (through the coordinator) or 'ring' (all-reduce)."""
    coordinator_mbps: float
    """The coordinator's own link (star), 0 = unlimited."""


def _plan(cfg: Config, method: str, params: float, layers: int) -> _Plan:
    """Each silo's step time and the payload per sync; refuses a silo without a step time and
    fragments that do not divide the layers."""
    silos = cfg.silo_names()
    timings = {}
    for name, p in zip(silos, cfg.silo_profiles(), strict=True):
        step = profile_step_time(p, params, cfg.train.tokens_per_step)
        if not step:
            raise ConfigError(
                f"simulation.profiles[{p.name}]: analytic mode needs step_time_s > 0 or a gpu "
                "hardware profile (there is no training to measure)"
            )
        timings[name] = SiloTiming(p, step, cfg.simulation.step_time_jitter, cfg.run.seed, name)
    stragglers = StragglerModel(cfg, silos)
    fragments = cfg.strategy.fragments if method == "streaming" else 1
    if method == "streaming" and layers % fragments:
        raise ConfigError(
            f"strategy.fragments: {fragments} fragments must divide the model's {layers} layers"
        )
    bits = codec_bits_per_value(cfg.transport.codec, **cfg.transport.codec_args())
    return _Plan(
        silos=silos,
        timings=timings,
        stragglers=stragglers,
        layers=layers,
        fragments=fragments,
        payload_bytes=math.ceil(params * bits / 8 / fragments),
        tau=cfg.strategy.delay_steps if method == "streaming" else 0,
        overlap=method == "ddp",
        topology=cfg.simulation.topology,
        coordinator_mbps=cfg.simulation.coordinator_mbps,
    )


def _link_chunk_s(
    plan: _Plan, taking: list[str], chunk_bits: float
) -> dict[str, tuple[float, float, float]]:
    """Per taking-part silo: (seconds one layer chunk occupies its sync, latency paid once,
    bytes it sends per chunk) under ``simulation.topology``."""
    profiles = {n: plan.timings[n].profile for n in taking}
    if plan.topology == "ring" and taking:
        # Reduce-scatter then all-gather: 2(M-1) hops of 1/M of the chunk, each hop as slow
        # as the slowest link in the ring (the collective is synchronous).
        m = len(taking)
        factor = 2 * (m - 1) / m
        slowest = min(min(p.up_mbps, p.down_mbps) for p in profiles.values()) * 1e6
        latency = 2 * (m - 1) * max(p.latency_ms for p in profiles.values()) / 1000
        sync = (factor * chunk_bits / slowest, latency, factor * chunk_bits / 8)
        return dict.fromkeys(taking, sync)
    shared = plan.coordinator_mbps * 1e6 or math.inf
    fan = len(taking) * chunk_bits / shared  # the coordinator's link carries every silo's chunk
    return {
        n: (
            max(chunk_bits / (p.up_mbps * 1e6), fan) + max(chunk_bits / (p.down_mbps * 1e6), fan),
            2 * p.latency_ms / 1000,
            chunk_bits / 8,
        )
        for n, p in profiles.items()
    }


def _round(plan: _Plan, rnd: int, steps: int) -> tuple[dict[str, float], dict[str, float], int]:
    """One round of ``steps`` inner steps: each taking part silo's finish time (compute plus
    exposed sync), each silo's busy time (0 when dropped) and the bytes each direction moved.

    A pseudo-gradient sync (DiLoCo, a streaming fragment) is exposed in full less streaming's
    τ further steps (it exists only after the last inner step); data parallel's gradients
    overlap the backward pass layer by layer. Star: each silo is charged its own up and down
    time (no barrier at the coordinator: with unequal links a silo's download really waits
    for the slowest upload, so rounds of mixed links are optimistic)."""
    busy = dict.fromkeys(plan.silos, 0.0)
    taking = [n for n in plan.silos if not plan.stragglers.dropped(n, rnd)]
    n_chunks = plan.layers // plan.fragments  # the whole model unless streaming
    chunk_bits = plan.payload_bytes * 8 * plan.fragments / plan.layers
    links = _link_chunk_s(plan, taking, chunk_bits)
    finish: dict[str, float] = {}
    moved = 0
    for name in taking:
        t = plan.timings[name].compute_time(1, rnd) * plan.stragglers.slowdown(name, rnd)
        chunk, latency, sent = links[name]
        if plan.overlap:
            wait = exposed_comm_s(
                [chunk] * n_chunks, plan.layers, t, hide_s=plan.tau * t, latency_s=latency
            )
        else:
            wait = max(0.0, n_chunks * chunk + latency - plan.tau * t)
        busy[name] = steps * t
        finish[name] = steps * t + wait
        moved += round(n_chunks * sent)
    return finish, busy, moved


@dataclass(kw_only=True, slots=True)
class _Totals:
    """Running totals of an analytic run; :meth:`add` turns one round into its metrics row."""

    silos: list[str]
    tokens_per_step: int
    now: float = 0.0
    step: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    compute: dict[str, float] = field(default_factory=dict)
    """Compute seconds per silo, in silo order."""

    def add(
        self, rnd: int, steps: int, finish: dict[str, float], busy: dict[str, float], moved: int
    ) -> dict[str, Any]:
        """Fold in one round (see :func:`_round`); return its ``metrics.jsonl`` row."""
        silos = self.silos
        span = max(finish.values()) if finish else 0.0
        self.now += span
        self.bytes_up += moved
        self.bytes_down += moved
        for name in silos:
            self.compute[name] = self.compute.get(name, 0.0) + busy[name]
        util = [busy[n] / span if span else 0.0 for n in silos]
        self.step += steps
        self.tokens += steps * self.tokens_per_step * len(finish)
        return {
            "round": rnd,
            "step": self.step,
            "tokens": self.tokens,
            "sim_time_s": round(self.now, 6),
            "round_time_s": round(span, 6),
            "utilisation": sum(util) / len(util),
            "utilisation_min": min(util),
            "idle_s": round(sum(span - busy[n] for n in silos) / len(silos), 6),
            "silos": len(finish),
            "bytes_up": moved,
            "bytes_down": moved,
        }


def analytic_run(cfg: Config, run_dir: Path, *, quiet: bool = True) -> dict[str, Any]:
    """Time a run of ``cfg`` on the virtual clock without training; write metrics.jsonl,
    summary.json and the utilisation plot into ``run_dir``; return the summary."""
    method = _method(cfg)
    params, layers = model_size(cfg)
    plan = _plan(cfg, method, params, layers)
    silos = plan.silos
    per_round = cfg.steps_per_round()
    total = cfg.total_inner_steps()
    rounds = math.ceil(total / per_round)
    from fedtrain.run import check_run_dir

    check_run_dir(run_dir, resume=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    totals = _Totals(
        silos=silos,
        tokens_per_step=cfg.train.tokens_per_step,
        compute=dict.fromkeys(silos, 0.0),
    )
    rows: list[dict[str, Any]] = []
    with (run_dir / "metrics.jsonl").open("w") as out:
        for rnd in range(1, rounds + 1):
            steps = min(per_round, total - totals.step)
            row = totals.add(rnd, steps, *_round(plan, rnd, steps))
            out.write(json.dumps(row) + "\n")
            rows.append(row)
    _plot(rows, run_dir / "plots", f"{cfg.run.name} (analytic, {method})")
    now = totals.now
    summary = {
        "analytic": True,
        "strategy": method,
        "codec": cfg.transport.codec,
        "silos": len(silos),
        "parameters": params,
        "layers": layers,
        "step_time_s": {n: plan.timings[n].step_time_s for n in silos},
        "rounds": rounds,
        "inner_steps_per_silo": totals.step,
        "tokens": totals.tokens,
        "bytes_up": totals.bytes_up,
        "bytes_down": totals.bytes_down,
        "bytes_total": totals.bytes_up + totals.bytes_down,
        "sim_time_s": round(now, 6),
        "silo_compute_s": totals.compute,
        "compute_utilisation": (sum(totals.compute.values()) / len(silos) / now if now else None),
        "wall_s": round(time.perf_counter() - started, 3),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot(rows: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    if len(rows) > 20000:  # thin very long runs for the plot (the metrics keep every round)
        stride = len(rows) // 20000 + 1
        rows = rows[::stride]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    hours = [r["sim_time_s"] / 3600 for r in rows]
    ax.plot(hours, [100 * r["utilisation"] for r in rows], label="mean")
    ax.plot(hours, [100 * r["utilisation_min"] for r in rows], "--", label="slowest silo")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("compute utilisation (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "utilisation_vs_time.png", dpi=100)
    plt.close(fig)
