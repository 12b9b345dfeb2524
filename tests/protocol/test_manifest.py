"""The run manifest: a silo accepts exactly the manifest of its own installation's making and
names every mismatch otherwise."""

from __future__ import annotations

import copy

import pytest
import tomli_w

import fedtrain
from fedtrain.config import config_from_dict, config_to_dict
from fedtrain.protocol.manifest import build_manifest, check_manifest
from tests.conftest import tiny_config_dict

TOKENIZER = b'{"kind": "byte"}'


@pytest.fixture
def manifest() -> dict:
    cfg = config_from_dict(tiny_config_dict())
    text = tomli_w.dumps(config_to_dict(cfg))
    return build_manifest(cfg, "run-1", text, TOKENIZER, 256)


def test_own_manifest_is_accepted(manifest):
    assert check_manifest(manifest, TOKENIZER) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m.update(fedtrain_version="0.0.1"), "fedtrain version"),
        (lambda m: m.update(tokenizer_sha256="0" * 64), "tokenizer"),
        (lambda m: m.update(config_sha256="0" * 64), "config"),
        (lambda m: m["model"]["shape"].update(dim=999), "model shapes"),
        (lambda m: m["model"].update(preset="gigantic"), "model preset"),
        (lambda m: m["transport"].update(codec="zip9"), "codec"),
        (lambda m: m["transport"].update(block_size=7), "codec settings"),
        (lambda m: m.update(config_toml="not [toml"), "config"),
    ],
)
def test_each_mismatch_is_named(manifest, change, named):
    bad = copy.deepcopy(manifest)
    change(bad)
    problems = check_manifest(bad, TOKENIZER)
    assert problems and any(p.startswith(named) for p in problems), problems


def test_tampered_tokenizer_is_refused(manifest):
    problems = check_manifest(manifest, TOKENIZER + b" ")
    assert [p.split(":")[0] for p in problems] == ["tokenizer"]
    assert manifest["fedtrain_version"] == fedtrain.__version__
