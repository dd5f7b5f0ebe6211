"""TLS and mutual TLS with certificates made by fedserver.certs, over real grpc.aio on loopback."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from server_testkit import async_test, running_server

from fedcore.errors import ServerConfigError
from fedserver.certs import (
    CertificateBundle,
    create_ca,
    create_node_certificate,
    create_server_certificate,
)
from fedserver.config import ServerConfig


def _pki(tmp_path: Path) -> tuple[CertificateBundle, dict[str, Path]]:
    ca = create_ca()
    ca.write(tmp_path / "pki", "ca")
    server_cert, server_key = create_server_certificate(ca, ["fed.example.org"]).write(tmp_path / "pki", "server")
    return ca, {"ca_file": tmp_path / "pki" / "ca.crt", "cert_file": server_cert, "key_file": server_key}


def _client(ca: CertificateBundle, node: CertificateBundle | None = None) -> grpc.ChannelCredentials:
    if node is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    return grpc.ssl_channel_credentials(ca.cert_pem, node.key_pem, node.cert_pem)


def test_certificates_name_what_they_should(tmp_path: Path) -> None:
    ca = create_ca("project X")
    server = create_server_certificate(ca, ["fed.example.org", "10.1.2.3"])
    node = create_node_certificate(ca, "hospital-a")
    assert (ca.common_name, server.common_name, node.common_name) == ("project X", "fed.example.org", "hospital-a")
    san = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fed.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.1.2.3"]
    for leaf in (server, node):
        assert leaf.certificate.issuer == ca.certificate.subject
        leaf.certificate.verify_directly_issued_by(ca.certificate)
    with pytest.raises(ServerConfigError, match="invalid node id"):
        create_node_certificate(ca, "no spaces allowed")


def test_keys_are_private_files_and_never_overwritten(tmp_path: Path) -> None:
    cert_path, key_path = create_ca().write(tmp_path, "ca")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    with pytest.raises(ServerConfigError, match="already exists; refusing to overwrite"):
        create_ca().write(tmp_path, "ca")
    assert CertificateBundle.load(tmp_path, "ca").cert_pem == cert_path.read_bytes()


def test_tls_modes_need_their_files(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError, match="tls='tls' needs cert_file"):
        ServerConfig(tls="tls")
    with pytest.raises(ServerConfigError, match="ca_file .* does not exist"):
        ServerConfig(tls="mtls", cert_file=__file__, key_file=__file__, ca_file=tmp_path / "nope.crt")
    with pytest.raises(ServerConfigError, match="tls must be one of insecure, tls, mtls, got 'ssl'"):
        ServerConfig(tls="ssl")  # type: ignore[arg-type]


@async_test
async def test_tls_with_token(tmp_path: Path) -> None:
    ca, files = _pki(tmp_path)
    async with running_server(tmp_path, tls="tls", cert_file=files["cert_file"], key_file=files["key_file"]) as kit:
        node = kit.node("a", credentials=_client(ca))
        assert (await node.register()).node_id == "a"
        stranger = kit.node(credentials=_client(ca))  # TLS alone is not an identity in token mode
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stranger.register()
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        wrong_ca = kit.node("b", credentials=_client(create_ca()))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wrong_ca.register()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "b" not in kit.server.registry


@async_test
async def test_mutual_tls_identity_is_the_certificate_common_name(tmp_path: Path) -> None:
    ca, files = _pki(tmp_path)
    async with running_server(tmp_path, tls="mtls", **files) as kit:
        node = kit.node(credentials=_client(ca, create_node_certificate(ca, "hospital-a")))
        reply = await node.register()  # no token at all
        assert reply.node_id == "hospital-a" and "hospital-a" in kit.server.registry
        kit.store.enroll("hospital-a")
        kit.store.revoke("hospital-a")  # revocation in the store also blocks the certificate
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.register()
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "node 'hospital-a' is revoked"


@pytest.mark.parametrize("who", ["no client certificate", "node cert from another CA", "trusts another CA"])
@async_test
async def test_mutual_tls_refuses_strangers(tmp_path: Path, who: str) -> None:
    ca, files = _pki(tmp_path)
    other_ca = create_ca("someone else")
    credentials = {
        "no client certificate": _client(ca),
        "node cert from another CA": _client(ca, create_node_certificate(other_ca, "hospital-a")),
        "trusts another CA": _client(other_ca, create_node_certificate(ca, "hospital-a")),
    }[who]
    async with running_server(tmp_path, tls="mtls", **files) as kit:
        node = kit.node(credentials=credentials)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.register()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert len(kit.server.registry) == 0
