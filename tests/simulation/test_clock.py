import pytest

from fedtrain.config import SiloProfile
from fedtrain.simulation.clock import SiloTiming, VirtualClock, transfer_time


def test_ten_megabytes_over_100_mbit_with_50_ms_latency_takes_0_85_s():
    assert transfer_time(10_000_000, 100.0, 50.0) == pytest.approx(0.85, abs=1e-12)


def test_empty_transfer_costs_nothing():
    assert transfer_time(0, 1.0, 500.0) == 0.0


def test_a_silo_twice_as_slow_doubles_its_compute_time():
    fast = SiloTiming(SiloProfile(step_time_s=0.25), 0.25, 0.0, 0, "a")
    slow = SiloTiming(SiloProfile(step_time_s=0.25, slowdown=2.0), 0.25, 0.0, 0, "b")
    assert fast.compute_time(40, 1) == pytest.approx(10.0)
    assert slow.compute_time(40, 1) == pytest.approx(20.0)


def test_link_directions_use_their_own_bandwidth():
    t = SiloTiming(SiloProfile(up_mbps=20, down_mbps=100, latency_ms=30), 0.1, 0.0, 0, "a")
    assert t.up_time(1_000_000) == pytest.approx(0.03 + 0.4)
    assert t.down_time(1_000_000) == pytest.approx(0.03 + 0.08)


def test_jitter_is_seeded_and_varies_by_round():
    a = SiloTiming(SiloProfile(), 1.0, 0.5, 7, "s")
    b = SiloTiming(SiloProfile(), 1.0, 0.5, 7, "s")
    assert a.slowdown(3) == b.slowdown(3)
    assert a.slowdown(3) != a.slowdown(4)


def test_clock_is_monotone():
    c = VirtualClock()
    assert c.advance(1.5) == 1.5
    with pytest.raises(ValueError):
        c.advance(-1)
