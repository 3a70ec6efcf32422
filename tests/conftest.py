"""Shared fixtures. End-to-end tests build their own lab in namespaces with a unique prefix
and tear it down (namespaces deleted, daemons stopped by PID) whatever the outcome."""

from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vr.lab.harness import Lab

REPO_DIR = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_DIR / "configs" / "examples"
PATCH_EXAMPLES = REPO_DIR / "patches" / "examples"
sys.path.insert(0, str(REPO_DIR / "patches"))
from make_source import make_source

_counter = itertools.count()


@pytest.fixture
def example() -> dict:
    return copy.deepcopy(json.loads((EXAMPLES / "router.json").read_text()))


@contextlib.contextmanager
def example_lab(guests: tuple[str, ...] = ("g1", "g2"), vpn: bool = False) -> Iterator[Lab]:
    """A lab router with the example payload applied and the guests holding a lease; torn
    down (namespaces deleted, daemons stopped by PID) whatever happens."""
    # Not pytest's tmp_path: its 0700 parents would stop dnsmasq (unprivileged) reading its files.
    root = Path(tempfile.mkdtemp(prefix="vr-test-lab-"))
    root.chmod(0o755)
    lab = Lab(root, prefix=f"vrt{os.getpid() % 100000}x{next(_counter)}", vpn=vpn)
    lab.up()
    try:
        lab.vr("apply", str(EXAMPLES / "router.json"))
        for guest in guests:
            lab.dhcp(guest)
        yield lab
    finally:
        lab.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab():
    with example_lab() as lab:
        yield lab


def live_files(lab: Lab) -> dict[str, bytes]:
    """Every rendered file and the stored document, to prove a refused payload changed nothing.
    Not the pipeline's own temporaries (.staging, .backup: a committed transaction's are
    removed after its answer)."""
    config = lab.settings.config_dir
    files = {str(p.relative_to(config)): p.read_bytes() for p in config.rglob("*")
             if p.is_file() and not p.relative_to(config).parts[0].startswith(".")}  # fmt: skip
    files["stored document"] = stored_document(lab.settings)
    return files


def stored_document(settings) -> object:
    """The stored document as a fresh process reads it (document.json and its log replayed):
    the daemon folds the log into document.json when idle, which changes no document. One
    that does not load: its files as they are."""
    from vr.foundation.errors import StoredDocumentUnreadable
    from vr.transaction.store import DocumentStore

    try:
        doc = DocumentStore(settings).load()
    except StoredDocumentUnreadable:
        return [path.read_bytes() if path.exists() else None
                for path in (settings.document_path, settings.document_log_path)]  # fmt: skip
    return None if doc is None else doc.model_dump_json()


def write_payload(tmp_path: Path, payload: dict, name: str = "payload.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return str(path)


def make_ca_and_certificate(tmp_path, name: str, days: int = 30):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key, issuer_name, issuer_key, ca: bool, start, end):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vr test CA")])
    ca = build(
        "vr test CA", ca_key, ca_name, ca_key, True, now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    )
    key = ec.generate_private_key(ec.SECP256R1())
    start = now - datetime.timedelta(days=60) if days < 0 else now - datetime.timedelta(days=1)
    cert = build(name, key, ca_name, ca_key, False, start, now + datetime.timedelta(days=days))
    pem = serialization.Encoding.PEM
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return str(ca_file), {"certificate": cert.public_bytes(pem).decode(), "key": key_pem.decode()}


@pytest.fixture(scope="session")
def workshop(tmp_path_factory) -> dict:
    """A patch publisher's key pair, a stranger's, and the example bundles built and signed:
    0.1.1 (haproxy's X-Vr-Release header) and 0.2.0 (deliberately breaks DNS)."""
    from vr.patching import bundles as patching

    where = tmp_path_factory.mktemp("workshop")
    where.chmod(0o755)
    private, public = patching.keygen(where / "publisher")
    stranger, _ = patching.keygen(where / "stranger")
    source = make_source(PATCH_EXAMPLES / "0.1.1", where / "src-0.1.1")
    bundle, broken = where / "vr-0.1.1.tar.gz", where / "vr-0.2.0-broken.tar.gz"
    patching.build(source, "0.1.1", private, bundle)
    patching.build(make_source(PATCH_EXAMPLES / "0.2.0-broken", where / "src-0.2.0"), "0.2.0", private, broken)
    return {"dir": where, "key": private, "pub": public, "stranger": stranger, "source": source, "bundle": bundle,
            "broken": broken}  # fmt: skip
