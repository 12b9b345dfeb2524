"""Run-store retention: disk use stops growing after the retention window, what the window
keeps stays readable, and a blob shared with a kept round is never deleted."""

from __future__ import annotations

import pytest
import torch

from fedtrain.storage.cache import MetadataCache
from fedtrain.storage.runstore import RunStore
from fedtrain.transport.payload import encode_payload

SILOS = ["silo0", "silo1", "silo2"]
N = 4096


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(N, generator=torch.Generator().manual_seed(seed))}


def _round(store: RunStore, rnd: int, same_update: bool = False) -> None:
    """One round written as the coordinator writes it: updates, state blobs, commit."""
    store.start_round(rnd)
    for i, silo in enumerate(SILOS):
        seed = 7 if same_update and i == 0 else 1000 * rnd + i
        data = encode_payload(
            _tensors(seed), codec="int8", kind="pseudo_grad", run_id="r", round=0, sender=silo
        )
        store.store_update(rnd, silo, data, valid=True, reason=None, codec="int8", weight=1.0)
    state = {
        "global_blob": store.put_tensors(_tensors(rnd)),
        "aggregate_blob": store.put_tensors(_tensors(-rnd)),
        "outer_blob": store.put_tensors(_tensors(10_000 + rnd)),
        "silos": {
            s: store.put_tensors(_tensors(20_000 + 10 * rnd + i)) for i, s in enumerate(SILOS)
        },
    }
    store.commit(rnd, state, {"round": rnd})


def _blobs(store: RunStore) -> list[str]:
    """Paths of the stored blobs (not the temporaries of writes)."""
    root = store.blobs.root
    return [p for p in store.blobs.fs.find(root) if not p.startswith(f"{root}/tmp/")]


def _disk(store: RunStore) -> int:
    return sum(int(store.blobs.fs.size(p)) for p in _blobs(store))


@pytest.mark.parametrize("keep_weights", [0, 5])
def test_disk_use_stops_growing_after_the_retention_window(tmp_path, keep_weights):
    store = RunStore(tmp_path / "run", keep=2, keep_updates=2, keep_weights=keep_weights)
    sizes = []
    for rnd in range(1, 21):
        _round(store, rnd)
        sizes.append(_disk(store))
    per_round = [b - a for a, b in zip(sizes, sizes[1:], strict=False)]
    # Past the window a round adds nothing, but for the weights of every 5th round, which
    # stay when they leave the window three rounds later.
    one_model = len(store.blobs.get(store.index.round_state(20)["global_blob"]))
    assert one_model > 4 * N and sizes[0] > 6 * one_model
    for rnd in range(4, 21):
        expected = one_model if keep_weights and (rnd - 3) % 5 == 0 else 0
        assert per_round[rnd - 2] == expected, (rnd, per_round)
    kept = {r: store.index.round_state(r) for r in store.index.committed_rounds()}
    assert set(kept[20]) >= {"global_blob", "aggregate_blob", "outer_blob", "silos"}
    assert "silos" not in kept[17] and "aggregate_blob" not in kept[17]
    assert ("global_blob" in kept[15]) == bool(keep_weights) and "global_blob" not in kept[16]
    assert "global_blob" in kept[18]  # the round before the window: contribution starts there
    # What the window keeps is readable; what it does not is named, and its facts remain.
    cache = MetadataCache(store, budget_bytes=1 << 20)
    assert cache.update(19, "silo1")["w"].numel() == N
    with pytest.raises(KeyError, match="keep_updates"):
        cache.update(3, "silo1")
    old = store.index.updates(3)
    assert [u["blob"] for u in old] == [None] * 3 and all(u["bytes"] > 0 for u in old)
    # Exactly the blobs the index references are stored.
    referenced = store.index.update_blobs()
    for st in kept.values():
        referenced |= {v for k, v in st.items() if k.endswith("_blob")}
        referenced |= set(st.get("silos", {}).values())
    stored = {p.rsplit("/", 1)[-1] for p in _blobs(store)}
    assert stored == referenced


def test_a_blob_shared_with_a_kept_round_stays(tmp_path):
    """Blobs are content-addressed: the same payload in an old and a kept round is one blob."""
    store = RunStore(tmp_path / "run", keep=1, keep_updates=1)
    for rnd in range(1, 5):
        _round(store, rnd, same_update=True)
    (row,) = store.index.updates(4, "silo0")
    assert row["blob"] is not None
    assert store.blobs.get(row["blob"])  # not deleted with round 1-3's copies
    assert store.index.updates(2, "silo0")[0]["blob"] is None


def test_resume_sweeps_what_a_crash_left_unreferenced(tmp_path):
    store = RunStore(tmp_path / "run", keep=1, keep_updates=1)
    for rnd in range(1, 4):
        _round(store, rnd)
    before = set(_blobs(store))
    orphan = store.put_tensors(_tensors(99))  # a round that never committed wrote this
    store.start_round(4)
    store.store_update(4, "silo0", b"uncommitted", valid=True, reason=None, codec="x", weight=1)
    store.rewind_to(3)
    assert set(_blobs(store)) == before and not store.blobs.exists(orphan)
    assert store.sweep() == 0
