"""Deployment overheads on one machine: `fedtrain server` + 2 `fedtrain client` silos over the
real Flower SuperLink/SuperNode (HTTP on 127.0.0.1), one inner step per round so the round time
is almost all transport.

Prints, from the same run:
- round-trip latency floor: round time minus the slowest silo's compute;
- wire bytes through the fleet proxy vs fedtrain payload bytes, per direction (the proxy sees
  every byte a silo's link carries: Flower chunking, headers, polling);
- peak resident memory of each process as a multiple of one payload (fp32 model update).

    python bench/deploy.py                      # small preset: ~43 MB payloads
    python bench/deploy.py --preset tiny        # ~3.3 MB payloads
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtrain.runtime.children import free_port, peak_rss_bytes, pids_matching  # noqa: E402
from tests.deploy.helpers import Proc, events, metrics, wait_for  # noqa: E402

CONFIG = """
[run]
name = "bench-deploy"
seed = 0
rounds = {rounds}
eval_batches = 4
[model]
preset = "{preset}"
[data]
silos = 2
tokenizer = "byte"
max_chars = 400000
[train]
inner_steps = 1
batch_size = 4
seq_len = 32
[round]
min_silos = 2
timeout_s = 300
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    cfg = root / "run.toml"
    cfg.write_text(CONFIG.format(rounds=args.rounds, preset=args.preset))
    port = free_port()
    run = root / "run"
    server = Proc(
        ["server", "-c", str(cfg), "--run-dir", str(run), "--address", f"127.0.0.1:{port}"],
        root / "server.log",
    )
    procs = [server]
    wait_for(lambda: (run / "address").exists(), 60, "the coordinator")
    for silo in ("silo0", "silo1"):
        procs.append(
            Proc(
                [
                    "client",
                    "--silo",
                    silo,
                    "--server",
                    f"127.0.0.1:{port}",
                    "--work-dir",
                    str(root / silo),
                    "--threads",
                    "1",
                ],
                root / f"{silo}.log",
            )
        )
    # long-lived Flower processes: sample their peak memory just before the run ends
    peaks: dict[str, int] = {}

    def sample() -> bool:
        for name, marker in (
            ("superlink", str(run / "flwr" / "superlink.db")),
            ("supernode", f'socket="{root / "silo0"}'),
        ):
            for pid in pids_matching(marker):
                peak = peak_rss_bytes(pid) or 0
                peaks[name] = max(peaks.get(name, 0), peak)
        return not server.alive()

    wait_for(sample, 1800, "the run to finish", every=1.0)
    for p in reversed(procs):
        p.stop()
    if server.p.returncode != 0:
        print(server.text()[-3000:])
        raise SystemExit("the run failed")
    s = json.loads((run / "summary.json").read_text())
    traffic = json.loads((run / "fleet-traffic.json").read_text())
    rows = metrics(run)
    reports = events(run, "silo_report")
    compute = {
        r: max(e["compute_s"] for e in reports if e["round"] == r)
        for r in {e["round"] for e in reports}
    }
    floor = [m["round_time_s"] - compute[m["round"]] for m in rows[1:]]  # round 1 carries the join
    payload = s["max_payload_bytes"]
    up_payload = s["bytes_up"]
    down_payload = s["bytes_down"] + s["bytes_join"] + s["deployment"]["resync_bytes"]
    print(
        f"preset {args.preset}: {s['parameters'] / 1e6:.2f}M params, "
        f"payload {payload / 1e6:.1f} MB, {len(rows)} rounds"
    )
    print(
        f"round time {statistics.median(m['round_time_s'] for m in rows[1:]):.2f}s median, "
        f"latency floor (round - slowest compute) {statistics.median(floor):.2f}s median "
        f"(min {min(floor):.2f}s)"
    )
    print(
        f"wire/payload up   {traffic['bytes_in'] / up_payload:.4f} "
        f"({traffic['bytes_in'] / 1e6:.1f} MB through the proxy for "
        f"{up_payload / 1e6:.1f} MB of updates)"
    )
    print(
        f"wire/payload down {traffic['bytes_out'] / down_payload:.4f} "
        f"({traffic['bytes_out'] / 1e6:.1f} MB for {down_payload / 1e6:.1f} MB of weights/updates)"
    )
    print(f"requests through the proxy {traffic['requests']}")
    mem = {
        "coordinator (ServerApp)": s["deployment"]["coordinator_peak_rss"],
        "mailbox ClientApp": max(e["mailbox_peak_rss"] or 0 for e in reports),
        "trainer daemon (rank 0)": max(e["daemon_peak_rss"] or 0 for e in reports),
        **{f"flower-{k}": v for k, v in peaks.items()},
    }
    for name, peak in mem.items():
        print(f"peak RSS {name:26s} {peak / 1e6:8.1f} MB = {peak / payload:5.2f}x payload")


if __name__ == "__main__":
    main()
