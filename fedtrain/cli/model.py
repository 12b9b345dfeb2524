"""``fedtrain export`` / ``eval`` / ``generate``: use the model a run trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["eval_run", "export", "generate"]

RunDirArg = Annotated[Path, typer.Argument(help="The run directory.")]
RoundOpt = Annotated[
    Optional[int],
    typer.Option(
        "--round",
        help="Weights of this committed round (0: the initial ones), if the store still keeps "
        "them. Default: the final weights (or the newest round of a run still going).",
    ),
]


def export(
    run_dir: RunDirArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (created).")],
    rnd: RoundOpt = None,
) -> None:
    """Write a Hugging Face Llama directory (config, safetensors, tokenizer) that
    ``transformers`` loads with ``AutoModelForCausalLM.from_pretrained``."""
    with user_errors(ValueError, OSError):
        from fedtrain.models.hub import write_hf_model
        from fedtrain.models.trained import load_trained

        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not empty; choose a new --out directory")
        tm = load_trained(run_dir, rnd)
        weights = {n: p.detach() for n, p in tm.model.named_parameters()}
        extra = {"run_dir": str(run_dir.resolve()), "round": tm.round, "run": tm.cfg.run.name}
        write_hf_model(out, weights, tm.shape, tm.tokenizer, tm.cfg.model.tie_embeddings, extra)
        which = "final weights" if tm.round is None else f"round {tm.round}"
        typer.echo(f"{out}: Llama, {tm.parameters / 1e6:.2f}M parameters ({which})")


def eval_run(
    run_dir: RunDirArg,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            help="Text to score instead of the run's eval split: a file, glob, directory, "
            "fsspec URL or prepared directory (tokenised with the run's tokenizer).",
        ),
    ] = None,
    rnd: RoundOpt = None,
    windows: Annotated[
        Optional[int],
        typer.Option(
            "--windows",
            help="Windows of train.seq_len tokens, evenly spaced over --data "
            "(default: run.eval_batches).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Loss (nats per token) and perplexity of the run's model."""
    with user_errors(ValueError, OSError):
        from fedtrain.data.prepare import eval_split
        from fedtrain.data.prepared import open_tokens
        from fedtrain.data.stream import eval_windows
        from fedtrain.models.trained import evaluate_on, load_trained

        if windows is not None and windows < 1:
            raise ValueError(f"--windows must be >= 1, got {windows}")
        tm = load_trained(run_dir, rnd)
        count = windows or tm.cfg.run.eval_batches
        if data is None:
            batch = eval_split(tm.cfg, tm.tokenizer, count)
        else:
            tokens = open_tokens(data, tm.tokenizer_path, progress=not as_json).train
            batch = eval_windows(tokens, count, tm.cfg.train.seq_len)
        result = {
            "run_dir": str(run_dir),
            "round": tm.round,
            "data": data or "eval split",
            **evaluate_on(tm, batch),
        }
        if as_json:
            typer.echo(json.dumps(result))
        else:
            which = "final" if tm.round is None else f"round {tm.round}"
            typer.echo(
                f"{which} weights on {result['data']}: loss {result['loss']:.4f}, "
                f"perplexity {result['perplexity']:.2f} ({result['tokens']:,} tokens)"
            )


def generate(
    run_dir: RunDirArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0: greedy (most likely token).")
    ] = 0.8,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Sample among the K most likely (0: all).")
    ] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same text.")] = 0,
    rnd: RoundOpt = None,
) -> None:
    """Continue a prompt with the run's model, printing the text as it is sampled."""
    with user_errors(ValueError, OSError):
        from fedtrain.models.trained import generate as sample
        from fedtrain.models.trained import load_trained

        tm = load_trained(run_dir, rnd)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in sample(tm, prompt, max_new_tokens, temperature, top_k or None, seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
