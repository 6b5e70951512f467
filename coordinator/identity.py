"""This coordinator process's cluster identity: the secret its channels prove membership with.

Resolved once, lazily, from the settings (`[cluster] secret_file` / `insecure`, or the
EDGEWEAVE_CLUSTER_* environment variables). A local cluster started by this process (demo,
tests, `edgeweave run` with no peers) gets an ephemeral secret when none is configured, so even
throw-away clusters speak mutual TLS; `--insecure` is the only way to plaintext.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgeweave import security
from edgeweave.config import load_settings


@dataclass(frozen=True)
class Identity:
    secret_file: Path | None  # None = insecure
    material: security.TlsMaterial | None

    @property
    def insecure(self) -> bool:
        return self.material is None

    @property
    def fingerprint(self) -> str:
        """The public name of this cluster, as nodes announce it (security.INSECURE_FINGERPRINT when insecure)."""
        return security.material_fingerprint(self.material)


_lock = threading.Lock()
_identity: Identity | None = None


def _from_secret(path: Path) -> Identity:
    return Identity(path, security.issue_member_material(security.load_secret(path), "coordinator"))


def configure(secret_file: str | Path | None = None, insecure: bool = False) -> Identity:
    """Fix this process's identity explicitly (a CLI flag, a test)."""
    global _identity
    with _lock:
        if insecure:
            security.resolve_tls(None, True, "this coordinator")  # logs the loud warning
            _identity = Identity(None, None)
        else:
            _identity = _from_secret(Path(secret_file) if secret_file else security.default_secret_path())
        return _identity


def current() -> Identity:
    """The configured identity; raises security.SecretError (with instructions) if there is none."""
    with _lock:
        identity = _identity
    if identity is not None:
        return identity
    cluster = load_settings().cluster
    return configure(cluster.secret_file or None, cluster.insecure)


def for_local_cluster() -> Identity:
    """The identity a cluster started by this process should share: the configured one if any,
    else a fresh ephemeral secret that lives as long as this process."""
    global _identity
    try:
        return current()
    except security.SecretError:
        pass
    with _lock:
        if _identity is None:
            folder = Path(tempfile.mkdtemp(prefix="edgeweave-secret-"))
            atexit.register(shutil.rmtree, folder, True)
            path = security.create_secret(folder / "cluster.secret")
            _identity = _from_secret(path)
        return _identity


def channel_credentials(identity: Identity | None = None) -> tuple[grpc.ChannelCredentials | None, tuple]:
    """(credentials, extra channel options) for a channel to a node of this (or `identity`'s) cluster."""
    identity = identity or current()
    if identity.material is None:
        return None, ()
    return security.channel_credentials(identity.material), security.CHANNEL_NAME_OVERRIDE


def node_arguments(identity: Identity) -> list[str]:
    """Flags that make a node daemon started by us join the same cluster."""
    return ["--insecure"] if identity.insecure else ["--secret-file", str(identity.secret_file)]
