"""Non-training workloads, registered by name and run next to the cache.

Each function takes a :class:`FunctionContext` (the cache, plus an optional evaluator that maps
global weights to an eval loss) and returns plain JSON-able data. Contribution scores use the
utility v(S) = −eval_loss(θ_{r−1} − mean_w(Δ_S)): the loss after applying the weighted mean of
the updates of silo set S to the weights the round started from (a FedAvg step; the outer
optimizer's momentum is left out so a silo's score reflects its own update).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedtrain.storage.cache import MetadataCache, flatten

__all__ = [
    "FUNCTIONS",
    "FunctionContext",
    "exact_shapley",
    "leave_one_out",
    "make_evaluator",
    "monte_carlo_shapley",
    "register",
    "run_function",
]

Utility = Callable[[frozenset[str]], float]


@dataclass(slots=True)
class FunctionContext:
    cache: MetadataCache
    """Where the data is."""
    evaluate: Callable[[dict[str, torch.Tensor]], float] | None = None
    """Global weights -> eval loss (needed by contribution workloads)."""


FUNCTIONS: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a workload under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        FUNCTIONS[name] = fn
        return fn

    return deco


def run_function(name: str, ctx: FunctionContext, **kwargs: Any) -> Any:
    try:
        fn = FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; available: {sorted(FUNCTIONS)}") from None
    return fn(ctx, **kwargs)


# ------------------------------------------------------------ cooperative game maths
def _memo(utility: Utility) -> Utility:
    seen: dict[frozenset[str], float] = {}

    def v(s: frozenset[str]) -> float:
        if s not in seen:
            seen[s] = utility(s)
        return seen[s]

    return v


def exact_shapley(players: Iterable[str], utility: Utility) -> dict[str, float]:
    """φ_i = Σ_{S ⊆ N∖i} |S|!(n−|S|−1)!/n! · (v(S∪i) − v(S)); 2^n utility calls."""
    ps = sorted(players)
    n = len(ps)
    v = _memo(utility)
    phi = dict.fromkeys(ps, 0.0)
    for i in ps:
        others = [p for p in ps if p != i]
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for sub in itertools.combinations(others, k):
                s = frozenset(sub)
                phi[i] += w * (v(s | {i}) - v(s))
    return phi


def monte_carlo_shapley(
    players: Iterable[str], utility: Utility, permutations: int, seed: int = 0
) -> dict[str, float]:
    """Average marginal contribution over random orderings (Castro et al. 2009)."""
    ps = sorted(players)
    v = _memo(utility)
    rng = random.Random(seed)
    phi = dict.fromkeys(ps, 0.0)
    for _ in range(permutations):
        order = ps[:]
        rng.shuffle(order)
        prefix: frozenset[str] = frozenset()
        before = v(prefix)
        for p in order:
            prefix = prefix | {p}
            after = v(prefix)
            phi[p] += after - before
            before = after
    return {p: x / permutations for p, x in phi.items()}


def leave_one_out(players: Iterable[str], utility: Utility) -> dict[str, float]:
    """v(N) − v(N∖i)."""
    ps = frozenset(players)
    v = _memo(utility)
    full = v(ps)
    return {p: full - v(ps - {p}) for p in sorted(ps)}


# ------------------------------------------------------------------- workloads
@register("similarity")
def similarity(ctx: FunctionContext, round: int) -> dict[str, float]:
    """Cosine similarity of each silo's update to the round's aggregate."""
    agg = flatten(ctx.cache.aggregate(round))
    return {
        s: torch.nn.functional.cosine_similarity(
            flatten(ctx.cache.update(round, s)), agg, dim=0
        ).item()
        for s in ctx.cache.valid_silos(round)
    }


def _robust_z(values: dict[str, float]) -> dict[str, float]:
    xs = sorted(values.values())
    med = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    mad = sorted(abs(x - med) for x in xs)[len(xs) // 2] or 1e-12
    return {k: 0.6745 * (x - med) / mad for k, x in values.items()}


@register("anomalies")
def anomalies(ctx: FunctionContext, round: int, threshold: float = 3.5) -> dict[str, Any]:
    """Flag silos whose update is unlike the others: robust z-scores of cosine-to-aggregate
    and update norm, plus a 2-way split of the pairwise cosine graph (a cluster of outliers)."""
    silos = ctx.cache.valid_silos(round)
    flats = {s: flatten(ctx.cache.update(round, s)) for s in silos}
    agg = flatten(ctx.cache.aggregate(round))
    cos = {s: torch.nn.functional.cosine_similarity(f, agg, dim=0).item() for s, f in flats.items()}
    norm = {s: math.log(f.norm().item() + 1e-30) for s, f in flats.items()}
    z_cos, z_norm = _robust_z(cos), _robust_z(norm)
    # Pairwise cosine matrix; the silo least similar on average seeds the second cluster.
    mat = torch.stack([flats[s] / (flats[s].norm() + 1e-30) for s in silos])
    sim = (mat @ mat.T).tolist()
    mean_sim = {s: sum(row) / len(row) for s, row in zip(silos, sim, strict=True)}
    seed_out = min(mean_sim, key=lambda s: mean_sim[s])
    seed_in = max(mean_sim, key=lambda s: mean_sim[s])
    cluster = {
        s: int(
            sim[silos.index(s)][silos.index(seed_out)] > sim[silos.index(s)][silos.index(seed_in)]
        )
        for s in silos
    }
    flagged = sorted(s for s in silos if abs(z_cos[s]) > threshold or abs(z_norm[s]) > threshold)
    return {
        "silos": {
            s: {
                "cosine_to_aggregate": cos[s],
                "log_norm": norm[s],
                "z_cosine": z_cos[s],
                "z_norm": z_norm[s],
                "cluster": cluster[s],
            }
            for s in silos
        },
        "flagged": flagged,
    }


def _utility(ctx: FunctionContext, round: int) -> tuple[list[str], Utility]:
    if ctx.evaluate is None:
        raise ValueError("contribution needs an evaluator (the run's model and eval split)")
    evaluate = ctx.evaluate
    start = ctx.cache.global_weights(round - 1)
    weights = ctx.cache.weights_of(round)
    silos = sorted(weights)

    def v(s: frozenset[str]) -> float:
        total = sum(weights[x] for x in s)
        if not s or total <= 0:
            return -evaluate(start)
        upd = {
            n: sum(weights[x] * ctx.cache.update(round, x)[n] for x in sorted(s)) / total
            for n in start
        }
        return -evaluate({n: start[n] - upd[n] for n in start})

    return silos, v


@register("contribution")
def contribution(
    ctx: FunctionContext, round: int, method: str = "loo", permutations: int = 32, seed: int = 0
) -> dict[str, float]:
    """Per-silo contribution to the eval loss in ``round``: 'loo', 'shapley' (exact, ≤ 10
    silos) or 'mc-shapley' (Monte Carlo over ``permutations`` orderings)."""
    silos, v = _utility(ctx, round)
    if method == "loo":
        return leave_one_out(silos, v)
    if method == "shapley":
        if len(silos) > 10:
            raise ValueError(
                f"exact Shapley over {len(silos)} silos is too costly; use method='mc-shapley'"
            )
        return exact_shapley(silos, v)
    if method == "mc-shapley":
        return monte_carlo_shapley(silos, v, permutations, seed)
    raise ValueError(f"method must be 'loo', 'shapley' or 'mc-shapley', got {method!r}")


@register("debug_round")
def debug_round(ctx: FunctionContext, round: int) -> dict[str, Any]:
    """Per-silo update norm, cosine to the aggregate, weight, bytes, validity and reason;
    with an evaluator, also which silo moved the loss (leave-one-out)."""
    cos = similarity(ctx, round)
    rows = {}
    for u in ctx.cache.store.index.updates(round):
        s = u["silo"]
        entry: dict[str, Any] = {
            "valid": bool(u["valid"]),
            "reason": u["reason"],
            "bytes": u["bytes"],
            "codec": u["codec"],
            "weight": u["weight"],
        }
        if u["valid"]:
            entry["norm"] = flatten(ctx.cache.update(round, s)).norm().item()
            entry["cosine_to_aggregate"] = cos[s]
        rows[s] = entry
    out: dict[str, Any] = {"round": round, "silos": rows}
    if ctx.evaluate is not None:
        out["loss_moved_by"] = contribution(ctx, round, method="loo")
    return out


@register("latest_model")
def latest_model(ctx: FunctionContext) -> dict[str, torch.Tensor]:
    """Global weights of the newest committed round (pinned in the cache)."""
    rounds = ctx.cache.store.index.committed_rounds()
    if not rounds:
        raise ValueError("no committed round yet")
    return ctx.cache.global_weights(rounds[-1])


def make_evaluator(run_dir: Any) -> Callable[[dict[str, torch.Tensor]], float]:
    """Eval loss of given global weights on the run's held-out split (its config + tokenizer)."""
    from pathlib import Path

    from fedtrain.config import load_config
    from fedtrain.data.prepare import prepare_data
    from fedtrain.models.evaluate import evaluate_loss
    from fedtrain.models.llama import build_model
    from fedtrain.models.presets import PRESETS

    root = Path(run_dir)
    cfg = load_config(root / "config.toml")
    data = prepare_data(cfg, root)
    model = build_model(
        PRESETS[cfg.model.preset],
        data.tokenizer.vocab_size,
        cfg.run.seed,
        tie=cfg.model.tie_embeddings,
    )
    params = dict(model.named_parameters())

    @torch.no_grad()
    def evaluate(weights: dict[str, torch.Tensor]) -> float:
        for n, p in params.items():
            p.copy_(weights[n])
        return evaluate_loss(model, data.eval_batch, cfg.train.batch_size, bf16=cfg.train.bf16)

    return evaluate
