"""`fedtrain data prepare` at scale: peak memory flat in corpus size, throughput against the
tokenizer's own `encode_batch`, and training memory flat in corpus size — all in one run.

Corpora are made in a temp dir from the KJV: its 1,189 chapters shuffled and repeated until the
size is reached, written as jsonl files of 64 MB (one chapter per line). The tokenizer is a
4096-token byte-level BPE trained on the KJV, given with --tokenizer.

- Peak RSS of `fedtrain data prepare` (the whole process tree, sampled every 0.1 s, summed
  over processes: shared pages counted twice, so an upper bound) for 1 GB and 100 MB.
- Throughput: tokens/s of preparing the large corpus (the whole command, start-up included)
  against the bare baseline: the same documents already in memory, split over the same number
  of processes, each running the tokenizer's `encode_batch` on batches of ~1 MB of text (time
  from the first process's start of encoding to the last one's end).
- Training: peak RSS (ru_maxrss) of `fedtrain simulate` (tiny model, 2 silos, 1 round) whose
  silos train from the 1 GB corpus's shards, against the same run from a 10 MB corpus's.

    python bench/data_prepare.py            # ~12 min on 2 CPU cores
    python bench/data_prepare.py --gb 0.3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKERS = 2
FILE_BYTES = 64 << 20


def _chapters() -> list[str]:
    from fedtrain.data import kjv_documents

    return [d.text for d in kjv_documents()]


def make_corpus(root: Path, target: int, seed: int) -> Path:
    """jsonl files of KJV chapters, shuffled per pass, until ``target`` bytes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    chapters = [json.dumps({"text": t}) + "\n" for t in _chapters()]
    written, k = 0, 0
    f = (root / f"part-{k:04d}.jsonl").open("w")
    while written < target:
        rng.shuffle(chapters)
        for line in chapters:
            f.write(line)
            written += len(line)
            if f.tell() >= FILE_BYTES:
                f.close()
                k += 1
                f = (root / f"part-{k:04d}.jsonl").open("w")
            if written >= target:
                break
    f.close()
    return root


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall s, peak RSS bytes of the command's process tree)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _tree_rss(p.pid))
        time.sleep(0.1)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr.read().decode()[-2000:]}")
    return wall, peak


def prepare(src: Path, out: Path, tok: Path) -> tuple[float, int, dict]:
    cmd = [
        sys.executable,
        "-m",
        "fedtrain.cli.main",
        "data",
        "prepare",
        str(src),
        "--out",
        str(out),
        "--tokenizer",
        str(tok),
        "--workers",
        str(WORKERS),
        "-q",
    ]
    wall, peak = run_measured(cmd)
    return wall, peak, json.loads((out / "index.json").read_text())


