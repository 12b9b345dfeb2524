"""Silo keys made on the silo and silos added later: the files ``keys init`` makes, accepted by
the coordinator's own key loading (node-auth registration and update-signature keys)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.cli.supernode.register import try_load_public_key

from fedtrain.config import config_from_dict
from fedtrain.server.deploy import _signing_keys
from fedtrain.server.launcher import _register_keys
from fedtrain.transport import decode_payload, encode_payload
from fedtrain.transport.keys import add_silo, init_keys, make_silo_keys

KEYS_TOP = ["ca.crt", "ca.key", "server.crt", "server.key", "silos"]
"""What ``keys init`` leaves at the top of its directory (nothing half-added beside it)."""
SILO_FILES = ["auth_key", "auth_key.pub", "sign_key", "sign_key.pub"]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    init_keys(d, [], ["silo0"], days=2)
    return d


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_silo_keys_are_the_files_keys_init_makes(tmp_path, keys):
    out = tmp_path / "on-silo"
    files = make_silo_keys(out, "silo1")
    assert sorted(p.name for p in files) == SILO_FILES
    assert sorted(p.name for p in out.iterdir()) == SILO_FILES
    assert _mode(out / "auth_key") == _mode(out / "sign_key") == 0o600
    for name in SILO_FILES:  # same formats: the first line of each file matches init's
        ref = (keys / "silos" / "silo0" / name).read_bytes().splitlines()[0]
        assert (out / name).read_bytes().splitlines()[0].split(b" ")[0] == ref.split(b" ")[0]
    auth = serialization.load_ssh_private_key((out / "auth_key").read_bytes(), None)
    assert isinstance(auth, ec.EllipticCurvePrivateKey) and auth.curve.name == "secp384r1"
    sign = serialization.load_pem_private_key((out / "sign_key").read_bytes(), None)
    assert isinstance(sign, Ed25519PrivateKey)


def test_silo_keys_refuse_to_overwrite_and_odd_names(tmp_path):
    out = tmp_path / "on-silo"
    make_silo_keys(out, "silo1")
    before = (out / "sign_key").read_bytes()
    with pytest.raises(ValueError, match="already holds auth_key"):
        make_silo_keys(out, "silo1")
    assert (out / "sign_key").read_bytes() == before
    with pytest.raises(ValueError, match="a silo name is"):
        make_silo_keys(tmp_path / "x", "../silo1")


def test_add_generates_keys_in_place(keys):
    files = add_silo(keys, "silo1")
    d = keys / "silos" / "silo1"
    assert sorted(p.name for p in files) == SILO_FILES and all(p.parent == d for p in files)
    assert _mode(d / "auth_key") == _mode(d / "sign_key") == 0o600
    assert sorted(p.name for p in keys.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "silos",
    ]


def test_add_from_copies_only_the_public_halves(tmp_path, keys):
    out = tmp_path / "on-silo"
    make_silo_keys(out, "silo1")
    handed = tmp_path / "handed"
    handed.mkdir()
    for name in ("auth_key.pub", "sign_key.pub"):
        (handed / name).write_bytes((out / name).read_bytes())
    files = add_silo(keys, "silo1", handed)
    d = keys / "silos" / "silo1"
    assert (
        sorted(p.name for p in d.iterdir())
        == ["auth_key.pub", "sign_key.pub"]
        == [p.name for p in files]
    )
    assert (d / "sign_key.pub").read_bytes() == (out / "sign_key.pub").read_bytes()


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("private", "holds private key auth_key"),
        ("renamed_private", "holds private key sign_key.pub"),
        ("missing", "sign_key.pub missing"),
        ("garbage", "auth_key.pub is not a valid public key"),
        ("wrong_kind", "sign_key.pub is not a valid public key"),
    ],
)
def test_add_from_refuses_bad_key_files(tmp_path, keys, setup, match):
    out = tmp_path / "on-silo"
    make_silo_keys(out, "silo1")
    if setup == "private":
        src = out  # the whole directory, private keys included
    else:
        src = tmp_path / "handed"
        src.mkdir()
        for name in ("auth_key.pub", "sign_key.pub"):
            (src / name).write_bytes((out / name).read_bytes())
        if setup == "renamed_private":
            (src / "sign_key.pub").write_bytes((out / "sign_key").read_bytes())
        elif setup == "missing":
            (src / "sign_key.pub").unlink()
        elif setup == "garbage":
            (src / "auth_key.pub").write_text("ssh-ed25519 nonsense\n")
        elif setup == "wrong_kind":  # an EC key where the Ed25519 signing key belongs
            pem = (
                ec.generate_private_key(ec.SECP384R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            (src / "sign_key.pub").write_bytes(pem)
    with pytest.raises(ValueError, match=match):
        add_silo(keys, "silo1", src)
    assert not (keys / "silos" / "silo1").exists()
    assert sorted(p.name for p in keys.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "silos",
    ]


def test_add_refuses_an_existing_silo_and_a_directory_without_keys(tmp_path, keys):
    before = (keys / "silos" / "silo0" / "sign_key").read_bytes()
    with pytest.raises(ValueError, match="silo silo0 already has keys"):
        add_silo(keys, "silo0")
    assert (keys / "silos" / "silo0" / "sign_key").read_bytes() == before
    with pytest.raises(ValueError, match="holds no keys from `fedtrain keys init`"):
        add_silo(tmp_path / "empty", "silo1")


def _fake_flwr(bin_dir: Path, record: Path) -> None:
    """A ``flwr`` whose ``supernode register PUB coordinator --name S`` loads PUB with Flower's
    own loader (what the real command does first) and records the silo name."""
    bin_dir.mkdir()
    script = bin_dir / "flwr"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, json\nfrom pathlib import Path\n"
        "from flwr.cli.supernode.register import try_load_public_key\n"
        "assert sys.argv[1:3] == ['supernode', 'register'], sys.argv\n"
        "try_load_public_key(Path(sys.argv[3]))\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[-1]) + '\\n')\n"
    )
    script.chmod(0o755)


def test_added_silos_load_like_keys_init_silos(tmp_path, keys):
    out = tmp_path / "on-silo"
    make_silo_keys(out, "silo2")
    handed = tmp_path / "handed"
    handed.mkdir()
    for name in ("auth_key.pub", "sign_key.pub"):
        (handed / name).write_bytes((out / name).read_bytes())
    add_silo(keys, "silo1")
    add_silo(keys, "silo2", handed)

    # Node authentication: the coordinator registers every silos/*/auth_key.pub.
    record = tmp_path / "registered.jsonl"
    _fake_flwr(tmp_path / "bin", record)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    assert _register_keys(env, keys) == ["silo0", "silo1", "silo2"]
    assert [json.loads(x) for x in record.read_text().splitlines()] == ["silo0", "silo1", "silo2"]
    for silo in ("silo0", "silo1", "silo2"):
        assert try_load_public_key(keys / "silos" / silo / "auth_key.pub")

    # Update signatures: the ServerApp loads silos/NAME/sign_key.pub for every configured silo.
    cfg = config_from_dict(
        {"run": {"rounds": 1}, "data": {"silos": 3}, "transport": {"sign_updates": True}}
    )
    public = _signing_keys(cfg, keys)
    assert sorted(public) == ["silo0", "silo1", "silo2"]
    private = {
        "silo0": keys / "silos" / "silo0" / "sign_key",
        "silo1": keys / "silos" / "silo1" / "sign_key",
        "silo2": out / "sign_key",  # stayed on the silo
    }
    for silo, path in private.items():
        key = serialization.load_pem_private_key(path.read_bytes(), None)  # as the daemon does
        blob = encode_payload(
            {"w": torch.ones(4)},
            codec="fp32",
            kind="pseudo_grad",
            run_id="r",
            round=1,
            sender=silo,
            signing_key=key,
        )
        assert decode_payload(blob, public_key=public[silo]).signed
