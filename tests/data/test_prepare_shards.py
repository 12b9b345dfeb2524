"""`fedtrain data prepare`: formats, exact tokens, resume after SIGKILL, bad records, corrupted
shards, and training from memory-mapped shards."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedtrain.cli.main import app
from fedtrain.data import TokenStream, kjv_documents
from fedtrain.data.prepared import TokenizerChoice, open_tokens, prepare_sources
from fedtrain.data.shards import ShardedTokens, ShardError, TokenShards
from fedtrain.data.tokenizer import eod_id, load_tokenizer, train_bpe
from fedtrain.data.writer import PrepareError

DOCS = [d.text for d in kjv_documents()[:120]]


def _split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    stride = round(1 / fraction)
    ev = [d for i, d in enumerate(docs) if i % stride == stride // 2]
    tr = [d for i, d in enumerate(docs) if i % stride != stride // 2]
    return tr, ev


def _all(seq: ShardedTokens) -> list[int]:
    return seq.read(0, len(seq)).tolist()


def _write_sources(root: Path, docs: list[str]) -> list[str]:
    """The same documents spread over every supported format, in this order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    a, b, c, d, e = (docs[i::5] for i in range(5))
    (root / "a.txt").write_text(a[0])  # one document per .txt file
    lines = lambda ds: "".join(json.dumps({"text": t}) + "\n" for t in ds)  # noqa: E731
    (root / "b.jsonl").write_text(lines(b))
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.write(lines(c))
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(d).encode()))
    pq.write_table(
        pa.table({"text": e, "n": list(range(len(e)))}), root / "e.parquet", row_group_size=7
    )
    order = [a[0], *b, *c, *d, *e]
    return [
        str(root / n) for n in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst", "e.parquet")
    ], order


def test_byte_shards_decode_to_the_documents_of_every_format(tmp_path):
    srcs, order = _write_sources(tmp_path / "src", DOCS[:50])
    s = prepare_sources(
        srcs,
        tmp_path / "out",
        TokenizerChoice(byte=True),
        workers=0,
        eval_fraction=0.1,
        shard_tokens=20_000,
        progress=False,
    )
    shards = TokenShards.open(tmp_path / "out")
    assert s.shards == len(shards.index["shards"]) > 1
    assert shards.index["dtype"] == "uint16" and shards.index["eod"] == 256
    train, ev = _split(order, 0.1)
    for seq, want in ((shards.train, train), (shards.eval, ev)):
        ids = np.array(_all(seq))
        cuts = np.flatnonzero(ids == 256)
        assert len(cuts) == len(want)  # one end-of-document token after each document
        parts = np.split(ids, cuts + 1)[:-1]
        assert [bytes(p[:-1].astype(np.uint8)).decode() for p in parts] == want
    idx = shards.index
    assert idx["tokens"] == len(shards.train) + len(shards.eval)
    assert idx["documents"] == len(order) == idx["train"]["documents"] + idx["eval"]["documents"]
    assert sum(x["documents"] for x in idx["shards"]) == len(train)
    assert [x["url"].rsplit("/", 1)[1] for x in idx["sources"]] == [Path(p).name for p in srcs]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(DOCS, 600, special_tokens=["<|endoftext|>"]).save(path)
    return path


def test_bpe_shards_equal_tokenising_each_document(tmp_path, bpe_file):
    srcs, order = _write_sources(tmp_path / "src", DOCS[:60])
    prepare_sources(
        srcs,
        tmp_path / "out",
        TokenizerChoice(file=bpe_file),
        workers=2,
        eval_fraction=0.05,
        shard_tokens=5_000,
        progress=False,
    )
    shards = TokenShards.open(tmp_path / "out")
    tok = load_tokenizer(bpe_file)
    eod = eod_id(tok)
    assert eod == 0
    train, ev = _split(order, 0.05)
    for seq, want in ((shards.train, train), (shards.eval, ev)):
        assert _all(seq) == [i for t in want for i in [*tok.encode(t), eod]]
    counts = shards.unigram_counts(tok.vocab_size)
    assert counts.sum() == len(shards.train)
    assert (counts == np.bincount(_all(shards.train), minlength=tok.vocab_size)).all()


