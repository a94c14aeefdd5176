"""The bench's own API client: plain JSON through the official client's transport, no models.

Used by the bench (claims, watches) and the ceiling (the bare client the provisioner is compared
with). It takes the path provisioner/kube.py takes - ``param_serialize`` then ``call_api`` with
a JSON body - minus the asyncio hop and the token bucket, because the generated model methods
cost ~3.4 ms of CPU per call, which on a 2-core machine would be measured as the server's.
Synchronous and thread-safe (urllib3's pool); an HTTP error status is returned, not raised.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import kubernetes.client

from controlplane.binaries import kubectl_binary
from controlplane.runner import ControlPlane
from provisioner.kube import load_api_client

JSON = dict[str, Any]


class RawApi:
    """One kubeconfig's identity; ``pool`` connections at most (size it to the threads)."""

    def __init__(self, kubeconfig: Path, pool: int = 16, timeout: float = 60.0) -> None:
        self._client = load_api_client(pool, str(kubeconfig))
        self._timeout = timeout

    def close(self) -> None:
        self._client.close()

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> kubernetes.client.rest.RESTResponse:
        _method, url, headers, serialized, _ = self._client.param_serialize(
            method=method,
            resource_path=path,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        return self._client.call_api(
            method, url, header_params=headers, body=serialized, _request_timeout=timeout
        )

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, JSON]:
        """(HTTP status, decoded body); a status outside 2xx is returned, not raised."""
        response = self._send(method, path, body, content_type, self._timeout)
        data = response.read()
        response.response.release_conn()
        return response.status, (json.loads(data) if data else {})

    def watch(self, path: str, resource_version: str, seconds: int) -> Iterator[JSON]:
        """The events of one watch from ``resource_version``, ended by the server after
        ``seconds``. An ERROR event (410 Gone: too old) is yielded like any other."""
        query = urlencode(
            {
                "watch": "1",
                "resourceVersion": resource_version,
                "timeoutSeconds": str(seconds),
                "allowWatchBookmarks": "true",
            }
        )
        response = self._send(
            "GET", f"{path}?{query}", None, "application/json", (10, seconds + 30)
        )
        stream = response.response
        try:
            for line in stream:
                if line.strip():
                    yield json.loads(line)
        finally:
            stream.release_conn()


def kubectl(plane: ControlPlane, *args: str, stdin: str | None = None) -> None:
    """Run kubectl as the control plane's admin (set-up: RBAC, namespaces, classes)."""
    subprocess.run(
        [str(kubectl_binary()), f"--kubeconfig={plane.admin_kubeconfig}", *args],
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
    )
