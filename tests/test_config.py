from pathlib import Path

import pytest

from fedtrain.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    packaged_example,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(ROOT.glob("examples/**/*.toml"))


def test_there_are_examples_to_load():
    assert EXAMPLES, "examples/*.toml missing"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path):
    cfg = load_config(path)
    assert cfg.data.silos >= 1 and cfg.total_inner_steps() >= 1


def test_packaged_quickstart_mirrors_examples():
    assert packaged_example().read_text() == (ROOT / "examples" / "quickstart.toml").read_text()
    cfg = load_config()  # no --config: the packaged quickstart
    assert cfg.run.name == "quickstart" and cfg.data.silos >= 4


def test_overrides_parse_toml_values():
    cfg = load_config(
        None,
        [
            "train.inner_steps=20",
            "strategy.name=fedavg",
            "train.bf16=true",
            "data.files=['a.txt']",
            "data.corpus=files",
        ],
    )
    assert cfg.train.inner_steps == 20 and cfg.strategy.name == "fedavg"
    assert cfg.train.bf16 is True and cfg.data.files == ["a.txt"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.inner_steps=0", "train.inner_steps: 0 is not allowed; expected an integer >= 1"),
        ("strategy.name=sgd", "strategy.name: 'sgd' is not allowed; expected one of"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.nosuch=1", "unknown key 'train.nosuch'"),
        ("nosuch.key=1", "unknown section 'nosuch'"),
        ("transport.codec=zip", "transport.codec: 'zip' is not allowed"),
        ("round.min_silos=9", "round.min_silos: 9 is not allowed; expected at most data.silos"),
        ("data.silos=3", "simulation.profiles"),
        ("train.inner_steps", "expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_a_run_needs_an_end():
    with pytest.raises(ConfigError, match="run.rounds"):
        config_from_dict({"run": {"rounds": 0, "token_budget": 0}})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_token_budget_sets_the_inner_step_count():
    cfg = config_from_dict(
        apply_overrides(
            {},
            ["run.token_budget=100000", "data.silos=4", "train.batch_size=8", "train.seq_len=128"],
        )
    )
    # 100000 tokens / (4 silos · 8 · 128 tokens per step) = 24.4 -> 25 steps per silo.
    assert cfg.total_inner_steps() == 25


def test_every_rule_across_sections_is_reported_at_once():
    # The quickstart's profiles add up to 4 silos and round.min_silos is 3.
    with pytest.raises(ConfigError) as e:
        load_config(
            ROOT / "examples" / "quickstart.toml",
            ["data.silos=2", "faults.inject=['kill@silo7:3']", "strategy.trim_fraction=0.7"],
        )
    lines = str(e.value).splitlines()
    assert [line.partition(":")[0] for line in lines] == [
        "simulation.profiles",
        "round.min_silos",
        "strategy.trim_fraction",
        "faults.inject",
    ]
    assert lines[0] == (
        "simulation.profiles: '4 silos' is not allowed; expected counts adding up to data.silos = 2"
    )
    assert lines[1] == "round.min_silos: 3 is not allowed; expected at most data.silos = 2"


def test_a_single_broken_rule_keeps_its_own_message():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["round.min_silos=9"])
    assert str(e.value) == "round.min_silos: 9 is not allowed; expected at most data.silos = 4"


def test_deployment_ignores_the_simulated_silo_profiles():
    quickstart = ROOT / "examples" / "quickstart.toml"
    with pytest.raises(ConfigError, match="simulation.profiles"):
        load_config(quickstart, ["data.silos=3"])
    cfg = load_config(quickstart, ["data.silos=3"], purpose="deploy")
    assert cfg.data.silos == 3 and cfg.simulation.profiles == []
    # The other rules still hold in deployment.
    with pytest.raises(ConfigError) as e:
        load_config(quickstart, ["data.silos=2"], purpose="deploy")
    assert str(e.value) == "round.min_silos: 3 is not allowed; expected at most data.silos = 2"