def test_a_large_txt_file_is_read_in_pieces_with_the_same_tokens(tmp_path, bpe_file, monkeypatch):
    import fedtrain.data.sources as sources

    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 1000)
    # Whitespace of every kind around line ends: runs before a newline, blank lines, CRLF.
    lines = "".join(DOCS[:30]).split("\n")
    ends = ["\n", "  \n", "\n\n", "\r\n", " \n\n  ", "\n"]
    text = "".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    (tmp_path / "big.txt").write_bytes(text.encode())
    llama3 = tmp_path / "llama3-like.json"
    _llama3_like_bpe(DOCS[:30]).save(str(llama3))
    for name, tok_file in (("gpt2", bpe_file), ("llama3", llama3)):
        prepare_sources(
            [str(tmp_path / "big.txt")],
            tmp_path / name,
            TokenizerChoice(file=tok_file),
            workers=0,
            eval_fraction=0.0,
            shard_tokens=3_000,
            progress=False,
        )
        shards = TokenShards.open(tmp_path / name)
        tok = load_tokenizer(tok_file)
        assert _all(shards.train) == [*tok.encode(text), 0], name
        assert shards.index["documents"] == 1 and len(shards.index["shards"]) > 1


def _llama3_like_bpe(texts: list[str]):
    """A byte-level BPE with Llama 3's pre-tokenisation pattern (punctuation joins the line
    breaks after it, digits in threes), unlike GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|end_of_text|>"],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def test_txt_without_spaces_or_line_breaks_is_still_read_in_bounded_pieces(tmp_path, monkeypatch):
    import fedtrain.data.sources as sources

    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 1000)
    text = "天地玄黄宇宙洪荒" * 2000  # 16,000 characters, 48,000 bytes, no space, no newline
    (tmp_path / "zh.txt").write_text(text)
    recs = list(sources.read_records(sources.expand_sources([str(tmp_path / "zh.txt")])))
    assert "".join(r.text for r in recs) == text and recs[-1].last
    assert len(recs) > 3 and max(len(r.text) for r in recs) <= 5 * 1000


def test_a_truncated_zstd_file_is_a_bad_record(tmp_path):
    import zstandard

    from fedtrain.data.sources import BadRecord, expand_sources, read_records

    lines = "".join(json.dumps({"text": t}) + "\n" for t in DOCS[:40]).encode()
    whole = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    recs = list(read_records(expand_sources([str(tmp_path / "cut.jsonl.zst")])))
    assert isinstance(recs[-1], BadRecord) and recs[-1].ends_file
    assert "truncated" in recs[-1].reason


def test_a_hugging_face_tokenizer_file_with_its_own_end_token(tmp_path):
    """A tokenizer.json of another kind (Unigram + Metaspace, `</s>`, as Llama-style
    checkpoints ship) is used as it is; its `</s>` ends each document."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    hf = Tokenizer(models.Unigram())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.train_from_iterator(
        DOCS,
        trainers.UnigramTrainer(
            vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"
        ),
    )
    # Its template puts <s> before every text it encodes: not into the shards.
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path / "llama-like.json"
    hf.save(str(path))
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS[:20]))
    out = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--tokenizer",
            str(path),
            "--field",
            "body",
            "--workers",
            "0",
            "--eval-fraction",
            "0",
        ],
    )
    assert out.exit_code == 0, out.output
    shards = TokenShards.open(tmp_path / "o")
    assert hf.encode("x").ids[0] == 1
    plain = [hf.encode(t, add_special_tokens=False).ids for t in DOCS[:20]]
    assert _all(shards.train) == [i for ids in plain for i in [*ids, 2]]
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == path.read_bytes()


