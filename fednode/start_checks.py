"""What ``fednode start`` checks before it prints its banner and dials: the files its options name.

A CA certificate, client certificate, key or token file that cannot be read or parsed would otherwise
surface only when the first channel is built, after "serving ... Ctrl-C to stop", or (a PEM that gRPC
takes but cannot use) as a TLS handshake failure retried for ever. Each problem raises a
:class:`fedcore.errors.NodeConfigError` whose message starts with ``argument FLAG:`` (the option the
operator typed, or ``$FEDNODE_TOKEN_FILE``), which ``fednode start`` reports as bad usage (exit 2). A
secret file others may read is a warning, not an error: the node still starts.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedcore.errors import NodeConfigError
from fednode.config import NodeConfig
from fednode.config import read_token_file as config_read_token_file

__all__ = ["certificate_common_name", "check_start_files", "read_token_file"]


def check_start_files(config: NodeConfig, token_flag: str = "--token-file") -> list[str]:
    """Read and parse every file ``config`` names, as the node will use them; return the warnings.

    ``token_flag``: how the operator named the token file (``--token-file`` or ``$FEDNODE_TOKEN_FILE``).
    Warnings (one line each): a token or private key file that group or others may read or write.

    Raises:
        NodeConfigError: ``argument FLAG: ...`` naming the file and what is wrong with it.
    """
    warnings: list[str] = []
    if config.token_file is not None:
        read_token_file(Path(config.token_file), token_flag)
        warnings += _private_file_warning(Path(config.token_file), "token")
    if config.tls == "insecure":
        return warnings
    _certificates(config.ca_cert, "--ca-cert")
    if config.tls == "mtls":
        (certificate, *_) = _certificates(config.client_cert, "--cert")
        key = _private_key(config.client_key, "--key")
        if _public_bytes(certificate.public_key()) != _public_bytes(key.public_key()):
            raise NodeConfigError(f"argument --key: {config.client_key} is not the private key of the certificate "
                                  f"--cert {config.client_cert} (give the key written with that certificate)")
        warnings += _private_file_warning(Path(config.client_key), "key")
    return warnings


def certificate_common_name(path: Path | None) -> str | None:
    """The common name (CN) of the first certificate in the PEM file ``path``: under mutual TLS the server takes
    it as the node's id. None when the file cannot be read or parsed (:func:`check_start_files` says why) or
    names no CN."""
    from cryptography.x509.oid import NameOID

    try:
        (certificate, *_) = _certificates(path, "--cert")
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (NodeConfigError, ValueError):
        return None
    return str(names[0].value) if names else None


def _private_file_warning(path: Path, what: str) -> list[str]:
    """One line if ``path`` (a secret: whoever reads it is this node) has any group or other permission.

    A token written with ``fedserver nodes enroll ID --quiet > ID.token`` gets the umask's mode, often 0644.
    """
    if os.name != "posix":  # modes mean nothing there; ACLs are the operator's business
        return []
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if not mode & 0o077:
        return []
    access = "/".join(word for word, bits in (("readable", 0o044), ("writable", 0o022)) if mode & bits) \
        or "accessible"
    return [(f"{what} file {path} is {access} by group or others (mode {mode:04o}): anyone who can read it can "
             f"act as this node; run `chmod 600 {path}`")]


def read_token_file(path: Path, flag: str = "--token-file") -> str:
    """The token in ``path`` by :func:`fednode.config.read_token_file` (the rule ``NodeConfig.resolve_token``
    reads it by), errors starting ``argument FLAG:``.

    Raises:
        NodeConfigError: unreadable, too long, empty, only whitespace, not one word of printable ASCII.
    """
    return config_read_token_file(path, f"argument {flag}")


def _read(path: Path | None, flag: str) -> bytes:
    if path is None:  # NodeConfig refuses this earlier; kept for a config built otherwise
        raise NodeConfigError(f"argument {flag}: required")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise NodeConfigError(f"argument {flag}: cannot read {path}: {exc.strerror or exc}") from None


def _pem(path: Path | None, flag: str) -> bytes:
    data = _read(path, flag)
    if b"-----BEGIN" not in data:
        raise NodeConfigError(f"argument {flag}: {path} is not a PEM file (no -----BEGIN line)")
    return data


def _certificates(path: Path | None, flag: str) -> list:
    from cryptography import x509  # only `fednode start` with TLS needs it

    data = _pem(path, flag)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise NodeConfigError(f"argument {flag}: {path} holds no readable PEM certificate ({exc}); give the "
                              f"certificate file (-----BEGIN CERTIFICATE-----)") from None


def _private_key(path: Path | None, flag: str):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _pem(path, flag)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise NodeConfigError(f"argument {flag}: {path} is encrypted with a passphrase, which gRPC cannot use: "
                              f"give an unencrypted key (keep it mode 600)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise NodeConfigError(f"argument {flag}: {path} holds no readable PEM private key ({exc})") from None


def _public_bytes(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
