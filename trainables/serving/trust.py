"""Whether a compressed file is the one that was released: its sha256 against a recorded one, and ed25519 signatures.

A release (``python -m sweep.release``) records the file's sha256 on the registered model version (the tag
`ARTIFACT_SHA256_TAG`) and, with ``--sign KEY``, writes a detached ed25519 signature over that sha256 beside the
file (``FILE.sig``, `SIGNATURE_SUFFIX`), where the registry download brings it along. Serving compares and verifies
both before the file is decoded. The signed message is the 32 raw bytes of the file's sha256 digest and the
signature file holds the 64 raw signature bytes, so OpenSSL verifies it too (docs/release.md shows how). The file's
own blake2b checksums (docs/artifact-format.md) find damage, not edits: whoever edits a file can recompute them.

Keys are PEM files the user makes and keeps (docs/release.md); nothing here generates, stores or caches one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ARTIFACT_SHA256_TAG",
    "SIGNED_BY_TAG",
    "SIGNATURE_SUFFIX",
    "TrustError",
    "check_sha256",
    "key_fingerprint",
    "load_private_key",
    "load_public_key",
    "parse_sha256",
    "sign_sha256",
    "signature_path",
    "verify_signature",
]

#: Model-version tag holding the released file's hex sha256.
ARTIFACT_SHA256_TAG = "artifact_sha256"
#: Model-version tag naming the key that signed the file (`key_fingerprint` of its public half).
SIGNED_BY_TAG = "artifact_signed_by"
#: The detached signature of ``FILE`` is ``FILE`` + this suffix, in the same folder.
SIGNATURE_SUFFIX = ".sig"

_SIGNATURE_BYTES = 64


class TrustError(ValueError):
    """The file is not the released one, or a key or signature is unusable; the message names the fault."""


def signature_path(path: str | os.PathLike) -> Path:
    """Where the detached signature of ``path`` lives: ``path`` + `SIGNATURE_SUFFIX`."""
    path = Path(path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def parse_sha256(value: str, what: str) -> str:
    """``value`` as a lower-case hex sha256; `TrustError` naming ``what`` when it is not 64 hex digits."""
    hex_sha = value.strip().lower()
    if len(hex_sha) != 64 or any(c not in "0123456789abcdef" for c in hex_sha):
        raise TrustError(f"{what} {value!r} is not a sha256 (64 hex digits)")
    return hex_sha


def check_sha256(actual: str, expected: str, what: str, source: str) -> None:
    """Refuse when the file's sha256 ``actual`` is not ``expected`` (hex, any case); ``what`` names the file,
    ``source`` where ``expected`` came from (e.g. ``--sha256``, ``version 3 of 'name'``)."""
    expected = parse_sha256(expected, f"{what}: the sha256 from {source}")
    if actual.lower() != expected:
        raise TrustError(
            f"{what}: sha256 {actual.lower()} does not match {expected} from {source}: this is not the file that "
            "was released (edited, replaced or corrupted); refusing it"
        )


def _read_key(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TrustError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from exc


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The ed25519 private key of a PEM file (PKCS#8, unencrypted: ``openssl genpkey -algorithm ed25519``)."""
    data = _read_key(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TrustError(
            f"signing key {path}: not an unencrypted PEM private key ({exc}); make one with "
            "`openssl genpkey -algorithm ed25519 -out KEY.pem` (docs/release.md)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"signing key {path}: a {type(key).__name__}, not an ed25519 key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The ed25519 public key of a PEM file (``openssl pkey -in KEY.pem -pubout``)."""
    data = _read_key(path, "verify key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        hint = " (that is a private key: give its public half)" if b"PRIVATE KEY" in data else ""
        raise TrustError(f"verify key {path}: not a PEM public key{hint} ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(f"verify key {path}: a {type(key).__name__}, not an ed25519 key")
    return key


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``ed25519:`` + the first 16 hex digits of the sha256 of the raw public key: names a key in tags and errors."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def sign_sha256(key: Ed25519PrivateKey, hex_sha256: str) -> bytes:
    """The detached signature (64 bytes) over a file's sha256 digest (its 32 raw bytes)."""
    return key.sign(bytes.fromhex(parse_sha256(hex_sha256, "sha256")))


def verify_signature(path: str | os.PathLike, hex_sha256: str, key: Ed25519PublicKey, key_path: str) -> Path:
    """Refuse ``path`` (whose sha256 is ``hex_sha256``) unless ``signature_path(path)`` is a valid signature of
    it by ``key``; returns the signature's path. ``key_path`` names the key in the message."""
    sig = signature_path(path)
    who = f"key {key_path} ({key_fingerprint(key)})"
    if not sig.is_file():
        raise TrustError(
            f"{path}: unsigned: no signature {sig.name} beside it, and --verify-key {key_path} asks for one "
            "(release it with `python -m sweep.release ... --sign KEY`, and copy FILE.sig with the file)"
        )
    data = sig.read_bytes()
    if len(data) != _SIGNATURE_BYTES:
        raise TrustError(
            f"{path}: signature {sig} is {len(data)} bytes, not an ed25519 signature ({_SIGNATURE_BYTES} bytes)"
        )
    try:
        key.verify(data, bytes.fromhex(parse_sha256(hex_sha256, "sha256")))
    except InvalidSignature:
        raise TrustError(
            f"{path}: wrongly signed: signature {sig.name} does not verify with {who} over sha256 {hex_sha256} "
            "(signed by another key, or the file changed after signing); refusing it"
        ) from None
    return sig