def test_bad_records_are_counted_by_file_and_line_and_strict_stops(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = json.dumps({"text": "fine text\n"})
    (src / "a.jsonl").write_bytes(
        "\n".join([good, good, "{not json", good, json.dumps({"title": "x"}), good]).encode()
        + b"\n\xff\xfe bad bytes\n"
    )
    (src / "b.jsonl.gz").write_bytes(b"this was never gzip")  # unreadable
    (src / "c.txt").write_text("a plain document\n")
    r = CliRunner().invoke(
        app, ["data", "prepare", str(src), "--out", str(tmp_path / "o"), "--byte", "--workers", "0"]
    )
    assert r.exit_code == 0, r.output
    assert "4 bad record(s) skipped" in r.output
    for where in (
        "a.jsonl:3: invalid JSON",
        "a.jsonl:5: no string field 'text'",
        "a.jsonl:7: bytes that are not UTF-8",
        "b.jsonl.gz:0: cannot read",
    ):
        assert where in r.output
    idx = json.loads((tmp_path / "o" / "index.json").read_text())
    assert idx["bad_records"]["count"] == 4 and idx["documents"] == 5
    r = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            str(src),
            "--out",
            str(tmp_path / "s"),
            "--byte",
            "--workers",
            "0",
            "--strict",
        ],
    )
    assert r.exit_code == 2
    assert "a.jsonl:3: invalid JSON" in r.output and "--strict" in r.output


def test_sigkill_mid_prepare_then_rerun_is_byte_identical(tmp_path, bpe_file):
    src = tmp_path / "corpus.jsonl"
    with src.open("w") as f:
        for _ in range(3):
            for t in DOCS:
                f.write(json.dumps({"text": t}) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "fedtrain.cli.main",
        "data",
        "prepare",
        str(src),
        "--tokenizer",
        str(bpe_file),
        "--shard-tokens",
        "20000",
        "--workers",
        "1",
        "-q",
    ]
    ref = subprocess.run(
        [*cmd, "--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen(
        [*cmd, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    state = out / "prepare-state.json"
    while time.monotonic() < deadline and p.poll() is None:
        if state.exists() and len(json.loads(state.read_text() or "{}").get("shards", [])) >= 2:
            break
        time.sleep(0.01)
    assert p.poll() is None, "finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert not (out / "index.json").exists()
    again = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed after" in again.stdout
    names = sorted(x.name for x in (tmp_path / "ref").iterdir())
    assert names == sorted(x.name for x in out.iterdir() if x.name != "verified.json")
    for n in names:
        assert (out / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), n


class _Killed(BaseException):
    """Stands for SIGKILL at one file operation (nothing catches it)."""


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != "verified.json"}


def test_killed_at_any_file_operation_a_rerun_ends_byte_identical(tmp_path, bpe_file, monkeypatch):
    """Every rename and delete the writer makes is a kill point; from each, a rerun ends with
    the files of an uninterrupted run: counts, trailing bad records and a .txt that breaks
    inside its document included."""
    import fedtrain.data.sources as sources

    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 300)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in DOCS[:6]) + '{"broken\n{"title": 1}\n'
    )
    (src / "b.txt").write_bytes("".join(DOCS[6:9]).encode() + b"\xff tail")
    (src / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[9:12]))

    def prepare(out: Path) -> None:
        prepare_sources(
            [str(src)],
            out,
            TokenizerChoice(file=bpe_file),
            workers=0,
            eval_fraction=0.25,
            shard_tokens=1500,
            progress=False,
        )

    prepare(tmp_path / "ref")
    ref = _files(tmp_path / "ref")
    idx = json.loads(ref["index.json"])
    assert idx["bad_records"]["count"] == 3 and idx["documents"] == 10
    assert len(idx["shards"]) >= 4 and idx["eval"]["documents"] == 2
    # Documents 2 and 6 (every 4th, from the 3rd) are held out; 6 is b.txt, which ends where
    # it broke, with its end token; c.jsonl's documents follow in the training split.
    tok = load_tokenizer(bpe_file)
    shards = TokenShards.open(tmp_path / "ref")
    held = _all(shards.eval)
    first = [*tok.encode(DOCS[2]), 0]
    assert held[: len(first)] == first and held[-1] == 0 and held.count(0) == 2
    assert "".join(DOCS[6:9]).startswith(tok.decode(held[len(first) : -1]))
    tail = [i for t in DOCS[9:12] for i in [*tok.encode(t), 0]]
    assert _all(shards.train)[-len(tail) :] == tail

    real_replace, real_unlink = os.replace, os.unlink

    def kill_at(real, calls: list[int], k: int):
        def op(*a, **kw):
            calls[0] += 1
            if calls[0] == k:
                raise _Killed
            return real(*a, **kw)

        return op

    k = 0
    while True:
        k += 1
        calls = [0]
        out = tmp_path / f"kill{k}"
        with monkeypatch.context() as m:
            m.setattr(os, "replace", kill_at(real_replace, calls, k))
            m.setattr(os, "unlink", kill_at(real_unlink, calls, k))
            try:
                prepare(out)
                finished = True
            except _Killed:
                finished = False
        if finished:
            break
        prepare(out)
        assert _files(out) == ref, f"killed at file operation {k}"
        shutil.rmtree(out)
    assert k > 10


