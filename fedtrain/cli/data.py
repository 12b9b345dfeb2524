"""``fedtrain data prepare``: a silo's text into memory-mappable token shards, resumably."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from fedtrain.cli.errors import user_errors

if TYPE_CHECKING:
    from fedtrain.data.writer import PrepareSummary

__all__ = ["data_app"]

data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)


@data_app.command("prepare")
def prepare(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files, globs, directories or fsspec URLs: .txt (one document per file), "
            ".jsonl, .jsonl.gz, .jsonl.zst, .parquet."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the shards to.")],
    tokenizer: Annotated[
        Optional[Path],
        typer.Option("--tokenizer", help="A Hugging Face tokenizer.json to use (e.g. GPT-2's)."),
    ] = None,
    train_bpe: Annotated[
        int,
        typer.Option(
            "--train-bpe",
            help="Train a byte-level BPE of this vocabulary size on a sample of the sources.",
        ),
    ] = 0,
    bpe_sample_bytes: Annotated[
        int,
        typer.Option("--bpe-sample-bytes", help="Text sampled for --train-bpe (bytes)."),
    ] = 256 << 20,
    byte: Annotated[
        bool, typer.Option("--byte", help="Bytes as tokens (vocab 256 + end-of-document).")
    ] = False,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", help="Tokenising processes (default: one per CPU core)."),
    ] = None,
    eval_fraction: Annotated[
        float,
        typer.Option("--eval-fraction", help="Fraction of documents held out (whole documents)."),
    ] = 0.01,
    field: Annotated[
        str, typer.Option("--field", help="The text field of jsonl records / parquet rows.")
    ] = "text",
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first bad record instead of counting it.")
    ] = False,
    shard_tokens: Annotated[
        int,
        typer.Option("--shard-tokens", help="Training tokens per shard (the unit of resuming)."),
    ] = 1 << 26,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Tokenise SOURCES into shards in --out; killed and run again, it continues."""
    from fedtrain.data.corpus import CorpusError
    from fedtrain.data.shards import ShardError
    from fedtrain.data.writer import PrepareError

    chosen = sum([tokenizer is not None, train_bpe > 0, byte])
    with user_errors(CorpusError, PrepareError, ShardError, ValueError, OSError):
        if chosen != 1:
            raise ValueError("choose one tokenizer: --tokenizer FILE, --train-bpe VOCAB or --byte")
        if workers is not None and workers < 0:
            raise ValueError(f"--workers must be >= 0, got {workers}")
        if shard_tokens < 1:
            raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
        if train_bpe and not 300 <= train_bpe <= 1 << 20:
            raise ValueError(f"--train-bpe must be in [300, 1048576], got {train_bpe}")
        from fedtrain.data.prepared import TokenizerChoice, prepare_sources

        choice = TokenizerChoice(
            file=tokenizer, bpe_vocab=train_bpe, bpe_sample_bytes=bpe_sample_bytes, byte=byte
        )
        s = prepare_sources(
            list(sources),
            out,
            choice,
            workers=workers,
            eval_fraction=eval_fraction,
            field=field,
            strict=strict,
            shard_tokens=shard_tokens,
            progress=not quiet,
        )
    _report(out, s)


def _report(out: Path, s: PrepareSummary) -> None:
    """The summary lines of a preparation."""
    if s.already_done:
        typer.echo(f"{out}: already prepared")
    elif s.resumed_shards:
        typer.echo(f"resumed after {s.resumed_shards} finished shard(s)")
    rate = s.tokens / s.seconds / 1e6 if s.seconds > 0 else 0.0
    typer.echo(
        f"{out}: {s.tokens:,} training tokens in {s.documents:,} documents, {s.shards} shard(s); "
        f"eval {s.eval_tokens:,} tokens in {s.eval_documents:,} documents"
        + (f"; {s.seconds:.1f} s ({rate:.2f}M tokens/s)" if s.seconds > 0 else "")
    )
    if s.bad_records:
        typer.echo(f"{s.bad_records} bad record(s) skipped:")
        for line in s.bad_first:
            typer.echo(f"  {line}")
        if s.bad_records > len(s.bad_first):
            typer.echo(f"  ... and {s.bad_records - len(s.bad_first)} more")
    typer.echo(f'use it: [data.silo_data] NAME = "{out}", or fedtrain client --data {out}')
