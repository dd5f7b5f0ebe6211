"""A project certificate authority for mutual TLS: the CA, the server certificate, node certificates.

Made with ``cryptography`` (ECDSA P-256 keys, SHA-256 signatures). The server certificate carries the
subject alternative names ``localhost``, ``127.0.0.1`` and ``::1`` plus any extra host names or IP
addresses given; a node certificate's common name is the node id, which is how the server identifies the
node in mTLS mode. Files are PEM; private keys are written with mode 0600 and never overwritten silently.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.errors import ServerConfigError
from fedserver.auth import check_node_id

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_NAME, SERVER_NAME = "ca", "server"


@dataclass(frozen=True)
class CertificateBundle:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ServerConfigError(f"expected an EC private key, got {type(key).__name__}")
        return key

    @property
    def common_name(self) -> str:
        return str(self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    def write(self, directory: str | Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``<name>.crt`` (0644) and ``<name>.key`` (0600) into ``directory``; return both paths."""
        folder = Path(directory)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServerConfigError(f"cannot create the certificate folder {folder}: {exc}") from None
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        if not overwrite:
            for path in (cert_path, key_path):
                if path.exists():
                    raise ServerConfigError(f"{path} already exists; refusing to overwrite it (use --force)")
        _write(key_path, self.key_pem, 0o600)
        _write(cert_path, self.cert_pem, 0o644)
        return cert_path, key_path

    @classmethod
    def load(cls, directory: str | Path, name: str) -> CertificateBundle:
        folder = Path(directory)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        for path in (cert_path, key_path):
            if not path.is_file():
                raise ServerConfigError(f"{path} not found (create it with `fedserver certs init`)")
        return cls(cert_path.read_bytes(), key_path.read_bytes())


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed or (for 0644) kept the mode; make it exact
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name | None, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    if days <= 0:
        raise ServerConfigError(f"certificate validity must be > 0 days, got {days}")
    now = dt.datetime.now(dt.UTC)
    last = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # X.509 dates end with year 9999
    if days > (last - now).days:
        raise ServerConfigError(f"certificate validity of {days} days ends after the year 9999, where X.509 "
                                f"dates end; use at most {(last - now).days}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(issuer or name).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def create_ca(common_name: str = "fedstream project CA", days: int = 3650) -> CertificateBundle:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    cert = (_builder(common_name, None, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return CertificateBundle(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _leaf(ca: CertificateBundle, common_name: str, usage: x509.ObjectIdentifier, days: int,
          san: list[x509.GeneralName] | None = None) -> CertificateBundle:
    ca_cert, ca_key = ca.certificate, ca.private_key
    key = _new_key()
    builder = (_builder(common_name, ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return CertificateBundle(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        if not host or any(c.isspace() for c in host):
            raise ServerConfigError(f"invalid host name {host!r} for the server certificate") from None
        return x509.DNSName(host)


def create_server_certificate(ca: CertificateBundle, hosts: Sequence[str] = (),
                              days: int = 825) -> CertificateBundle:
    """A TLS server certificate signed by ``ca`` for localhost, 127.0.0.1, ::1 and ``hosts``."""
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    common_name = hosts[0] if hosts else "fedserver"
    return _leaf(ca, common_name, ExtendedKeyUsageOID.SERVER_AUTH, days, [_general_name(h) for h in names])


def create_node_certificate(ca: CertificateBundle, node_id: str, days: int = 825) -> CertificateBundle:
    """A TLS client certificate signed by ``ca`` whose common name is ``node_id``."""
    check_node_id(node_id)
    return _leaf(ca, node_id, ExtendedKeyUsageOID.CLIENT_AUTH, days)
