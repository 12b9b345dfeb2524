"""The strategy registry: what each outer algorithm reads, supports and how it is built.

Each strategy's own module declares its :class:`StrategySpec` at the bottom; config validation,
the launchers and the engines ask :func:`spec_for` instead of comparing strategy names. A new
strategy is one new file plus one line in :func:`strategy_specs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fedtrain.config import Config
    from fedtrain.strategies.base import Strategy

__all__ = [
    "ENGINES",
    "BuildContext",
    "StrategySpec",
    "require_engine",
    "setting",
    "spec_for",
    "strategy_names",
    "strategy_specs",
]

ENGINES = frozenset({"inprocess", "flower", "deploy"})
"""Where a run executes: the in-process simulation, ``simulate --engine flower``, and a
deployment (``fedtrain server`` with silo daemons)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildContext:
    """What a strategy may need besides the config and the parameters."""

    run_id: str = ""
    """The run's id (seeds derived per run, e.g. ZO's perturbations)."""
    clock: Callable[[], float | None] | None = None
    """Seconds now (the engine's virtual clock in simulation); None = the strategy's default."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategySpec:
    """One outer algorithm as the rest of the package sees it."""

    name: str
    """Registry key (equal to ``strategy.name`` for strategies chosen by name)."""
    summary: str
    """One line: what it is (and its paper)."""
    selected_by: str = "name"
    """The ``StrategySection`` field that selects it: 'name', 'coding' or 'scheduling'."""
    fields: tuple[str, ...] = ()
    """The ``StrategySection`` fields it reads."""
    engines: frozenset[str] = ENGINES
    """Where it runs: a subset of :data:`ENGINES`."""
    codecs: frozenset[str] | None = None
    """Codecs its updates may travel in (None = all)."""
    error_feedback: bool = True
    """Whether ``transport.error_feedback`` may be on."""
    trees: bool = False
    """Whether ``round.tree`` and ``round.accumulate = 'int64'`` may be used."""
    robust: bool = False
    """Whether ``strategy.aggregator`` may be a robust one (median, trimmed or clipped mean)."""
    private_data: bool = True
    """Whether silos may train on their own text (``data.silo_data``)."""
    async_replies: bool = False
    """Work in flight at a round's close arrives in a later round (semi-asynchronous)."""
    replicated_shards: bool = False
    """Silos train on each other's public shards (the engine hands every silo all of them)."""
    analytic: str | None = None
    """The method ``simulate --analytic`` times it as (None = not modelled)."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Why a support is missing, by flag name ('trees', 'robust', 'error_feedback', ...)."""
    steps_per_round: Callable[[Config], int]
    """Inner steps each silo runs between two commits."""
    check: Callable[[Config], None] | None = None
    """Its own cross-section rules (raise ``ConfigError`` naming the setting)."""
    build: Callable[[Config, dict[str, torch.nn.Parameter], BuildContext], Strategy]
    """The strategy over the global parameters."""

    def why(self, flag: str) -> str:
        """`` (reason)`` for a missing support, or an empty string."""
        reason = self.reasons.get(flag)
        return f" ({reason})" if reason else ""


def strategy_specs() -> dict[str, StrategySpec]:
    """Every registered strategy, by name (those chosen by ``strategy.name`` first)."""
    from fedtrain.strategies import coded, compass, ddp, diloco, streaming, zo

    specs = (*diloco.SPECS, ddp.SPEC, streaming.SPEC, zo.SPEC, coded.SPEC, compass.SPEC)
    return {s.name: s for s in specs}


def strategy_names() -> tuple[str, ...]:
    """The values ``strategy.name`` allows."""
    return tuple(n for n, s in strategy_specs().items() if s.selected_by == "name")


def spec_for(cfg: Config) -> StrategySpec:
    """The spec ``cfg`` selects: coded rounds when ``strategy.coding`` is set, compass when
    ``strategy.scheduling = 'compass'``, else the strategy named by ``strategy.name``."""
    specs = strategy_specs()
    st = cfg.strategy
    if st.coding != "off":
        return specs["coded"]
    if st.scheduling == "compass":
        return specs["compass"]
    return specs[st.name]


def setting(spec: StrategySpec, cfg: Config) -> str:
    """The setting that selected ``spec``, as a user wrote it, e.g. ``strategy.name = 'zo'``."""
    return f"strategy.{spec.selected_by} = {getattr(cfg.strategy, spec.selected_by)!r}"


def require_engine(cfg: Config, engine: str, where: str, instead: str, why: str = "") -> None:
    """Refuse, naming the setting, a strategy that does not run on ``engine``.

    ``where`` names the engine for the user (e.g. "deployment"), ``instead`` what to use,
    ``why`` an optional reason.
    """
    assert engine in ENGINES, engine
    spec = spec_for(cfg)
    if engine not in spec.engines:
        raise ValueError(
            f"{setting(spec, cfg)}: strategy {spec.name!r} is not available {where}"
            f"{f' ({why})' if why else ''}; {instead}"
        )
