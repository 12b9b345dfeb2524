"""Rules across sections, run when a :class:`~fedtrain.config.Config` is made; every broken
rule is reported at once.

What a strategy can be combined with (trees, robust aggregators, error feedback, private data)
is what its :class:`~fedtrain.strategies.registry.StrategySpec` declares; a refusal names the
strategy and the setting that selected it. The registry is imported inside the function: the
strategies import this package, not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedtrain.config.errors import ConfigError
from fedtrain.config.errors import check as _check

if TYPE_CHECKING:
    from fedtrain.config.root import Config
    from fedtrain.strategies.registry import StrategySpec

__all__ = ["check_config"]


def check_config(cfg: Config) -> None:
    """Raise one :class:`ConfigError` listing every rule across sections that ``cfg`` breaks
    (one line each, naming its key); a single broken rule keeps its own message."""
    from fedtrain.strategies.registry import spec_for

    errors: list[str] = []
    if cfg.simulation.profiles:
        total = sum(p.count for p in cfg.simulation.profiles)
        _collect(
            errors,
            _check,
            total == cfg.data.silos,
            "simulation.profiles",
            f"counts adding up to data.silos = {cfg.data.silos}",
            f"{total} silos",
        )
    _collect(
        errors,
        _check,
        cfg.round.min_silos <= cfg.data.silos,
        "round.min_silos",
        f"at most data.silos = {cfg.data.silos}",
        cfg.round.min_silos,
    )
    try:
        spec = spec_for(cfg)
    except ConfigError as e:
        errors.append(str(e))  # the strategy's own rules need its spec
    else:
        if spec.check is not None:
            _collect(errors, spec.check, cfg)
        _check_strategy(cfg, spec, errors)
        _collect(errors, _check_tree, cfg, spec)
        _check_robust(cfg, spec, errors)
    names = set(cfg.silo_names())
    for fault in cfg.faults.inject:
        silo = fault.partition("@")[2].partition(":")[0]
        _collect(
            errors, _check, silo in names, "faults.inject", f"silos among {sorted(names)}", fault
        )
    for silo in cfg.data.silo_data:
        _collect(
            errors,
            _check,
            silo in names,
            "data.silo_data",
            f"keys among silo names {sorted(names)}",
            silo,
        )
    if errors:
        raise ConfigError("\n".join(errors))


def _collect(errors: list[str], rule: Callable[..., None], *args: Any) -> None:
    """Run one independent ``rule``; a :class:`ConfigError` it raises joins ``errors``."""
    try:
        rule(*args)
    except ConfigError as e:
        errors.append(str(e))


def _check_strategy(cfg: Config, spec: StrategySpec, errors: list[str]) -> None:
    """Stragglers, private data and error feedback against what ``spec`` supports."""
    from fedtrain.strategies.registry import setting

    st, chosen = cfg.strategy, setting(spec, cfg)
    if st.stragglers and "stragglers" not in spec.fields:
        _collect(
            errors,
            _check,
            False,
            "strategy.stragglers",
            "0 unless strategy.coding is set",
            st.stragglers,
        )
    if cfg.data.silo_data and not spec.private_data:
        key = f"strategy.{spec.selected_by}"
        value = getattr(st, spec.selected_by)
        default = {"coding": "'off'", "scheduling": "'sync'"}.get(spec.selected_by, "another")
        _collect(
            errors,
            _check,
            False,
            key,
            f"{default} when silos train on private data (data.silo_data): strategy "
            f"{spec.name!r} does not support private data{spec.why('private_data')}",
            value,
        )
    _collect(
        errors,
        _check,
        spec.error_feedback or not cfg.transport.error_feedback,
        "transport.error_feedback",
        f"false with {chosen}: strategy {spec.name!r} does not support error feedback"
        f"{spec.why('error_feedback')}",
        cfg.transport.error_feedback,
    )
    if spec.codecs is not None:
        _collect(
            errors,
            _check,
            cfg.transport.codec in spec.codecs,
            "transport.codec",
            f"one of {sorted(spec.codecs)} with {chosen} (the codecs strategy {spec.name!r} "
            "supports)",
            cfg.transport.codec,
        )


def _check_tree(cfg: Config, spec: StrategySpec) -> None:
    from fedtrain.aggregation.shape import parse_tree
    from fedtrain.strategies.registry import setting

    r = cfg.round
    try:
        tree = parse_tree(r.tree, cfg.data.silos)
    except ValueError as e:
        raise ConfigError(f"round.tree: {r.tree!r} is not allowed; expected {e}") from None
    if tree is None and r.accumulate == "float":
        return
    key, value = ("round.tree", r.tree) if tree is not None else ("round.accumulate", "int64")
    off = "0 (flat)" if tree is not None else "'float'"
    _check(
        spec.trees,
        key,
        f"{off} with {setting(spec, cfg)}: strategy {spec.name!r} does not support aggregation "
        f"trees or int64 sums{spec.why('trees')}",
        value,
    )


def _check_robust(cfg: Config, spec: StrategySpec, errors: list[str]) -> None:
    from fedtrain.strategies.registry import setting

    st, r = cfg.strategy, cfg.round
    kinds = ("mean", "median", "trimmed_mean", "clipped_mean")
    _collect(
        errors,
        _check,
        st.aggregator in kinds,
        "strategy.aggregator",
        f"one of {list(kinds)}",
        st.aggregator,
    )
    _collect(
        errors,
        _check,
        0.0 <= st.trim_fraction < 0.5,
        "strategy.trim_fraction",
        "a number in [0, 0.5)",
        st.trim_fraction,
    )
    _collect(errors, _check, st.clip_norm > 0, "strategy.clip_norm", "a number > 0", st.clip_norm)
    if st.aggregator == "mean" or st.aggregator not in kinds:
        return
    why = (
        "holds every update of the round in memory"
        if st.aggregator != "clipped_mean"
        else "clips each update before the sum"
    )
    unsupported = f"strategy {spec.name!r} does not support robust aggregators{spec.why('robust')}"
    for ok, other in (  # the first combination it cannot join is the one reported
        (spec.robust, f"{setting(spec, cfg)} ({unsupported})"),
        (r.tree in (0, []), f"round.tree = {r.tree!r} (hierarchical partial sums)"),
        (r.accumulate == "float", f"round.accumulate = {r.accumulate!r} (int64 sums)"),
    ):
        if not ok:
            _collect(
                errors,
                _check,
                ok,
                "strategy.aggregator",
                f"'mean' with {other}: {st.aggregator} {why} and cannot combine with it",
                st.aggregator,
            )
            return
