"""OCI image layouts packed here, for ``ctr images import``: there is no registry to pull from.

What: content-addressed :class:`Blob`, an :class:`Image` (its layers and what it runs), an
image's config and manifest, the ``index.json`` naming each image, a layer of Debian's
busybox-static (a link per applet, ``/etc/passwd``, ``/tmp``), and tars holding one or more
images with equal layers stored once.

Why apart: the node imports its pause and busybox images (``controlplane.node``) and the
storage suite packs e2e.test's images (``controlplane.suite``) with it; the packing is
deterministic (sorted JSON, mtime 0), so equal inputs give equal digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.processes import _run

BUSYBOX_BINARY = Path("/bin/busybox")  # Debian busybox-static

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
PLATFORM = {"architecture": "amd64", "os": "linux"}


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes of an OCI layout."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return f"sha256:{hashlib.sha256(self.data).hexdigest()}"

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
            **extra,
        }


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Image:
    """An image to pack: its layers (uncompressed tars, lowest first) and what it runs."""

    layers: tuple[bytes, ...]
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()


def image_blobs(layer: bytes, cmd: Sequence[str]) -> tuple[Blob, Blob]:
    """(config, manifest) of a one-layer linux/amd64 image running ``cmd``."""
    return layered_image_blobs(Image((layer,), tuple(cmd)))


def layered_image_blobs(image: Image) -> tuple[Blob, Blob]:
    """(config, manifest) of a linux/amd64 ``image``."""
    layer_blobs = [Blob(OCI_LAYER, layer) for layer in image.layers]
    runs: dict[str, Any] = {"Cmd": list(image.cmd), "Env": ["PATH=/bin"], "WorkingDir": "/"}
    if image.entrypoint:
        runs["Entrypoint"] = list(image.entrypoint)
    config = Blob(
        OCI_CONFIG,
        _canonical(
            {
                **PLATFORM,
                "config": runs,
                "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob in layer_blobs]},
                "history": [{"created_by": "controlplane.node: busybox-static"}],
            }
        ),
    )
    manifest = Blob(
        OCI_MANIFEST,
        _canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [blob.descriptor() for blob in layer_blobs],
            }
        ),
    )
    return config, manifest


def oci_index(manifests: Mapping[str, Blob]) -> dict[str, Any]:
    """``index.json`` naming each manifest (image name -> manifest) for ``ctr images import``."""
    return {
        "schemaVersion": 2,
        "manifests": [
            blob.descriptor(
                platform=PLATFORM,
                annotations={
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            )
            for name, blob in manifests.items()
        ],
    }


# --------------------------------------------------------------------------- images (I/O)


def busybox_layer(busybox: Path = BUSYBOX_BINARY) -> bytes:
    """A deterministic tar: /bin/busybox, a link per applet, /etc/passwd|group, /tmp."""
    applets = _run([str(busybox), "--list"]).stdout.split()
    if not applets:
        raise RuntimeError(f"{busybox} --list printed no applets; is busybox-static installed?")
    buf = io.BytesIO()

    def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            add(directory, tarfile.DIRTYPE, mode)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in sorted(set(applets) - {"busybox"}):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add(
            "etc/passwd",
            tarfile.REGTYPE,
            0o644,
            b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def write_image_archive(path: Path, layer: bytes, images: Mapping[str, Sequence[str]]) -> Path:
    """An OCI image-layout tar holding one image per name (name -> command), sharing ``layer``."""
    return write_images_archive(
        path, {name: Image((layer,), tuple(cmd)) for name, cmd in images.items()}
    )


def write_images_archive(path: Path, images: Mapping[str, Image]) -> Path:
    """An OCI image-layout tar holding one image per name; equal layers are stored once."""
    blobs: dict[str, Blob] = {}
    manifests: dict[str, Blob] = {}
    for name, image in images.items():
        for layer in image.layers:
            layer_blob = Blob(OCI_LAYER, layer)
            blobs[layer_blob.digest] = layer_blob
        config, manifest = layered_image_blobs(image)
        blobs[config.digest] = config
        blobs[manifest.digest] = manifest
        manifests[name] = manifest
    files = {
        "oci-layout": _canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": _canonical(oci_index(manifests)),
        **{f"blobs/sha256/{d.split(':', 1)[1]}": b.data for d, b in blobs.items()},
    }
    with tarfile.open(path, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return path
