"""``fednode start`` checks the files its options name before its banner: bad usage (exit 2) naming the flag.

Before, ``--ca-cert nosuch.crt`` printed "serving ... Ctrl-C to stop" and then ``error: cannot read ca_cert
nosuch.crt`` (exit 1, the Python field's name); a PEM gRPC accepts but cannot use failed later as a TLS
handshake retried for ever. In-process through ``fednode.cli.main`` with real files; one real process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.errors import NodeConfigError
from fednode.cli import main
from fednode.config import NodeConfig
from fednode.start_checks import read_token_file
from fedserver.certs import create_ca, create_node_certificate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pki(tmp_path):
    ca = create_ca("start checks CA")
    ca_file, ca_key = ca.write(tmp_path, "ca")
    node_cert, node_key = create_node_certificate(ca, "site-a").write(tmp_path, "site-a")
    _, other_key = create_node_certificate(ca, "site-b").write(tmp_path, "site-b")
    token = tmp_path / "node.token"
    token.write_text("fsn1_abcdef\n")
    token.chmod(0o600)
    return {"ca": ca_file, "cert": node_cert, "key": node_key, "other_key": other_key, "token": token,
            "ca_key": ca_key}


def refused(tmp_path, capsys, *argv: str) -> str:
    """Runs ``fednode start`` in process; asserts exit 2 before the banner and no home created."""
    home = tmp_path / "home"
    with pytest.raises(SystemExit) as info:
        main(["start", "--server", "127.0.0.1:1", "--home", str(home), "--handler", "train", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "serving" not in err and "Ctrl-C" not in err, err
    assert not home.exists()
    return err


def test_a_missing_ca_cert_names_the_flag(tmp_path, capsys, pki):
    err = refused(tmp_path, capsys, "--ca-cert", str(tmp_path / "nosuch.crt"), "--token-file", str(pki["token"]))
    assert f"fednode start: error: argument --ca-cert: cannot read {tmp_path / 'nosuch.crt'}: No such file or " \
           "directory" in err, err


@pytest.mark.parametrize("content, message", [
    (b"hello\n", "is not a PEM file (no -----BEGIN line)"),
    (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", "holds no readable PEM certificate"),
])
def test_a_ca_cert_that_is_no_certificate_names_the_flag(content, message, tmp_path, capsys, pki):
    bad = tmp_path / "bad.crt"
    bad.write_bytes(content)
    err = refused(tmp_path, capsys, "--ca-cert", str(bad), "--token-file", str(pki["token"]))
    assert f"argument --ca-cert: {bad} {message}" in err, err


def test_a_key_given_as_ca_cert_is_refused(tmp_path, capsys, pki):
    err = refused(tmp_path, capsys, "--ca-cert", str(pki["ca_key"]), "--token-file", str(pki["token"]))
    assert f"argument --ca-cert: {pki['ca_key']} holds no readable PEM certificate" in err, err


@pytest.mark.parametrize("content, message", [
    (b"", "holds no token (the file is empty)"),
    (b"  \n\n", "holds no token (the file holds only whitespace)"),
    (b"\xef\xbb\xbf \r\n", "holds no token (the file holds only whitespace)"),
    (b"fsn1_abc fsn1_def\n", "does not hold one token (one word"),
    (b"fsn1_abc\x01def\n", "holds '\\x01' at character 9, which a token cannot hold (printable ASCII"),
    (b"fsn1_\xc3\xa9\n", "holds '\\xe9' at character 6, which a token cannot hold"),
    (b"\xef\xbb\xbf\xef\xbb\xbffsn1", "holds '\\ufeff' at character 2, which a token cannot hold"),
    (b"fsn1_\xff\n", "is not text: byte 0xff at character 6 is not UTF-8"),
    (b"a" * 4097, "is not a token (over 4096 bytes)"),
])
def test_a_bad_token_file_names_the_flag(content, message, tmp_path, capsys, pki):
    token = tmp_path / "bad.token"
    token.write_bytes(content)
    token.chmod(0o600)
    err = refused(tmp_path, capsys, "--ca-cert", str(pki["ca"]), "--token-file", str(token))
    assert f"argument --token-file: {token} {message}" in err, err


def test_a_token_saved_with_a_byte_order_mark_is_read_without_it(tmp_path):
    """Windows Notepad writes UTF-8 with a BOM (U+FEFF) first and CRLF: the token is the word after it, as the
    node sends it in its gRPC header, where a BOM is an illegal value (the node died after its banner)."""
    path = tmp_path / "node.token"
    path.write_bytes(b"\xef\xbb\xbffsn1_abc-DEF_123\r\n")
    assert read_token_file(path) == "fsn1_abc-DEF_123"
    assert NodeConfig("h:1", tls="insecure", token_file=path).resolve_token() == "fsn1_abc-DEF_123"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero (an endless file)")
def test_an_endless_token_file_is_refused_after_reading_4_kib(tmp_path, capsys, pki):
    err = refused(tmp_path, capsys, "--insecure", "--token-file", "/dev/zero")
    assert "argument --token-file: /dev/zero is not a token (over 4096 bytes)" in err, err


@pytest.mark.parametrize("content", [b"fsn1_\x00abc", b" \t\n", b"\xef\xbb\xbf", b"fsn1 abc"])
def test_the_node_config_reads_a_token_file_by_the_same_rule(content, tmp_path):
    path = tmp_path / "node.token"
    path.write_bytes(content)
    with pytest.raises(NodeConfigError) as flag_error:
        read_token_file(path)
    with pytest.raises(NodeConfigError) as config_error:
        NodeConfig("h:1", tls="insecure", token_file=path).resolve_token()
    assert str(config_error.value) == str(flag_error.value).replace("argument --token-file", "token_file")


def test_a_token_given_directly_must_be_printable_ascii():
    with pytest.raises(NodeConfigError, match=r"token holds '\\x1b' at character 3, which a token cannot hold"):
        NodeConfig("h:1", tls="insecure", token="ab\x1bc").resolve_token()


def test_an_unreadable_token_file_names_the_flag_or_the_variable(tmp_path, capsys, pki, monkeypatch):
    missing = tmp_path / "nosuch.token"
    err = refused(tmp_path, capsys, "--insecure", "--token-file", str(missing))
    assert f"argument --token-file: cannot read {missing}: No such file or directory" in err, err
    monkeypatch.setenv("FEDNODE_TOKEN_FILE", str(missing))
    err = refused(tmp_path, capsys, "--insecure")
    assert f"argument $FEDNODE_TOKEN_FILE: cannot read {missing}: No such file" in err, err


def test_no_token_says_which_options_give_an_identity(tmp_path, capsys, pki, monkeypatch):
    monkeypatch.delenv("FEDNODE_TOKEN_FILE", raising=False)
    err = refused(tmp_path, capsys, "--ca-cert", str(pki["ca"]))
    assert ("the node needs an identity: give --token-file FILE (from `fedserver nodes enroll`) or --cert/--key "
            "for mutual TLS") in err, err
    assert "token_file" not in err, err


def test_mutual_tls_files_are_checked(tmp_path, capsys, pki):
    err = refused(tmp_path, capsys, "--ca-cert", str(pki["ca"]), "--cert", str(pki["cert"]),
                  "--key", str(pki["other_key"]))
    assert f"argument --key: {pki['other_key']} is not the private key of the certificate --cert {pki['cert']}" \
        in err, err
    err = refused(tmp_path, capsys, "--ca-cert", str(pki["ca"]), "--cert", str(pki["key"]), "--key", str(pki["key"]))
    assert f"argument --cert: {pki['key']} holds no readable PEM certificate" in err, err
    err = refused(tmp_path, capsys, "--ca-cert", str(pki["ca"]), "--cert", str(pki["cert"]),
                  "--key", str(tmp_path / "none.key"))
    assert "argument --key: cannot read" in err, err
    err = refused(tmp_path, capsys, "--insecure", "--cert", str(pki["cert"]), "--key", str(pki["key"]))
    assert "--cert/--key need TLS: give --ca-cert instead of --insecure" in err, err


def test_as_a_process_the_error_comes_before_any_banner(tmp_path, pki):
    done = subprocess.run(
        [sys.executable, "-m", "fednode", "start", "--server", "127.0.0.1:1", "--ca-cert", "nosuch.crt",
         "--token-file", str(pki["token"]), "--home", str(tmp_path / "home")],
        cwd=tmp_path, env={**{k: v for k, v in os.environ.items() if not k.startswith("FEDNODE_")}, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == ("fednode start: error: argument --ca-cert: cannot read nosuch.crt: "
                                            "No such file or directory"), done.stderr
    assert "serving" not in done.stderr and "Traceback" not in done.stderr
