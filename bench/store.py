"""Non-training workloads with the metadata cache vs straight from the backing store.

For 8 and 32 silos, a run store is filled with 3 rounds of synthetic pseudo-gradients (fp32
payloads of --params values each), on file:// and on a memory:// store with an injected
per-read latency standing in for a remote object store. Each workload is timed (a) after the
round was prefetched into the cache on commit and (b) with a cold cache that must read the
backing store; the ratio cached/backend is printed (baseline measured in the same run).

    python bench/store.py
    python bench/store.py --params 1000000 --latency-ms 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
from fsspec.implementations.memory import MemoryFileSystem

from fedtrain.storage.cache import MetadataCache
from fedtrain.storage.functions import FunctionContext, run_function
from fedtrain.storage.runstore import RunStore
from fedtrain.transport import encode_payload


class SlowMemoryFS(MemoryFileSystem):
    """memory:// with a fixed latency per file read (a stand-in for an object store)."""

    cachable = False

    def __init__(self, latency_s: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latency_s = latency_s

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            time.sleep(self.latency_s)
        return super()._open(path, mode=mode, **kwargs)


def populate(store: RunStore, silos: int, rounds: int, params: int) -> None:
    shapes = {"w": (params // 64, 64)}
    weights = {n: torch.zeros(s) for n, s in shapes.items()}
    store.index.set_meta("initial_global_blob", store.put_tensors(weights))
    for rnd in range(1, rounds + 1):
        store.start_round(rnd)
        agg = {n: torch.zeros(s) for n, s in shapes.items()}
        base = torch.randn(shapes["w"], generator=torch.Generator().manual_seed(rnd))
        for i in range(silos):
            g = torch.Generator().manual_seed(1000 * rnd + i)
            upd = {"w": base + 0.5 * torch.randn(shapes["w"], generator=g)}
            data = encode_payload(
                upd, codec="fp32", kind="pseudo_grad", run_id="bench", round=rnd, sender=f"silo{i}"
            )
            store.store_update(
                rnd, f"silo{i}", data, valid=True, reason=None, codec="fp32", weight=1.0
            )
            agg["w"] += upd["w"] / silos
        weights = {"w": weights["w"] - agg["w"]}
        store.index.commit_round(
            rnd,
            {"global_blob": store.put_tensors(weights), "aggregate_blob": store.put_tensors(agg)},
            {"round": rnd},
        )


def evaluate(w: dict[str, torch.Tensor]) -> float:
    return float((w["w"] + 0.25).pow(2).mean())


WORKLOADS = {
    "similarity": {},
    "anomalies": {},
    "debug_round": {},
    "contribution (LOO)": {"method": "loo"},
}


def time_workload(
    store: RunStore, name: str, kwargs: dict, cached: bool, rnd: int, repeat: int
) -> float:
    fn = name.split(" ")[0]
    times = []
    for _ in range(repeat):
        cache = MetadataCache(store, 4 << 30)
        if cached:
            cache.on_commit(rnd)  # what the coordinator does when round rnd commits
        ctx = FunctionContext(cache=cache, evaluate=evaluate)
        t0 = time.perf_counter()
        run_function(fn, ctx, round=rnd, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=262_144, help="values per silo update")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="remote-store read latency")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"update size {args.params * 4 / 1e6:.1f} MB; remote latency {args.latency_ms} ms/read")
    print(
        f"{'silos':>5} {'backend':12} {'workload':20} {'store ms':>10} {'cached ms':>10} "
        f"{'ratio':>7} {'latency cut':>11}"
    )
    for silos in (8, 32):
        with tempfile.TemporaryDirectory() as tmp:
            backends = {
                "file://": RunStore(Path(tmp) / "f", url=f"file://{tmp}/f/blobs"),
                f"remote+{args.latency_ms:g}ms": RunStore(
                    Path(tmp) / "m",
                    url=f"memory://bench-{uuid.uuid4().hex}",
                    fs=SlowMemoryFS(args.latency_ms / 1000),
                ),
            }
            for label, store in backends.items():
                populate(store, silos, 3, args.params)
                for name, kwargs in WORKLOADS.items():
                    base = time_workload(store, name, kwargs, False, 3, args.repeat)
                    warm = time_workload(store, name, kwargs, True, 3, args.repeat)
                    print(
                        f"{silos:>5} {label:12} {name:20} {base * 1e3:10.1f} "
                        f"{warm * 1e3:10.1f} {warm / base:7.3f} {1 - warm / base:11.1%}"
                    )


if __name__ == "__main__":
    main()