def test_a_corrupted_truncated_or_missing_shard_is_refused_by_name(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:40]))
    out = tmp_path / "o"
    prepare_sources(
        [str(tmp_path / "d.jsonl")],
        out,
        TokenizerChoice(byte=True),
        workers=0,
        shard_tokens=10_000,
        progress=False,
    )
    TokenShards.open(out)
    shard = out / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-00001.bin is corrupted"):
        TokenShards.open(out)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match="train-00001.bin is truncated"):
        TokenShards.open(out)
    shard.unlink()
    with pytest.raises(ShardError, match="train-00001.bin is missing"):
        open_tokens(str(out), out / "tokenizer.json")


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "words " * 50}) + "\n")
    src = [str(tmp_path / "d.jsonl")]
    prepare_sources(src, tmp_path / "o", TokenizerChoice(byte=True), workers=0, progress=False)
    again = prepare_sources(
        src, tmp_path / "o", TokenizerChoice(byte=True), workers=0, progress=False
    )
    assert again.already_done
    with pytest.raises(PrepareError, match="other sources or settings"):
        prepare_sources(
            src,
            tmp_path / "o",
            TokenizerChoice(byte=True),
            workers=0,
            eval_fraction=0.2,
            progress=False,
        )
    before = _files(tmp_path / "o")
    with pytest.raises(PrepareError, match="another tokenizer choice"):
        prepare_sources(src, tmp_path / "o", TokenizerChoice(bpe_vocab=300), progress=False)
    assert _files(tmp_path / "o") == before  # its tokenizer.json untouched
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\xff\xfe")
    with pytest.raises(ValueError, match="bin.json is not a tokenizer.json"):
        load_tokenizer(tmp_path / "bin.json")


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_batches_from_shards_equal_the_in_memory_batches(tmp_path, order):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60_000, size=10_007)
    files = []
    for k, part in enumerate(np.array_split(tokens, 7)):  # windows cross shard boundaries
        f = tmp_path / f"s{k}.bin"
        part.astype(np.uint16).tofile(f)
        files.append(f)
    mem = TokenStream(torch.from_numpy(tokens), 3, "silo0", order, accum=2)
    mapped = TokenStream(ShardedTokens(files, "uint16"), 3, "silo0", order, accum=2)
    for step in (0, 1, 17, 400):
        for micro in (0, 1):
            want, got = mem.batch(step, micro, 8, 32), mapped.batch(step, micro, 8, 32)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_sequential_order_reads_each_token_once_per_epoch():
    tokens = torch.arange(1 + 16 * 10)  # 16 windows of 10
    s = TokenStream(tokens, 0, "x", "sequential", accum=2)
    seen = [s.batch(step, m, 4, 10)[0][:, 0].tolist() for step in range(2) for m in range(2)]
    assert sorted(i for b in seen for i in b) == list(range(0, 160, 10))
    assert s.epoch(2, 4, 10) == 1.0
    assert torch.equal(s.batch(2, 0, 4, 10)[0], s.batch(0, 0, 4, 10)[0])  # epoch 2 starts over


