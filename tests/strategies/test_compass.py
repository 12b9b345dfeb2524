"""FedCompass scheduling: Q bounds, arrival alignment, speed ordering, staleness, idle time."""

from __future__ import annotations

import heapq

import pytest
import torch

from fedtrain.strategies.compass import (
    CompassDiLoCo,
    CompassMean,
    CompassScheduler,
    staleness_weight,
)


def test_speed_is_an_ema_of_seconds_per_step():
    s = CompassScheduler()
    assert s.observe("a", 10.0, 10) == 1.0
    assert s.observe("a", 30.0, 10) == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)


def test_joining_silo_gets_bounded_q_and_finishes_within_one_step_of_t_e():
    s = CompassScheduler(q_min=20, q_max=100)
    s.observe("slow", 4.0, 1)
    s.observe("fast", 1.0, 1)
    first = s.assign("slow", now=0.0)  # opens a group: Q_max, T_e = 400
    assert first.steps == 100 and first.finish == 400.0
    early = s.assign("fast", now=150.0)  # Q = 250 > Q_max: it would idle, so a new group
    assert early.group != first.group and early.steps == 100
    joiner = s.assign("fast", now=330.0)  # Q = floor(70/1) = 70 within bounds
    assert joiner.group == first.group and 20 <= joiner.steps <= 100
    assert 0 <= s.groups[first.group].expected - joiner.finish < 1.0  # within one step


def test_no_group_fits_opens_a_new_one_with_q_max():
    s = CompassScheduler(q_min=20, q_max=100)
    s.observe("a", 1.0, 1)
    s.observe("b", 1.0, 1)
    g1 = s.assign("a", now=0.0)
    g2 = s.assign("b", now=95.0)  # only 5 steps left before T_e = 100 < Q_min
    assert g2.group != g1.group and g2.steps == 100
    assert s.groups[g2.group].latest == pytest.approx(95.0 + 1.5 * 100)


@pytest.mark.parametrize("now", [0.0, 37.5, 120.0])
def test_faster_silo_gets_at_least_the_slower_ones_q(now):
    s = CompassScheduler(q_min=5, q_max=1000)
    s.observe("anchor", 10.0, 1)
    s.assign("anchor", now=0.0)  # a group expected at 10,000
    for name, v in (("fast", 1.0), ("slow", 3.0)):
        s.observe(name, v, 1)
    assert s.assign("fast", now).steps >= s.assign("slow", now).steps


def test_staleness_weights():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.5
    with pytest.raises(ValueError):
        staleness_weight(-1)


def _idle_fraction(speeds: dict[str, float], compass: bool, aggregations: int = 40) -> float:
    """Event simulation on a virtual clock: the fraction of silo time spent waiting.

    A silo is always either computing or waiting for its group to aggregate; idle time is the
    sum of those waits (including waits still open at the end) over silos × elapsed time.
    """
    n = len(speeds)
    if not compass:  # synchronous rounds of Q_max steps: everyone waits for the slowest
        round_time = 40 * max(speeds.values())
        return sum(round_time - 40 * v for v in speeds.values()) / (n * round_time)
    sched = CompassScheduler(q_min=10, q_max=40)
    for k, v in speeds.items():
        sched.observe(k, v, 1)
    events: list[tuple[float, str, int]] = []
    for k in speeds:
        a = sched.assign(k, 0.0)
        heapq.heappush(events, (a.finish, k, a.group))
    arrived_at: dict[str, float] = {}
    idle, done, t = 0.0, 0, 0.0
    while done < aggregations:
        t, k, gid = heapq.heappop(events)
        if gid not in sched.groups:  # its group was force-closed at T_l: late, new work now
            a = sched.assign(k, t)
            heapq.heappush(events, (a.finish, k, a.group))
            continue
        arrived_at[k] = t
        g = sched.groups[gid]
        if sched.arrive(k, gid) or t >= g.latest:
            sched.close(gid)
            done += 1
            for m in sorted(g.arrived):  # members get new work as the group aggregates
                idle += t - arrived_at.pop(m)
                a = sched.assign(m, t)
                heapq.heappush(events, (a.finish, m, a.group))
    idle += sum(t - at for at in arrived_at.values())
    return idle / (n * t)


def test_idle_fraction_drops_versus_synchronous_rounds():
    speeds = {"x1": 1.0, "x2": 2.0, "x4": 4.0}
    sync = _idle_fraction(speeds, compass=False)
    assert sync == pytest.approx(1 - (1 + 2 + 4) / (3 * 4))  # 41.7% idle, by hand
    assert _idle_fraction(speeds, compass=True) < 0.01  # they arrive together: ~no waiting
    irregular = {"a": 1.0, "b": 1.3, "c": 2.7, "d": 4.0}
    assert _idle_fraction(irregular, compass=True) < 0.25 * _idle_fraction(irregular, False)


def test_compass_mean_normalises_per_step_and_weights_staleness():
    agg = CompassMean(target={"a", "b"})
    one = {"w": torch.ones(3)}
    agg.add(one, 100.0, sender="a", meta={"steps": 10, "staleness": 0})
    assert not agg.done()
    agg.add({"w": torch.full((3,), 4.0)}, 100.0, sender="b", meta={"steps": 40, "staleness": 3})
    assert agg.done()
    # H̄ · Σ w·s(τ)·Δ/H / Σ w = 25 · (100·1·1/10 + 100·0.5·4/40) / 200 = 25 · 15 / 200
    assert torch.allclose(agg.mean()["w"], torch.full((3,), 25 * 15 / 200))
    assert agg.report()["staleness"] == {"a": 0, "b": 3}


def test_compass_diloco_plans_bounded_steps_and_tracks_work_in_flight():
    w = torch.nn.Parameter(torch.zeros(2))
    now = [0.0]
    strat = CompassDiLoCo({"w": w}, inner_steps=20, q_min=5, q_max=20, clock=lambda: now[0])
    first = strat.plan(1, ["fast", "slow"], steps=1000)
    assert {s: x.steps for s, x in first.items()} == {"fast": 20, "slow": 20}  # calibration
    assert isinstance(strat.new_aggregator(), CompassMean)
    strat.received("fast", at=20.0, ok=True)  # 1 s per step
    strat.received("slow", at=80.0, ok=True)  # 4 s per step
    now[0] = 80.0
    again = strat.plan(2, ["fast", "slow"], steps=1000)
    assert all(5 <= x.steps <= 20 for x in again.values())
    assert again["fast"].steps >= again["slow"].steps
    assert strat.plan(3, ["fast", "slow"], steps=1000) == {}  # both still computing
    agg = strat.new_aggregator()
    assert agg.target == {"fast", "slow"} and agg.latest == 80.0 + 1.5 * 20 * 1.0  # T_l
    strat.received("fast", at=95.0, ok=True)
    agg.add({"w": torch.ones(2)}, 1.0, sender="fast", meta={"steps": 15})
    assert not agg.done()  # the slow member is still due before T_l
    agg.last_arrival = 111.0  # an arrival past T_l: the timer forces aggregation
    assert agg.done()
