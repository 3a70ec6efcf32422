"""Checks of PEM certificates and keys that the manager sends (load balancer TLS, the VPN
server's identity), with `cryptography`: a daemon that cannot load them would fail only
at reload, so verify refuses them first."""

from __future__ import annotations

import datetime

from vr.foundation.errors import Problem


def pem_problems(certificate: str, key: str, chain: str | None = None) -> list[Problem]:
    """Problems under the fields "certificate", "key" and "chain": each parses, the key is
    the certificate's, and an expired certificate is a warning (the manager may be about to
    replace it). Messages never quote the key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(certificate.encode())
    except ValueError as error:
        return [Problem("certificate", f"not a PEM certificate ({error})")]
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError):
        return [Problem("key", "not an unencrypted PEM private key")]
    problems = []
    public, encoding = serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER
    if private.public_key().public_bytes(encoding, public) != cert.public_key().public_bytes(encoding, public):
        problems.append(Problem("key", "does not match the certificate's public key"))
    if chain is not None:
        try:
            x509.load_pem_x509_certificates(chain.encode())
        except ValueError as error:
            problems.append(Problem("chain", f"not PEM certificates ({error})"))
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        problems.append(Problem("certificate", f"expired on {cert.not_valid_after_utc:%Y-%m-%d}", warning=True))
    return problems


def under(prefix: str, problems: list[Problem]) -> list[Problem]:
    return [Problem(f"{prefix}.{p.path}", p.reason, p.warning) for p in problems]


def subject_name(certificate: str) -> str | None:
    """The certificate's first DNS (else IP) subject alternative name: what IKEv2 clients
    (Windows, macOS, iOS, Android) match against the server they dialled. None if it has none."""
    from cryptography import x509

    try:
        names = x509.load_pem_x509_certificate(certificate.encode()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = names.value.get_values_for_type(x509.DNSName) or names.value.get_values_for_type(x509.IPAddress)
    return str(found[0]) if found else None