def test_raw_silo_sources_are_prepared_once_into_the_cache(tmp_path, bpe_file, monkeypatch):
    monkeypatch.setenv("FEDTRAIN_DATA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:10]))
    first = open_tokens(str(tmp_path / "d.jsonl"), bpe_file)
    stamp = (first.root / "index.json").stat().st_mtime_ns
    second = open_tokens(str(tmp_path / "d.jsonl"), bpe_file)
    assert second.root == first.root and (second.root / "index.json").stat().st_mtime_ns == stamp
    tok = load_tokenizer(bpe_file)
    assert _all(second.train) == [i for t in DOCS[:10] for i in [*tok.encode(t), 0]]
    other = tmp_path / "byte.json"
    other.write_text('{"type": "byte"}\n')
    with pytest.raises(PrepareError, match="another tokenizer"):
        open_tokens(str(first.root), other)


def test_simulate_trains_from_prepared_directories_with_their_tokenizer(tmp_path, bpe_file):
    from fedtrain.config import config_from_dict
    from fedtrain.simulation.runner import simulate
    from tests.conftest import tiny_config_dict

    dirs = {}
    for k, name in enumerate(("silo0", "silo1")):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[k * 40 : k * 40 + 40]))
        dirs[name] = str(tmp_path / f"prep-{name}")
        prepare_sources(
            [str(src)], Path(dirs[name]), TokenizerChoice(file=bpe_file), workers=0, progress=False
        )
    cfg = config_from_dict(
        tiny_config_dict(
            run={"rounds": 2, "eval_batches": 4},
            data={"silo_data": dirs, "order": "sequential"},
            train={"inner_steps": 4},
        )
    )
    summary = simulate(cfg, tmp_path / "run", quiet=True, step_time_s=0.01)
    assert summary["vocab_size"] == 600  # the prepared directories' tokenizer, not bytes
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == bpe_file.read_bytes()
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    epochs = {e["silo"]: e["epoch"] for e in events if e.get("event") == "reply"}
    assert set(epochs) == {"silo0", "silo1"}
    for silo, got in epochs.items():  # after round 2: 8 steps of 4 windows of 32 tokens
        windows = (len(TokenShards.open(dirs[silo]).train) - 1) // 32
        assert got == pytest.approx(8 * 4 / windows)


def test_a_deployed_silo_holds_out_its_prepared_eval_split(tmp_path, bpe_file):
    from fedtrain.config import config_from_dict
    from fedtrain.data.prepare import silo_data
    from tests.conftest import tiny_config_dict

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:60]))
    prep = tmp_path / "prep"
    prepare_sources(
        [str(tmp_path / "d.jsonl")],
        prep,
        TokenizerChoice(file=bpe_file),
        workers=0,
        eval_fraction=0.1,
        progress=False,
    )
    cfg = config_from_dict(tiny_config_dict(run={"eval_batches": 8}))
    sd = silo_data(cfg, "silo0", bpe_file, str(prep))
    shards = TokenShards.open(prep)
    assert _all(sd.tokens) == _all(shards.train)  # all of the training split is trained on
    ev = _all(shards.eval)
    for row in sd.heldout.tolist():  # windows of the eval split, never of training text
        assert any(ev[i : i + len(row)] == row for i in range(len(ev) - len(row) + 1))
    raw = silo_data(cfg, "silo0", bpe_file, str(tmp_path / "d.jsonl"))  # no eval split: 5% cut
    whole = _all(open_tokens(str(tmp_path / "d.jsonl"), bpe_file).train)
    cut = len(whole) - max(len(whole) // 20, 32 + 1)
    assert _all(raw.tokens) == whole[:cut]
    assert raw.heldout[-1].tolist() == whole[-33:]


def test_client_data_check_takes_prepared_and_raw_directories(tmp_path):
    from fedtrain.client.launcher import check_data

    srcs, _ = _write_sources(tmp_path / "src", DOCS[:10])
    assert check_data(str(tmp_path / "src")) == len(srcs)
    prepare_sources(
        srcs,
        tmp_path / "o",
        TokenizerChoice(byte=True),
        workers=0,
        shard_tokens=10_000,
        progress=False,
    )
    assert check_data(str(tmp_path / "o")) == len(TokenShards.open(tmp_path / "o").index["shards"])
    (tmp_path / "o" / "train-00000.bin").unlink()
    with pytest.raises(ValueError, match="train-00000.bin is missing"):
        check_data(str(tmp_path / "o"))
