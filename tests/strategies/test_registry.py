"""The strategy registry: what each spec declares is what config loading and launchers enforce."""

from __future__ import annotations

import pytest

from fedtrain.config import Config, ConfigError, config_from_dict
from fedtrain.models import build_model
from fedtrain.models.presets import PRESETS, ModelShape
from fedtrain.server.launcher import check_deployable
from fedtrain.simulation.flower import check_flower_config
from fedtrain.strategies import build_strategy, spec_for, strategy_specs
from fedtrain.strategies.registry import ENGINES, StrategySpec, setting, strategy_names
from tests.conftest import tiny_config_dict

# The [strategy] table that selects each registered spec (4 silos, H = 10).
SELECT: dict[str, dict] = {
    "diloco": {},
    "fedavg": {"name": "fedavg"},
    "ddp": {"name": "ddp"},
    "streaming": {"name": "streaming", "fragments": 2},
    "zo": {"name": "zo"},
    "coded": {"coding": "auto", "stragglers": 1},
    "compass": {"scheduling": "compass"},
}
STEPS = {"diloco": 10, "fedavg": 10, "ddp": 1, "streaming": 5, "zo": 8, "coded": 10, "compass": 10}
SPECS = strategy_specs()


def _cfg(name: str, **sections: dict) -> Config:
    sections = {k: dict(v) for k, v in sections.items()}
    sections.setdefault("data", {}).setdefault("silos", 4)
    sections["strategy"] = {**SELECT[name], **sections.get("strategy", {})}
    return config_from_dict(tiny_config_dict(**sections))


def _refused(name: str, match: str, **sections: dict) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        _cfg(name, **sections)
    return str(e.value)


def test_every_registered_spec_is_covered_and_names_follow_strategy_name():
    assert set(SPECS) == set(SELECT)
    assert strategy_names() == ("diloco", "fedavg", "ddp", "streaming", "zo")
    for spec in SPECS.values():
        assert isinstance(spec, StrategySpec) and spec.summary
        assert spec.engines <= ENGINES and "inprocess" in spec.engines


@pytest.mark.parametrize("name", list(SELECT))
def test_spec_for_picks_coded_then_compass_then_by_name(name):
    cfg = _cfg(name)
    assert spec_for(cfg).name == name
    if name == "coded":
        assert setting(spec_for(cfg), cfg) == "strategy.coding = 'auto'"
    elif name == "compass":
        assert setting(spec_for(cfg), cfg) == "strategy.scheduling = 'compass'"
    else:
        assert setting(spec_for(cfg), cfg) == f"strategy.name = {cfg.strategy.name!r}"


@pytest.mark.parametrize("name", list(SELECT))
@pytest.mark.parametrize(
    ("key", "rnd"), [("round.tree", {"tree": 2}), ("round.accumulate", {"accumulate": "int64"})]
)
def test_trees_and_int64_sums_are_allowed_exactly_where_declared(name, key, rnd):
    spec = SPECS[name]
    if spec.trees:
        assert _cfg(name, round=rnd).round.accumulate in ("float", "int64")
        return
    message = _refused(name, key, round=rnd)
    assert f"strategy {name!r} does not support aggregation trees" in message
    assert setting(spec, _cfg(name)) in message


@pytest.mark.parametrize("name", list(SELECT))
def test_robust_aggregators_are_allowed_exactly_where_declared(name):
    spec = SPECS[name]
    strategy = {"aggregator": "median"}
    if spec.robust:
        assert _cfg(name, strategy=strategy).strategy.aggregator == "median"
        return
    message = _refused(name, "strategy.aggregator", strategy=strategy)
    assert f"strategy {name!r} does not support robust aggregators" in message
    assert setting(spec, _cfg(name)) in message


@pytest.mark.parametrize("name", list(SELECT))
def test_error_feedback_is_allowed_exactly_where_declared(name):
    transport = {"error_feedback": True}
    if SPECS[name].error_feedback:
        assert _cfg(name, transport=transport).transport.error_feedback
        return
    message = _refused(name, "transport.error_feedback", transport=transport)
    assert f"strategy {name!r} does not support error feedback" in message


@pytest.mark.parametrize("name", list(SELECT))
def test_private_data_is_allowed_exactly_where_declared(name):
    data = {"silo_data": {"silo0": "own.txt"}}
    if SPECS[name].private_data:
        assert _cfg(name, data=data).data.silo_data == {"silo0": "own.txt"}
        return
    message = _refused(name, f"strategy.{SPECS[name].selected_by}", data=data)
    assert "private data (data.silo_data)" in message and repr(name) in message


@pytest.mark.parametrize("name", list(SELECT))
def test_the_flower_engine_and_fedtrain_server_run_exactly_the_declared_engines(name):
    spec, cfg = SPECS[name], _cfg(name)
    for engine, check in (("flower", check_flower_config), ("deploy", check_deployable)):
        if engine in spec.engines:
            check(cfg)
            continue
        with pytest.raises(ValueError) as e:
            check(cfg)
        assert setting(spec, cfg) in str(e.value) and f"strategy {name!r}" in str(e.value)


@pytest.mark.parametrize("name", ["zo", "ddp"])
def test_fedtrain_server_refuses_zo_and_ddp_at_start_naming_strategy_name(name):
    with pytest.raises(ValueError, match=rf"strategy\.name = '{name}'.*not available in deploy"):
        check_deployable(_cfg(name))


@pytest.mark.parametrize("name", list(SELECT))
def test_build_strategy_builds_each_spec_and_steps_per_round_asks_it(name):
    cfg = _cfg(name)
    model = build_model(PRESETS["tiny"], 256, 0)
    strategy = build_strategy(cfg, dict(model.named_parameters()), run_id="r", clock=lambda: 5.0)
    assert cfg.steps_per_round() == SPECS[name].steps_per_round(cfg) == STEPS[name]
    expected = {"coded": "diloco-coded", "compass": "diloco-compass", "fedavg": "diloco"}
    assert strategy.name == expected.get(name, name)
    if name == "compass":
        assert strategy.clock() == 5.0  # type: ignore[attr-defined]
    if name == "zo":
        assert strategy.run_id == "r"  # type: ignore[attr-defined]


def test_streaming_counts_layers_from_the_model_it_is_given():
    # Six blocks: no preset has this shape, and the configured preset ('tiny') has four, so a
    # layer count taken from the preset table would refuse six fragments.
    shape = ModelShape(dim=32, n_layers=6, n_heads=2, ffn_dim=64)
    assert shape not in PRESETS.values()
    cfg = _cfg("streaming", train={"inner_steps": 12}, strategy={"fragments": 6})
    model = build_model(shape, 256, 0)
    strategy = build_strategy(cfg, dict(model.named_parameters()))
    fragments = strategy.fragments  # type: ignore[attr-defined]
    assert len(fragments) == 6
    for p, names in enumerate(fragments):
        assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {str(p)}


def test_a_spec_that_restricts_codecs_refuses_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """No shipped strategy restricts codecs today; a spec that does is held to it by config
    loading, naming the key, the strategy and the allowed codecs."""
    import dataclasses

    from fedtrain.strategies import registry

    narrowed = {**SPECS, "diloco": dataclasses.replace(SPECS["diloco"], codecs=frozenset({"fp32"}))}
    monkeypatch.setattr(registry, "strategy_specs", lambda: narrowed)
    assert _cfg("diloco", transport={"codec": "fp32"}).transport.codec == "fp32"
    msg = _refused("diloco", r"transport.codec: 'int8' is not allowed", transport={"codec": "int8"})
    assert "['fp32']" in msg and "strategy 'diloco'" in msg
