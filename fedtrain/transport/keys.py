"""``fedtrain keys init|add|silo``: the certificates and keys of a deployment (``cryptography``).

Layout::

    DIR/ca.crt, ca.key                 the run's certificate authority (give ca.crt to silos)
    DIR/server.crt, server.key         the SuperLink's TLS certificate (SANs from --san)
    DIR/silos/NAME/auth_key(.pub)      EC P-384 key, OpenSSH format: Flower node authentication
    DIR/silos/NAME/sign_key(.pub)      Ed25519 key, PEM: signs the silo's updates

Private keys are written with mode 0600 and never logged. The coordinator needs ``ca.crt``,
``server.*`` and the ``.pub`` files; each silo needs ``ca.crt`` and its own ``silos/NAME``.

A silo can also make its keys itself (:func:`make_silo_keys`, ``fedtrain keys silo``) and hand
over only ``auth_key.pub`` and ``sign_key.pub``, which :func:`add_silo` (``fedtrain keys add
--from``) checks and files under ``silos/NAME``, exactly where ``init_keys`` puts them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

__all__ = ["PUBLIC_FILES", "add_silo", "init_keys", "make_silo_keys"]


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


_File = tuple[Path, bytes, bool]
"""(path, contents, private) of one file to write."""


def _ca(
    now: datetime.datetime, until: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Name, x509.Certificate]:
    """The run's self-signed certificate authority (EC P-384): its key, name and certificate."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtrain run CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_name, ca


def _server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    sans: list[str],
    now: datetime.datetime,
    until: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS key and certificate, signed by the CA, for ``sans`` plus localhost."""
    srv_key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*sans, "localhost", "127.0.0.1"]))
    srv = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return srv_key, srv


def _silo_files(d: Path) -> tuple[_File, ...]:
    """A silo's fresh keys: EC P-384 node-auth key (OpenSSH) and Ed25519 signing key (PEM)."""
    pem = serialization.Encoding.PEM
    auth = ec.generate_private_key(ec.SECP384R1())
    sign = Ed25519PrivateKey.generate()
    return (
        (
            d / "auth_key",
            auth.private_bytes(
                pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            True,
        ),
        (
            d / "auth_key.pub",
            auth.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ),
            False,
        ),
        (
            d / "sign_key",
            sign.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            True,
        ),
        (
            d / "sign_key.pub",
            sign.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
            False,
        ),
    )


def init_keys(directory: Path, sans: list[str], silos: list[str], days: int = 365) -> list[Path]:
    """Create the CA, server certificate and per-silo keys; return the files written."""
    if (directory / "ca.key").exists():
        raise ValueError(f"{directory} already holds keys; refusing to overwrite them")
    if not silos:
        raise ValueError("name at least one silo (--silo NAME)")
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)
    written: list[Path] = []
    ca_key, ca_name, ca = _ca(now, until)
    srv_key, srv = _server_cert(ca_key, ca_name, sans, now, until)
    pem = serialization.Encoding.PEM
    for path, data, private in (
        (directory / "ca.crt", ca.public_bytes(pem), False),
        (directory / "ca.key", _pem_key(ca_key), True),
        (directory / "server.crt", srv.public_bytes(pem), False),
        (directory / "server.key", _pem_key(srv_key), True),
    ):
        _write(path, data, private)
        written.append(path)
    for silo in silos:
        for path, data, private in _silo_files(directory / "silos" / silo):
            _write(path, data, private)
            written.append(path)
    return written


PUBLIC_FILES = ("auth_key.pub", "sign_key.pub")
"""The files of a silo's keys that travel to the coordinator (the private halves never do)."""
_PRIVATE_FILES = ("auth_key", "sign_key")
_SILO_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
"""The curves Flower accepts for node authentication keys."""


def _check_name(silo: str) -> None:
    if not _SILO_NAME.fullmatch(silo):
        raise ValueError(
            f"--silo {silo!r}: a silo name is letters, digits, '_', '.' and '-' (e.g. silo2)"
        )


def make_silo_keys(out: Path, silo: str) -> list[Path]:
    """Make one silo's auth and signing key pairs in ``out`` (the files ``init_keys`` writes
    under ``silos/NAME``); refuses to overwrite keys already there. Returns the files written."""
    _check_name(silo)
    files = _silo_files(out)
    taken = [p.name for p, _, _ in files if p.exists()]
    if taken:
        raise ValueError(f"{out} already holds {', '.join(taken)}; refusing to overwrite keys")
    for path, data, private in files:
        _write(path, data, private)
    return [p for p, _, _ in files]


def _checked_public(source: Path) -> list[_File]:
    """The two public key files in ``source``, each checked to load as the server loads it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    held = [n for n in _PRIVATE_FILES if (source / n).exists()]
    held += [
        p.name
        for p in sorted(source.iterdir())
        if p.is_file() and p.name not in held and _looks_private(p)
    ]
    if held:
        raise ValueError(
            f"--from {source} holds private key {', '.join(held)}; only "
            f"{' and '.join(PUBLIC_FILES)} leave the silo (`fedtrain keys silo` makes them there)"
        )
    out: list[_File] = []
    for name, load, kind in (
        ("auth_key.pub", serialization.load_ssh_public_key, "an OpenSSH EC (NIST curve) key"),
        ("sign_key.pub", serialization.load_pem_public_key, "a PEM Ed25519 key"),
    ):
        path = source / name
        if not path.is_file():
            raise ValueError(f"--from {source}: {name} missing (`fedtrain keys silo` makes it)")
        data = path.read_bytes()
        try:
            key = load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        ok = (
            isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _NIST_CURVES)
            if name == "auth_key.pub"
            else isinstance(key, Ed25519PublicKey)
        )
        if not ok:
            raise ValueError(f"--from {source}: {name} is not a valid public key ({kind})")
        out.append((Path(name), data, False))
    return out


def _looks_private(path: Path) -> bool:
    """Whether a (small) file holds a PEM or OpenSSH private key."""
    try:
        if path.stat().st_size > 1 << 16:
            return False
        return b"PRIVATE KEY-----" in path.read_bytes()
    except OSError:
        return False


def add_silo(directory: Path, silo: str, source: Path | None = None) -> list[Path]:
    """Add silo ``silo`` to the ``init_keys`` directory ``directory``: fresh keys, or with
    ``source`` only its checked ``.pub`` files. The silo's folder appears whole (written
    aside, then renamed), so the coordinator never sees half a silo. Returns the files written."""
    _check_name(silo)
    if not (directory / "ca.crt").is_file() or not (directory / "server.crt").is_file():
        raise ValueError(f"{directory} holds no keys from `fedtrain keys init` (ca.crt missing)")
    final = directory / "silos" / silo
    if final.exists():
        raise ValueError(f"silo {silo} already has keys in {final}; choose another name")
    if source is not None and not source.is_dir():
        raise ValueError(f"--from {source}: not a directory")
    # Outside silos/: the coordinator globs silos/*/ and must not see a half-written silo.
    tmp = directory / f".adding-{silo}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if source is None:
        files = _silo_files(tmp)
    else:
        files = tuple((tmp / p, data, private) for p, data, private in _checked_public(source))
    for path, data, private in files:
        _write(path, data, private)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return [final / p.name for p, _, _ in files]