def _bare_worker(args: tuple[str, list[str], int]) -> tuple[int, float, float]:
    """Load every WORKERS-th document of the files (not timed), then time ``encode_batch`` over
    them in batches of ~1 MB of text: (tokens, start, end) on the wall clock."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from fedtrain.data.tokenizer import load_tokenizer

    tok_path, files, part = args
    tok = load_tokenizer(Path(tok_path))
    texts, k = [], 0
    for f in files:
        for line in open(f):
            if k % WORKERS == part:
                texts.append(json.loads(line)["text"])
            k += 1
    t0 = time.time()
    n, batch, size = 0, [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= 1 << 20:
            n += sum(len(x) for x in tok.encode_batch(batch))  # type: ignore[attr-defined]
            batch, size = [], 0
    if batch:
        n += sum(len(x) for x in tok.encode_batch(batch))  # type: ignore[attr-defined]
    return n, t0, time.time()


def bare_throughput(src: Path, tok: Path) -> float:
    """Tokens/s of ``encode_batch`` alone over the corpus's documents in WORKERS processes,
    from the first process's start of encoding to the last one's end."""
    import multiprocessing as mp

    files = [str(f) for f in sorted(src.glob("*.jsonl"))]
    with mp.get_context("spawn").Pool(WORKERS) as pool:
        out = pool.map(_bare_worker, [(str(tok), files, i) for i in range(WORKERS)])
    n = sum(o[0] for o in out)
    return n / (max(o[2] for o in out) - min(o[1] for o in out))


def train_rss(prepared: Path, run_dir: Path) -> int:
    """ru_maxrss (bytes) of a short `fedtrain simulate` whose 2 silos train from ``prepared``."""
    sets = [
        "model.preset=tiny",
        "data.silos=2",
        "run.rounds=2",
        "train.inner_steps=20",
        "train.batch_size=8",
        "train.seq_len=128",
        "run.eval_batches=4",
        "run.token_budget=0",
        "round.min_silos=1",
        "simulation.profiles=[{count=2}]",
        f"data.silo_data.silo0='{prepared}'",
        f"data.silo_data.silo1='{prepared}'",
    ]
    code = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(p.returncode)\n"
    )
    cmd = [
        sys.executable,
        "-c",
        code,
        sys.executable,
        "-m",
        "fedtrain.cli.main",
        "simulate",
        "--run-dir",
        str(run_dir),
        "--quiet",
    ]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"simulate failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the large corpus (GB)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    root = Path(tempfile.mkdtemp(prefix="fedtrain-bench-data-"))
    os.environ["FEDTRAIN_DATA_CACHE"] = str(root / "cache")
    from fedtrain.data.tokenizer import train_bpe

    tok = root / "tokenizer.json"
    train_bpe(_chapters(), 4096, special_tokens=["<|endoftext|>"]).save(tok)
    big = int(args.gb * 1e9)
    sizes = {"large": big, "100mb": 100_000_000, "10mb": 10_000_000}
    res: dict[str, dict] = {}
    for name, size in sizes.items():
        src = make_corpus(root / f"src-{name}", size, seed=len(name))
        wall, peak, index = prepare(src, root / f"prep-{name}", tok)
        res[name] = {"src": src, "wall": wall, "peak": peak, "tokens": index["tokens"]}
        print(
            f"prepare {name:6} {size / 1e6:8.0f} MB: {index['tokens'] / 1e6:7.1f}M tokens, "
            f"{wall:6.1f} s, {index['tokens'] / wall / 1e6:.2f}M tok/s, peak RSS "
            f"{peak / 1e9:.2f} GB",
            flush=True,
        )
    bare = bare_throughput(res["large"]["src"], tok)
    ours = res["large"]["tokens"] / res["large"]["wall"]
    print(
        f"bare encode_batch ({WORKERS} processes, same {args.gb:g} GB): {bare / 1e6:.2f}M tok/s; "
        f"prepare {ours / 1e6:.2f}M tok/s = {ours / bare:.2f}x",
        flush=True,
    )
    rss_big = train_rss(root / "prep-large", root / "run-large")
    rss_small = train_rss(root / "prep-10mb", root / "run-10mb")
    print(
        f"simulate from shards: peak RSS {rss_big / 1e9:.2f} GB ({args.gb:g} GB corpus) vs "
        f"{rss_small / 1e9:.2f} GB (10 MB) = {rss_big / rss_small:.3f}x"
    )
    out = {
        "throughput_vs_bare": round(ours / bare, 3),
        "prepare_tokens_per_s": round(ours),
        "bare_tokens_per_s": round(bare),
        "peak_rss_gb_1gb": round(res["large"]["peak"] / 1e9, 3),
        "peak_rss_gb_100mb": round(res["100mb"]["peak"] / 1e9, 3),
        "large_corpus_gb": args.gb,
        "train_rss_gb_large": round(rss_big / 1e9, 3),
        "train_rss_gb_10mb": round(rss_small / 1e9, 3),
        "train_rss_ratio": round(rss_big / rss_small, 3),
    }
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
