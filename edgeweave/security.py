"""Cluster membership by a shared secret, enforced with mutual TLS on every gRPC channel.

`edgeweave init` writes a random 32-byte secret. Every member (node or coordinator) derives
the same CA key pair from it (HKDF -> P-256 scalar), then issues itself a fresh leaf
certificate signed by that CA. Servers require client certificates signed by the CA, clients
require the server's: holding the secret is what makes a device a member, and nothing secret
ever travels (mDNS announces only that a node is secure).

Why derive instead of distributing a CA? A user copies one small file to each device; there
is no certificate authority to run and nothing to re-issue when a node's address changes
(servers are verified by a fixed name, not by IP).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

#: every node certificate carries this DNS name; clients verify it instead of the (changing) IP.
SERVER_NAME = "edgeweave-node"
SECRET_BYTES = 32
_P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)
_VALID_FROM = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


class SecretError(RuntimeError):
    """The cluster secret is missing, unreadable or malformed; the text says what to do."""


def default_secret_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(os.environ.get("EDGEWEAVE_SECRET_FILE", Path(base) / "edgeweave" / "cluster.secret"))


def create_secret(path: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write a new random cluster secret (hex, mode 0600). Refuses to replace one unless told."""
    path = Path(path or default_secret_path())
    if path.exists() and not overwrite:
        raise SecretError(f"{path} already exists; pass --force to replace it (every device must then get the new one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(SECRET_BYTES) + "\n")
    os.chmod(path, 0o600)
    return path


def load_secret(path: Path | None = None) -> bytes:
    """Read a secret file written by `create_secret`."""
    path = Path(path or default_secret_path())
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise SecretError(
            f"no cluster secret at {path}: run `edgeweave init` on one device and copy the file to the "
            "others, or pass --insecure for a quick local trial"
        ) from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"{path} does not hold a hex cluster secret") from None
    if len(secret) < 16:
        raise SecretError(f"{path} holds only {len(secret)} bytes; a cluster secret needs at least 16")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("cluster secret %s is readable by other users (mode %o); chmod 600 it", path, mode)
    return secret


def _derive_ca_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    material = HKDF(algorithm=hashes.SHA256(), length=48, salt=b"edgeweave-ca-v1", info=b"p256").derive(secret)
    scalar = int.from_bytes(material, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


#: what an --insecure member announces instead of a fingerprint: insecure members form one "cluster"
INSECURE_FINGERPRINT = "insecure"
#: leaf certificates name their cluster in this subject field, so a refused peer can be named
_CLUSTER_PREFIX = "edgeweave cluster "


def _public_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    public = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public)
    return digest.finalize().hex()[:16]


def cluster_fingerprint(secret: bytes) -> str:
    """A short public identifier of the cluster (hash of the CA public key), safe to show or announce."""
    return _public_fingerprint(_derive_ca_key(secret).public_key())


def material_fingerprint(material: TlsMaterial | None) -> str:
    """The fingerprint of the cluster `material` belongs to (its CA's public key); INSECURE_FINGERPRINT for None.
    Members hold only their material, not always the secret, so this is what they announce."""
    if material is None:
        return INSECURE_FINGERPRINT
    public = x509.load_pem_x509_certificate(material.ca_pem).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return _public_fingerprint(public)


def certificate_fingerprint(cert_der: bytes) -> str | None:
    """The cluster fingerprint a member's leaf certificate names (unverified: for error messages only)."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    except ValueError:
        return None
    for unit in units:
        value = str(unit.value)
        if value.startswith(_CLUSTER_PREFIX):
            return value.removeprefix(_CLUSTER_PREFIX)
    return None


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeweave cluster CA")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_VALID_FROM)
        .not_valid_after(_VALID_FROM + dt.timedelta(days=365 * 100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for one member: the cluster CA, and this member's own key and certificate."""

    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes


def issue_member_material(secret: bytes, member_name: str) -> TlsMaterial:
    """A fresh key and a certificate (server + client use) signed by the secret's CA."""
    ca_key = _derive_ca_key(secret)
    ca_cert = _ca_certificate(ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, member_name or SERVER_NAME),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                               _CLUSTER_PREFIX + _public_fingerprint(ca_key.public_key())),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return TlsMaterial(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
    )


def server_credentials(material: TlsMaterial):
    """gRPC server credentials that demand a client certificate from the same cluster."""
    import grpc

    return grpc.ssl_server_credentials(
        [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem, require_client_auth=True
    )


def channel_credentials(material: TlsMaterial):
    """gRPC channel credentials presenting this member's certificate and trusting only the cluster CA."""
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem, private_key=material.key_pem, certificate_chain=material.cert_pem
    )


#: channel options that go with `channel_credentials`: verify the fixed server name, not the IP.
CHANNEL_NAME_OVERRIDE = (("grpc.ssl_target_name_override", SERVER_NAME),)


def resolve_tls(secret_file: str | Path | None, insecure: bool, member_name: str) -> TlsMaterial | None:
    """TLS material for this member, or None in --insecure mode (logged loudly, every time)."""
    if insecure:
        log.warning(
            "INSECURE MODE: %s talks plaintext gRPC without authentication; anyone on this network "
            "can use or impersonate it. Use only for local trials.", member_name
        )
        return None
    return issue_member_material(load_secret(Path(secret_file) if secret_file else None), member_name)


def ssl_context(material: TlsMaterial, *, server: bool, key_dir: str | Path | None = None):
    """An `ssl` mutual-TLS context from the same material as gRPC's credentials (the raw-TCP
    data plane). Both sides demand a peer certificate from the cluster CA; clients verify
    SERVER_NAME. load_cert_chain only reads paths, so the key passes through a 0600 temp file
    in `key_dir` that is removed at once."""
    import ssl
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=material.ca_pem.decode())
    fd, name = tempfile.mkstemp(prefix=".tls-", suffix=".pem", dir=key_dir)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(material.cert_pem + material.key_pem)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)
    return ctx
