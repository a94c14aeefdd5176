"""The test control plane's own certificates, and the kubeconfigs that carry them.

What: :class:`Pki` (where the CA, the apiserver's serving certificate, the admin's client
certificate and the ServiceAccount signing key pair are), :func:`generate_pki` (a fresh set)
and self-contained kubeconfigs for a client certificate or a token.

Why apart: certificates are a concern of their own, with no process in it;
``controlplane.runner`` generates them and writes the admin's and ServiceAccounts'
kubeconfigs, ``controlplane.flags`` points the components at the files. Private keys are
written 0600. Test use only: the admin is system:masters.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.binaries import KUBE_APISERVER
from controlplane.network import KUBERNETES_SERVICE_IP, LOOPBACK

CLUSTER_NAME = "nfs-provisioner-test"
ADMIN_USER = "admin"
ADMIN_GROUP = "system:masters"


@dataclass(frozen=True)
class Pki:
    """Files of the control plane's own CA, serving cert, admin client cert and SA key pair."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Pki:
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            serving_cert=directory / "apiserver.crt",
            serving_key=directory / "apiserver.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            sa_key=directory / "sa.key",
            sa_pub=directory / "sa.pub",
        )


# --------------------------------------------------------------------------- kubeconfigs


def kubeconfig_dict(
    server: str,
    ca_pem: bytes,
    *,
    user: str = ADMIN_USER,
    token: str | None = None,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    namespace: str | None = None,
    cluster: str = CLUSTER_NAME,
) -> dict[str, Any]:
    """A self-contained kubeconfig (certificates embedded) for a token or a client certificate."""
    has_cert = client_cert_pem is not None and client_key_pem is not None
    if (token is None) == (not has_cert) or (client_cert_pem is None) != (client_key_pem is None):
        raise ValueError("give either a token or both client_cert_pem and client_key_pem")
    credentials: dict[str, str] = {}
    if token is not None:
        credentials["token"] = token
    else:
        assert client_cert_pem is not None and client_key_pem is not None
        credentials["client-certificate-data"] = _b64(client_cert_pem)
        credentials["client-key-data"] = _b64(client_key_pem)
    context_name = f"{user}@{cluster}"
    context: dict[str, str] = {"cluster": cluster, "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": context_name, "context": context}],
        "current-context": context_name,
        "preferences": {},
    }


def render_kubeconfig(config: Mapping[str, Any]) -> str:
    """YAML text of a kubeconfig dict."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- certificates


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not is_ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def generate_pki(directory: Path) -> Pki:
    """A fresh CA, apiserver serving cert (127.0.0.1, localhost), admin cert and SA key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki.in_dir(directory)
    pem = serialization.Encoding.PEM

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CLUSTER_NAME}-ca")])
    ca = _issue(ca_name, ca_key, ca_name, ca_key, is_ca=True)

    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving = _issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KUBE_APISERVER)]),
        serving_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        # The ClusterIP too: pods of the e2e node reach the apiserver through the `kubernetes`
        # Service (controlplane/service_proxy.py) and verify the name they dialled.
        sans=[
            x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
            x509.IPAddress(ipaddress.ip_address(KUBERNETES_SERVICE_IP)),
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes.default.svc"),
        ],
    )

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _issue(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ADMIN_GROUP),
                x509.NameAttribute(NameOID.COMMON_NAME, ADMIN_USER),
            ]
        ),
        admin_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki.ca_cert.write_bytes(ca.public_bytes(pem))
    _write_private(pki.ca_key, _pem_key(ca_key))
    pki.serving_cert.write_bytes(serving.public_bytes(pem) + ca.public_bytes(pem))
    _write_private(pki.serving_key, _pem_key(serving_key))
    pki.admin_cert.write_bytes(admin.public_bytes(pem))
    _write_private(pki.admin_key, _pem_key(admin_key))
    _write_private(pki.sa_key, _pem_key(sa_key))
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pki
