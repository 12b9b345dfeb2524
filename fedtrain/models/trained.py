"""A run's trained model, loaded back from its directory: for evaluation, sampling and export.

The weights are the run's final ``model.safetensors``, or any committed round's global weights
that the run store still holds (round 0: the initial weights); a run still going has no final
file yet, and its newest committed round is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtrain.config import Config
from fedtrain.data.tokenizer import Tokenizer, eod_id, load_tokenizer
from fedtrain.models.evaluate import evaluate_loss
from fedtrain.models.llama import Llama
from fedtrain.models.presets import PRESETS, ModelShape

__all__ = ["TrainedModel", "evaluate_on", "generate", "load_trained"]


@dataclass(slots=True)
class TrainedModel:
    run_dir: Path
    cfg: Config
    shape: ModelShape
    tokenizer: Tokenizer
    tokenizer_path: Path
    model: Llama
    round: int | None
    """The committed round the weights are from; None: the final ``model.safetensors``."""

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _store(cfg: Config, run_dir: Path) -> Any:
    from fedtrain.storage.runstore import RunStore

    return RunStore(run_dir, url=cfg.storage.url)


def round_weights(cfg: Config, run_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    """Global weights committed at round ``rnd`` (0: the initial ones), from the run store."""
    store = _store(cfg, run_dir)
    committed = store.index.committed_rounds()
    if rnd == 0:
        blob = store.index.get_meta("initial_global_blob")
    elif rnd not in committed:
        last = committed[-1] if committed else 0
        raise ValueError(f"round {rnd} was not committed in {run_dir} (rounds 1..{last})")
    else:
        blob = store.index.round_state(rnd).get("global_blob")
    if not isinstance(blob, str):
        kept = [r for r in committed if "global_blob" in store.index.round_state(r)]
        raise ValueError(
            f"the weights of round {rnd} are no longer kept (kept: rounds {kept or 'none'} "
            "and 0); set storage.keep_weights = K to keep every K-th round's weights"
        )
    return dict(store.get_tensors(blob)[0])


def load_trained(run_dir: Path, rnd: int | None = None) -> TrainedModel:
    """The model of the run in ``run_dir``: final weights, or those of round ``rnd``."""
    from safetensors.torch import load_file

    from fedtrain.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise ValueError(f"{run_dir} is not a run directory (config.toml missing)")
    cfg = load_config(run_dir / "config.toml")
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.exists():
        raise ValueError(f"{run_dir} has no tokenizer.json (the run never started training)")
    tok = load_tokenizer(tok_path)
    final = run_dir / "model.safetensors"
    if rnd is None and final.exists():
        weights = load_file(str(final))
    else:
        if rnd is None:
            committed = _store(cfg, run_dir).index.committed_rounds()
            if not committed:
                raise ValueError(f"{run_dir} has no final weights and no committed round yet")
            rnd = committed[-1]
        weights = round_weights(cfg, run_dir, rnd)
    shape = PRESETS[cfg.model.preset]
    model = Llama(shape, tok.vocab_size, tie_embeddings=cfg.model.tie_embeddings)
    missing = set(dict(model.named_parameters())) - set(weights)
    if missing:
        raise ValueError(f"weights in {run_dir} lack {sorted(missing)[:3]}")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # shapes or names that are not this run's model
        raise ValueError(f"weights in {run_dir} do not fit the run's model: {e}") from None
    model.eval()
    return TrainedModel(run_dir, cfg, shape, tok, tok_path, model, rnd)


def evaluate_on(tm: TrainedModel, windows: torch.Tensor) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity on ``(N, T + 1)`` windows."""
    loss = evaluate_loss(tm.model, windows, tm.cfg.train.batch_size)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "windows": int(windows.shape[0]),
        "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
    }


@torch.no_grad()
def generate(
    tm: TrainedModel,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = 50,
    seed: int = 0,
) -> Iterator[str]:
    """Sample a continuation of ``prompt``, yielding text as tokens are produced.

    Deterministic for a seed (its own generator; greedy when ``temperature`` is 0). Stops at
    the tokenizer's end-of-document token. The context is the last ``max_seq_len`` tokens.
    """
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    tok, model = tm.tokenizer, tm.model
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty (no tokens); give some text to continue")
    gen = torch.Generator().manual_seed(seed)
    stop = eod_id(tok)
    out: list[int] = []
    shown = ""
    window = tm.shape.max_seq_len
    for _ in range(max_new_tokens):
        context = torch.tensor([(ids + out)[-window:]], dtype=torch.long)
        logits = model(context)[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cut = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cut, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if nxt == stop:
            break
        out.append(nxt)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown) :]
            shown = text
    text = tok.decode(out)
    if len(text) > len(shown):
        yield text[len(shown) :]
