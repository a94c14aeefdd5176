"""Which cluster this provisioner belongs to, as written in its records on the export.

Records on the export (journal.py, exportlocks.py) name the cluster that made them, so two
clusters sharing one export never act on each other's directories. Two sources, best first:

- **kube-system's uid** (``get`` on that one namespace): unique per cluster and stable for its
  life. What ``rbac/`` grants, and what every earlier version of this provisioner recorded.
- **the cluster CA certificate's fingerprint**, ``ca:`` and 32 hex digits of the SHA-256 of the
  first certificate's DER in the ``ca.crt`` every pod has mounted. It needs no grant at all, so
  the provisioner runs under nfs-subdir's own RBAC, which grants nothing on namespaces. It tells
  clusters apart unless two of them were built from one CA, and it changes if the CA is
  replaced.

Every certificate of the bundle is an *alias*: records written under any of them are this
cluster's too. So records written before the namespace grant was added stay ours once it is,
and a bundle that carries the old and the new CA during a rotation keeps both readable.
No I/O here: ``kube.KubeClient.cluster_identity`` reads the certificate and asks for the uid;
``Storage.set_writer`` takes the aliases and reads them back as the primary.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
from dataclasses import dataclass

CA_PREFIX = "ca:"
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


class NoCertificate(ValueError):
    """The CA bundle holds no readable certificate."""


@dataclass(frozen=True)
class ClusterIdentity:
    primary: str  # written on every new record
    aliases: frozenset[str]  # also this cluster's when read back
    from_ca: bool  # True when kube-system's uid could not be read

    def describe(self) -> str:
        if self.from_ca:
            return f"{self.primary} (the cluster CA certificate's fingerprint)"
        return f"{self.primary} (kube-system's uid)"


def ca_fingerprints(bundle: bytes) -> list[str]:
    """One ``ca:<hex>`` per certificate of a PEM bundle, in order; NoCertificate if none."""
    found: list[str] = []
    for body in _PEM.findall(bundle):
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            continue
        if der:
            found.append(CA_PREFIX + hashlib.sha256(der).hexdigest()[:32])
    if not found:
        raise NoCertificate("the cluster CA bundle holds no PEM certificate")
    return found


def from_uid(uid: str, bundle: bytes | None) -> ClusterIdentity:
    """kube-system's uid, with the CA's fingerprints (if readable) as aliases."""
    aliases = {uid}
    if bundle:
        with contextlib.suppress(NoCertificate):
            aliases.update(ca_fingerprints(bundle))
    return ClusterIdentity(uid, frozenset(aliases), from_ca=False)


def from_ca(bundle: bytes) -> ClusterIdentity:
    """The first certificate's fingerprint; every certificate of the bundle an alias."""
    found = ca_fingerprints(bundle)
    return ClusterIdentity(found[0], frozenset(found), from_ca=True)
