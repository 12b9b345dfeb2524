"""Hierarchical aggregation: tree specs, real leaf processes vs the flat mean, end to end.

Reference: the flat :class:`StreamingMean` (fp32) and :class:`FixedPointMean` (int64). Every
tree shape must match the first within float tolerance and the second bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtrain.aggregation.fixed import FixedPointMean
from fedtrain.aggregation.mean import StreamingMean
from fedtrain.aggregation.processes import TreeError
from fedtrain.aggregation.shape import MAX_NODES, fanout_spec, parse_tree
from fedtrain.aggregation.tree import Aggregation, TreeMean
from fedtrain.config import ConfigError, config_from_dict
from fedtrain.simulation.runner import build_simulation
from tests.conftest import tiny_config_dict

SHAPES = {"w": (7, 5), "b": (13,), "e": (3, 4, 2)}


def _updates(n: int, seed: int) -> list[tuple[str, dict[str, torch.Tensor], float]]:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tensors = {
            k: torch.randn(s, generator=g) * 10 ** rng.uniform(-3, 1) for k, s in SHAPES.items()
        }
        weight = float(rng.randint(1, 5000)) if i % 3 else rng.uniform(0.1, 3.0)
        out.append((f"silo{i}", tensors, weight))
    return out


def _silos(n: int) -> list[str]:
    return [f"silo{i}" for i in range(n)]


def _random_spec(rng: random.Random, n: int, depth: int = 0) -> list:
    """A random nested tree over n silos: uneven groups, leaves and inner nodes mixed."""
    cuts = sorted(rng.sample(range(1, n), k=min(n - 1, rng.randint(0, 3))))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    return [
        _random_spec(rng, s, depth + 1) if s >= 2 and depth < 2 and rng.random() < 0.5 else s
        for s in sizes
    ]


def _reference(updates, cls=StreamingMean, **kw):
    agg = cls(**kw)
    for silo, tensors, w in updates:
        agg.add(tensors, w, silo)
    return agg.mean()


def _tree_mean(spec, updates, rounds=1, **kw):
    """The mean over a tree (the same updates each round); also the aggregator and its pids."""
    n = len(updates)
    agg = Aggregation(parse_tree(spec, n), _silos(n), **kw)
    try:
        for _ in range(rounds):
            m = agg.new_aggregator()
            for silo, tensors, w in updates:
                m.add(tensors, w, silo)
            out = m.mean()
        assert agg.processes is not None
        pids = agg.processes.pids
    finally:
        agg.close()
    return out, m, pids


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _forkserver_children() -> list[int]:
    """Live processes the multiprocessing forkserver started (our aggregator nodes)."""
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server is None:
        return []
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == server and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


# ------------------------------------------------------------------------------ tree specs
def test_fanout_builds_balanced_trees():
    assert fanout_spec(64, 8) == [8] * 8
    assert fanout_spec(64, 4) == [[4, 4, 4, 4]] * 4
    assert fanout_spec(10, 3) == [[3, 3], [2, 2]]
    assert fanout_spec(3, 8) == [3]
    tree = parse_tree(4, 64)
    assert tree is not None and len(tree.nodes) == 20 and len(tree.root_children) == 4


def test_nested_spec_assigns_silos_in_order_and_round_trips():
    tree = parse_tree([[2, 1], 3, [[1, 1]]], 8)
    assert tree is not None
    assert tree.spec() == [[2, 1], 3, [[1, 1]]]
    assert [n.silos for n in tree.leaves] == [(0, 1), (2,), (3, 4, 5), (6,), (7,)]
    leaf_of = tree.leaf_of()
    assert leaf_of[0] == leaf_of[1] != leaf_of[2]
    # Deepest inner nodes first, so partial sums move up level by level.
    assert [[n.depth for n in level] for level in tree.inner_levels()] == [[2], [1, 1]]
    assert parse_tree(0, 8) is None and parse_tree([], 8) is None


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ([3, 2], "adding up to data.silos = 4"),
        ([0, 4], "leaf sizes >= 1"),
        ([[], 4], "non-empty lists"),
        (1, "fan-out >= 2"),
        (-3, "fan-out >= 2"),
        ([2, "2"], "leaf sizes"),
        ("two", "expected an integer or a list"),
        (True, "expected an integer or a list"),
        ([[[[[[[[[4]]]]]]]]], "levels deep"),
    ],
)
def test_bad_tree_configs_are_rejected_naming_the_key(tree, match):
    with pytest.raises(ConfigError, match=r"round\.tree") as e:
        config_from_dict(tiny_config_dict(data={"silos": 4}, round={"tree": tree}))
    assert match in str(e.value)


def test_a_tree_with_too_many_processes_is_rejected():
    with pytest.raises(ConfigError, match=rf"round\.tree.*at most {MAX_NODES} aggregator"):
        config_from_dict(tiny_config_dict(data={"silos": 200}, round={"tree": 2}))


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        ({"name": "zo"}, "strategy.name = 'zo'"),
        ({"name": "ddp"}, "strategy.name = 'ddp'"),
        ({"coding": "auto", "stragglers": 1}, "strategy.coding = 'auto'"),
        ({"scheduling": "compass"}, "strategy.scheduling = 'compass'"),
    ],
)
@pytest.mark.parametrize("rnd", [{"tree": [2, 2]}, {"accumulate": "int64"}])
def test_trees_and_int64_sums_refuse_strategies_that_aggregate_otherwise(strategy, match, rnd):
    key = "round.tree" if "tree" in rnd else "round.accumulate"
    with pytest.raises(ConfigError, match=key) as e:
        config_from_dict(tiny_config_dict(data={"silos": 4}, round=rnd, strategy=strategy))
    assert match in str(e.value)


def test_accumulate_and_fraction_bits_are_validated():
    with pytest.raises(ConfigError, match="round.accumulate"):
        config_from_dict(tiny_config_dict(round={"accumulate": "fp16"}))
    with pytest.raises(ConfigError, match="round.fraction_bits"):
        config_from_dict(tiny_config_dict(round={"fraction_bits": 60}))
    cfg = config_from_dict(
        tiny_config_dict(data={"silos": 4}, round={"tree": [[1, 1], 2], "accumulate": "int64"})
    )
    assert cfg.round.tree == [[1, 1], 2]


# ------------------------------------------------------------------------ tree vs flat mean
def test_exact_weighted_mean_through_a_tree():
    ones = {"x": torch.ones(4)}
    updates = [("silo0", ones, 1.0), ("silo1", {"x": torch.full((4,), 3.0)}, 3.0)]
    for mode in ("float", "int64"):
        out, _, _ = _tree_mean([1, 1], updates, accumulate=mode)
        assert torch.equal(out["x"], torch.full((4,), 2.5))


def test_random_tree_shapes_equal_the_flat_mean():
    rng = random.Random(7)
    for trial in range(6):
        n = rng.randint(3, 12)
        spec = _random_spec(rng, n)
        updates = _updates(n, seed=trial)
        ref = _reference(updates)
        out, _, _ = _tree_mean(spec, updates)
        assert out is not None and set(out) == set(SHAPES)
        for k in SHAPES:
            assert out[k].shape == ref[k].shape
            torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=str(spec))


def test_int64_tree_shapes_are_bitwise_equal_to_the_flat_integer_sum():
    rng = random.Random(11)
    n = 9
    updates = _updates(n, seed=3)
    ref = _reference(updates, FixedPointMean, fraction_bits=32, max_silos=n)
    flat = _reference(updates)
    specs = [[9], [1] * 9, [[4, 5]], 2, 3, *(_random_spec(rng, n) for _ in range(3))]
    for spec in specs:
        out, _, _ = _tree_mean(spec, updates, accumulate="int64")
        for k in SHAPES:
            assert torch.equal(out[k], ref[k]), spec
            torch.testing.assert_close(out[k], flat[k], rtol=1e-5, atol=1e-6)
    # Fixed point is exact whatever the arrival order, too.
    shuffled = _reference(rng.sample(updates, n), FixedPointMean, fraction_bits=32)
    assert all(torch.equal(shuffled[k], ref[k]) for k in SHAPES)


def test_one_leaf_tree_reproduces_streaming_mean_bits():
    updates = _updates(5, seed=5)
    ref = _reference(updates)
    out, _, _ = _tree_mean([5], updates)
    assert all(torch.equal(out[k], ref[k]) for k in SHAPES)


def test_result_does_not_depend_on_which_leaf_reports_first():
    """Leaves sum in arrival order; interleaving the leaves differently changes nothing."""
    updates = _updates(6, seed=9)
    spec = [[2, 1], 3]
    a, _, _ = _tree_mean(spec, updates)
    # Same order within each leaf ({0,1}, {2}, {3,4,5}), different interleaving across leaves.
    order = [3, 2, 4, 0, 5, 1]
    b, _, _ = _tree_mean(spec, [updates[i] for i in order])
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)


def test_rounds_reuse_processes_and_may_change_tensors():
    """Streaming DiLoCo sends another fragment each round: other names, other sizes."""
    n = 4
    agg = Aggregation(parse_tree([[1, 1], 2], n), _silos(n), numel=10)
    try:
        pids = None
        for rnd, size in enumerate([6, 40, 3, 40]):
            g = torch.Generator().manual_seed(rnd)
            updates = [
                (f"silo{i}", {f"p{rnd}": torch.randn(size, generator=g)}, i + 1.0) for i in range(n)
            ]
            m = agg.new_aggregator()
            for silo, t, w in updates:
                m.add(t, w, silo)
            torch.testing.assert_close(m.mean()[f"p{rnd}"], _reference(updates)[f"p{rnd}"])
            assert agg.processes is not None
            pids = pids or agg.processes.pids
            assert agg.processes.pids == pids  # started once, not per round
    finally:
        agg.close()
    assert not any(_running(p) for p in pids)


def test_an_abandoned_round_does_not_leak_into_the_next():
    updates = _updates(4, seed=1)
    agg = Aggregation(parse_tree([2, 2], 4), _silos(4))
    try:
        stale = agg.new_aggregator()
        for silo, t, w in updates[:3]:
            stale.add(t, w, silo)  # the round failed its quorum: mean() never called
        m = agg.new_aggregator()
        for silo, t, w in updates:
            m.add(t, w, silo)
        ref = _reference(updates)
        torch.testing.assert_close(m.mean()["w"], ref["w"], rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="stale"):
            stale.add(*updates[3][1:2], updates[3][2], updates[3][0])
    finally:
        agg.close()


def test_bytes_the_root_and_the_leaves_hold():
    updates = _updates(6, seed=2)
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    _, m, _ = _tree_mean([[1, 2], 3], updates)
    assert isinstance(m, TreeMean)
    rep = m.report()
    assert m.buffer_bytes == 4 * numel  # the root's sum only
    assert rep["tree_root_ingress_bytes"] == 2 * 4 * numel  # two children, not six silos
    assert rep["tree_flat_ingress_bytes"] == 6 * 4 * numel
    assert rep["tree_leaf_bytes"] == [12 * numel] * 3  # two fp32 slots + the fp32 sum
    _, m, _ = _tree_mean([3, 3], updates, accumulate="int64")
    assert m.buffer_bytes == 8 * numel and m.report()["tree_leaf_bytes"] == [16 * numel] * 2


def test_unknown_sender_and_negative_weight_are_refused():
    agg = Aggregation(parse_tree([1, 1], 2), _silos(2))
    try:
        m = agg.new_aggregator()
        with pytest.raises(ValueError, match="no leaf"):
            m.add({"x": torch.ones(2)}, 1.0, "stranger")
        with pytest.raises(ValueError, match=">= 0"):
            m.add({"x": torch.ones(2)}, -1.0, "silo0")
        assert m.mean() is None  # nothing arrived
    finally:
        agg.close()


def test_fixed_point_overflow_is_an_error_not_a_wraparound():
    updates = [("silo0", {"x": torch.full((3,), 1e9)}, 1e6), ("silo1", {"x": torch.ones(3)}, 1.0)]
    with pytest.raises(OverflowError, match="round.fraction_bits"):
        _reference(updates, FixedPointMean, fraction_bits=32)
    agg = Aggregation(parse_tree([1, 1], 2), _silos(2), accumulate="int64")
    m = agg.new_aggregator()
    assert agg.processes is not None
    pids = agg.processes.pids
    with pytest.raises(TreeError, match="round.fraction_bits"):
        for silo, t, w in updates:
            m.add(t, w, silo)
        m.mean()
    assert not any(_running(p) for p in pids)  # a failed tree stops its processes


def test_a_killed_leaf_fails_the_round_instead_of_hanging():
    updates = _updates(4, seed=4)
    agg = Aggregation(parse_tree([2, 2], 4), _silos(4), timeout_s=30.0)
    m = agg.new_aggregator()
    m.add(updates[0][1], updates[0][2], updates[0][0])
    assert agg.processes is not None
    pids = agg.processes.pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(TreeError, match="exited"):
        for silo, t, w in updates[1:]:
            m.add(t, w, silo)
        m.mean()
    assert not any(_running(p) for p in pids)
    # The next round starts a fresh tree.
    m = agg.new_aggregator()
    for silo, t, w in updates:
        m.add(t, w, silo)
    torch.testing.assert_close(m.mean()["w"], _reference(updates)["w"], rtol=1e-5, atol=1e-6)
    agg.close()


# ---------------------------------------------------------------------------- end to end
def _run(tmp_path: Path, name: str, then=None, **rnd) -> tuple[dict, list[int]]:
    d = tiny_config_dict(
        data={"silos": 4, "max_chars": 100_000},
        run={"rounds": 2},
        # One thread: on a busy 2-core machine, two threads per tiny op mostly wait.
        train={"inner_steps": 2, "batch_size": 2, "seq_len": 16, "threads": 1},
        round={"min_silos": 1, **rnd},
        storage={"cache_bytes": 0},
    )
    # A fixed simulated step time: no measurement run, and the runs' clocks agree.
    sim = build_simulation(config_from_dict(d), tmp_path / name, quiet=True, step_time_s=0.01)
    pids: set[int] = set()
    strategy = sim.coordinator.strategy
    progress_round = sim.coordinator.on_round

    def on_round(row):
        if progress_round:
            progress_round(row)
        aggregation = getattr(strategy, "aggregation", None)
        if aggregation is not None and aggregation.processes is not None:
            pids.update(aggregation.processes.pids)
        if then is not None:
            then(row)

    sim.coordinator.on_round = on_round
    sim.execute()
    return load_file(str(tmp_path / name / "model.safetensors")), sorted(pids)


@pytest.mark.slow
def test_simulate_with_a_tree_matches_the_flat_run_and_leaves_no_processes(tmp_path):
    flat, _ = _run(tmp_path, "flat")
    tree, pids = _run(tmp_path, "tree", tree=[[1, 1], 2])
    assert len(pids) == 4  # an inner node and three leaves
    events = [json.loads(line) for line in (tmp_path / "tree" / "events.jsonl").open()]
    agg = [e for e in events if e["event"] == "aggregate"]
    assert [e["round"] for e in agg] == [1, 2] and agg[0]["tree"] == [[1, 1], 2]
    assert agg[0]["tree_root_ingress_bytes"] * 2 == agg[0]["tree_flat_ingress_bytes"]
    for k in flat:
        torch.testing.assert_close(tree[k], flat[k], rtol=1e-4, atol=1e-5)
    assert not any(_running(p) for p in pids)
    assert _forkserver_children() == []

    flat_int, _ = _run(tmp_path, "flat-int", accumulate="int64")
    tree_int, pids = _run(tmp_path, "tree-int", tree=2, accumulate="int64")
    assert len(pids) == 2
    assert all(torch.equal(tree_int[k], flat_int[k]) for k in flat_int)
    assert not any(_running(p) for p in pids)


@pytest.mark.slow
def test_interrupted_run_stops_its_aggregator_processes(tmp_path):
    def interrupt(row):
        raise KeyboardInterrupt

    # Holding the traceback keeps the run's objects alive: the explicit close, not garbage
    # collection, must have stopped the processes.
    with pytest.raises(KeyboardInterrupt) as interrupted:
        _run(tmp_path, "interrupted", then=interrupt, tree=[2, 2])
    assert _forkserver_children() == []
    assert interrupted.traceback
