"""Hierarchical (tree) vs flat aggregation at the root: when does the tree pay?

For 8/32/64 silos and updates of 1M/10M/50M fp32 values, one round's updates are folded
(a) flat by the coordinator — StreamingMean (fp32) or FixedPointMean (int64), the faster of 1
thread and all cores — and (b) through a tree of 4 leaf processes (one per group of silos, e.g.
per host) under the root. Per case:
bytes the root reads to form the mean (root ingress), the coordinator's CPU seconds, the wall
time from the first update to the mean, and the leaves' CPU seconds; ratios tree/flat use the
flat baseline measured in the same run. Process start-up (once per run, not per round) is
excluded from the round and printed separately.

This machine has 2 cores shared by the coordinator and the leaves, so parallel leaves cannot
shorten the wall time much; the root-side saving (ingress bytes, coordinator CPU) is the point.
In this design every reply still reaches the coordinator, which validates it and copies it to
its leaf (shared memory): the copy is the root's remaining per-update cost.

    python bench/hierarchical.py
    python bench/hierarchical.py --sizes 1e6,1e7 --silos 8,32 --leaves 8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from fedtrain.aggregation.fixed import FixedPointMean
from fedtrain.aggregation.mean import StreamingMean
from fedtrain.aggregation.shape import parse_tree
from fedtrain.aggregation.tree import Aggregation, TreeMean

TENSORS = 8
"""Each update is split into this many tensors (a model has many)."""
BASES = 4
"""Distinct update tensors; silo i sends base i % BASES (keeps memory at BASES updates)."""


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of processes ``pids`` (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def _updates(numel: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sizes = [numel // TENSORS + (i < numel % TENSORS) for i in range(TENSORS)]
    return [
        {f"t{i}": torch.randn(n, generator=g) * 1e-2 for i, n in enumerate(sizes)}
        for _ in range(BASES)
    ]


def _round(agg, bases, silos: list[str]) -> tuple[dict[str, torch.Tensor], float, float]:
    """Fold one round; (mean, coordinator CPU s, wall s)."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i, silo in enumerate(silos):
        agg.add(bases[i % BASES], 1000.0 + 37 * i, silo)
    mean = agg.mean()
    return mean, time.process_time() - cpu0, time.perf_counter() - t0


def case(
    bases: list[dict[str, torch.Tensor]], n_silos: int, leaves: int, mode: str
) -> dict[str, float]:
    numel = sum(t.numel() for t in bases[0].values())
    silos = [f"silo{i}" for i in range(n_silos)]
    # Baseline: the faster of the flat mean on 1 thread and on every core (on a busy 2-core
    # machine torch's two threads often lose to one).
    threads = torch.get_num_threads()
    flat_runs = []
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        flat_agg = StreamingMean() if mode == "float" else FixedPointMean(32, max_silos=n_silos)
        flat_runs.append((*_round(flat_agg, bases, silos), t))
    torch.set_num_threads(threads)
    flat, flat_cpu, flat_wall, flat_threads = min(flat_runs, key=lambda r: r[2])

    spec = [n_silos // leaves + (i < n_silos % leaves) for i in range(leaves)]
    tree = Aggregation(parse_tree(spec, n_silos), silos, accumulate=mode, numel=numel)
    try:
        t0 = time.perf_counter()
        warm = tree.new_aggregator()  # starts the processes and maps the shared memory
        warm.add(bases[0], 1.0, silos[0])
        warm.mean()
        start_s = time.perf_counter() - t0
        assert tree.processes is not None
        pids = tree.processes.pids
        leaf_cpu0 = _cpu_s(pids)
        agg = tree.new_aggregator()
        out, tree_cpu, tree_wall = _round(agg, bases, silos)
        leaf_cpu = _cpu_s(pids) - leaf_cpu0
        assert isinstance(agg, TreeMean)
        report = agg.report()
    finally:
        tree.close()
    assert flat is not None and out is not None
    if mode == "int64":
        assert all(torch.equal(out[k], flat[k]) for k in flat), "int64 tree is not bitwise flat"
    err = max(float((out[k] - flat[k]).abs().max()) for k in flat)
    return {
        "flat_ingress": n_silos * numel * 4,
        "tree_ingress": report["tree_root_ingress_bytes"],
        "flat_cpu": flat_cpu,
        "tree_cpu": tree_cpu,
        "flat_wall": flat_wall,
        "tree_wall": tree_wall,
        "leaf_cpu": leaf_cpu,
        "start_s": start_s,
        "combine_s": report["tree_combine_s"],
        "err": err,
        "flat_threads": flat_threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7,5e7", help="values per update, comma-separated")
    ap.add_argument("--silos", default="8,32,64", help="silo counts, comma-separated")
    ap.add_argument("--leaves", type=int, default=4, help="leaf processes under the root")
    ap.add_argument("--modes", default="float,int64", help="accumulation modes")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    silo_counts = [int(s) for s in args.silos.split(",")]
    modes = args.modes.split(",")
    print(
        f"{torch.get_num_threads()} torch threads at the coordinator, 1 per leaf; "
        f"{args.leaves} leaves; {os.cpu_count()} cores",
        flush=True,
    )
    head = (
        f"{'mode':6} {'silos':>5} {'values':>6} | {'root ingress MB':>17} {'ratio':>6} | "
        f"{'coord CPU s':>13} {'ratio':>6} | {'wall s':>13} {'ratio':>6} | "
        f"{'leaf CPU s':>10} {'start s':>7} {'max |diff|':>10} {'flat thr':>8}"
    )
    print(head)
    t_all = time.perf_counter()
    for numel in sizes:
        bases = _updates(numel)
        for mode in modes:
            for n in silo_counts:
                r = case(bases, n, min(args.leaves, n), mode)
                print(
                    f"{mode:6} {n:5d} {numel / 1e6:5.0f}M | "
                    f"{r['flat_ingress'] / 1e6:8.0f}>{r['tree_ingress'] / 1e6:8.0f} "
                    f"{r['tree_ingress'] / r['flat_ingress']:6.3f} | "
                    f"{r['flat_cpu']:6.2f}>{r['tree_cpu']:6.2f} "
                    f"{r['tree_cpu'] / r['flat_cpu']:6.2f} | "
                    f"{r['flat_wall']:6.2f}>{r['tree_wall']:6.2f} "
                    f"{r['tree_wall'] / r['flat_wall']:6.2f} | "
                    f"{r['leaf_cpu']:10.2f} {r['start_s']:7.2f} {r['err']:10.2e} "
                    f"{r['flat_threads']:8d}",
                    flush=True,
                )
    print(f"\n(total {time.perf_counter() - t_all:.0f} s; a>b = flat>tree; ratio = tree/flat)")


if __name__ == "__main__":
    main()
