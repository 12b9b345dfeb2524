"""The Flower engine's bookkeeping of what global version each silo will hold: an update goes
only to a silo that will hold the version it applies to; anyone else gets full weights."""

from __future__ import annotations

from fedtrain.server.flower_engine import FlowerEngine, _silo_state


def engine() -> FlowerEngine:
    return FlowerEngine(
        None,  # type: ignore[arg-type]  # the version bookkeeping never touches the grid
        silos=["a", "b"],
        run_id="r",
        manifest={},
        tokenizer=b"",
        weights=lambda rnd: b"W",
    )


def test_unknown_silo_needs_full_weights():
    e = engine()
    assert e._effective_version("a", 1) is None


def test_silo_that_already_worked_rolls_back_to_the_older_snapshot():
    e = engine()
    # did rounds 3 and 4; holds version 4 now; snapshots after round 3 (v3) and round 4 (v4)
    e.state["a"] = _silo_state({"version": 4, "work_round": 4, "snapshots": [[3, 3], [4, 4]]})
    assert e._effective_version("a", 5) == 4  # normal next round
    assert e._effective_version("a", 4) == 3  # coordinator restarted after committing round 3
    assert e._effective_version("a", 3) is None  # nothing that old: full weights


def test_restore_keeps_the_global_version_only():
    e = engine()
    e.version = 7
    e.resync_bytes = 11
    state = e.save_state(None, full=True)
    f = engine()
    f.restore_state(None, state)
    assert (f.version, f.resync_bytes) == (7, 11)
    assert "silos" not in state  # silos keep their own state in their daemons
