"""Optional Ed25519 signatures of deployments: who exported this folder (`disco keygen`, `disco export
--sign-key`, `disco run --verify-key`).

The signature covers manifest.json byte for byte; the manifest holds the sha256 of every shard and each shard
carries the digest of the manifest it was cut for, so one signature vouches for the whole folder. Keys are PEM
files (PKCS#8 private key, SubjectPublicKeyInfo public key) made with the `cryptography` package.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from disco.errors import DiscoError
from disco.export.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES

SIGNATURE_NAME = "manifest.sig"
PRIVATE_KEY_NAME, PUBLIC_KEY_NAME = "disco-sign.key", "disco-sign.pub"


def generate_keys(folder: str | Path) -> tuple[Path, Path]:
    """A new key pair in `folder`: the private key readable by its owner only; refuses to overwrite keys."""
    folder = Path(folder)
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if private_path.exists() or public_path.exists():
        raise DiscoError(f"{folder} already holds a key pair; keys are never overwritten (choose another folder)")
    if folder.exists() and not folder.is_dir():
        raise DiscoError(f"--out {folder} is a file: keys are written into a folder (a new one, or one without keys)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiscoError(f"cannot create the key folder {folder}: {error.strerror or error}") from None
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def read_private_key(path: str | Path) -> Ed25519PrivateKey:
    return _read_key(path, private=True)


def read_public_key(path: str | Path) -> Ed25519PublicKey:
    return _read_key(path, private=False)


def _read_key(path: str | Path, private: bool):
    path = Path(path)
    if not path.is_file():
        raise DiscoError(f"key file not found: {path}")
    try:
        data = path.read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as error:
        kind = "private" if private else "public"
        raise DiscoError(f"{path} is not an unencrypted PEM {kind} key ({error})") from None
    wanted = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, wanted):
        raise DiscoError(f"{path} is not an Ed25519 key (make one with `disco keygen`)")
    return key


def sign_deployment(folder: str | Path, private_key: str | Path) -> Path:
    """Write manifest.sig: the Ed25519 signature of manifest.json."""
    folder = Path(folder)
    signature = read_private_key(private_key).sign((folder / MANIFEST_NAME).read_bytes())
    path = folder / SIGNATURE_NAME
    path.write_text(base64.b64encode(signature).decode() + "\n")
    return path


MAX_SIGNATURE_BYTES = 4096


def verify_deployment(folder: str | Path, public_key: str | Path) -> None:
    """Refuse the deployment unless manifest.sig is a signature of manifest.json by `public_key`'s owner."""
    folder = Path(folder)
    key = read_public_key(public_key)
    path = folder / SIGNATURE_NAME
    if not path.is_file():
        raise DiscoError(f"{folder} is not signed (no {SIGNATURE_NAME}) but --verify-key asks for a signature")
    if path.stat().st_size > MAX_SIGNATURE_BYTES:  # an Ed25519 signature is 88 characters
        raise DiscoError(f"{path} is not a signature file (at most {MAX_SIGNATURE_BYTES} bytes)")
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST_BYTES:  # read whole below: bounded first
        raise DiscoError(f"{manifest} is missing, not a regular file, or over {MAX_MANIFEST_BYTES:,} bytes")
    try:
        signature = base64.b64decode(path.read_bytes().strip(), validate=True)
        key.verify(signature, manifest.read_bytes())
    except (InvalidSignature, ValueError):
        raise DiscoError(f"{folder}: the signature does not verify with {public_key}: the deployment was changed "
                         "after it was signed, or signed by someone else") from None
