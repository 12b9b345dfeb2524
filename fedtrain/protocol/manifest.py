"""The run manifest: what a joining silo must agree with before it trains.

The coordinator sends it (with the tokenizer file) to every silo that connects; the silo checks
it against its own installation and refuses, naming the mismatch, when they differ. The config
travels as TOML text so the silo builds exactly the model, data stream and codec the coordinator
planned for; its hash is re-computed on arrival.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

import fedtrain
from fedtrain.config import Config, config_sha256
from fedtrain.models.presets import PRESETS

__all__ = ["build_manifest", "check_manifest"]


def _codec(cfg: Config) -> dict[str, Any]:
    t = cfg.transport
    return {
        "codec": t.codec,
        **({"chunk": t.chunk, "keep": t.keep} if t.sparse else {"block_size": t.block_size}),
        "stochastic_rounding": t.stochastic_rounding,
        "error_feedback": t.error_feedback,
        "sign_updates": t.sign_updates,
    }


def _model(cfg: Config, vocab_size: int) -> dict[str, Any]:
    return {
        "preset": cfg.model.preset,
        "shape": asdict(PRESETS[cfg.model.preset]),
        "vocab_size": vocab_size,
        "tie_embeddings": cfg.model.tie_embeddings,
    }


def build_manifest(
    cfg: Config, run_id: str, config_toml: str, tokenizer: bytes, vocab_size: int
) -> dict[str, Any]:
    return {
        "fedtrain_version": fedtrain.__version__,
        "run_id": run_id,
        "config_sha256": config_sha256(cfg),
        "config_toml": config_toml,
        "model": _model(cfg, vocab_size),
        "tokenizer_sha256": hashlib.sha256(tokenizer).hexdigest(),
        "transport": _codec(cfg),
    }


def check_manifest(manifest: dict[str, Any], tokenizer: bytes) -> list[str]:
    """Every way ``manifest`` disagrees with this installation (empty when it is acceptable)."""
    import tomllib

    from fedtrain.config import ConfigError, config_from_dict
    from fedtrain.transport.codecs import CODECS

    problems: list[str] = []
    theirs = manifest.get("fedtrain_version")
    if theirs != fedtrain.__version__:
        problems.append(
            f"fedtrain version: run uses {theirs}, this silo has {fedtrain.__version__}"
        )
    got = hashlib.sha256(tokenizer).hexdigest()
    if got != manifest.get("tokenizer_sha256"):
        problems.append(
            f"tokenizer: file hash {got[:12]} differs from the manifest's "
            f"{str(manifest.get('tokenizer_sha256'))[:12]}"
        )
    try:
        cfg = config_from_dict(tomllib.loads(str(manifest.get("config_toml", ""))))
    except (ConfigError, tomllib.TOMLDecodeError) as e:
        return [*problems, f"config: this silo cannot read the run config: {e}"]
    if config_sha256(cfg) != manifest.get("config_sha256"):
        problems.append("config: hash of the config text differs from the manifest's config hash")
    model = manifest.get("model", {})
    if model.get("preset") not in PRESETS:
        problems.append(f"model preset: {model.get('preset')!r} is unknown to this silo")
    elif model != _model(cfg, int(model.get("vocab_size", -1))):
        problems.append(
            f"model shapes: preset {model.get('preset')!r} here is "
            f"{asdict(PRESETS[model['preset']])}, the run's is {model.get('shape')}"
        )
    codec = manifest.get("transport", {}).get("codec")
    if codec not in CODECS:
        problems.append(f"codec: {codec!r} is not available on this silo")
    elif manifest.get("transport") != _codec(cfg):
        problems.append("codec settings: differ from the run config's [transport] section")
    return problems
