"""The one Service a pod of the e2e node needs: ``kubernetes`` (10.0.0.1:443) -> the apiserver.

What: a TCP forwarder that listens on the ``kubernetes`` Service's ClusterIP and port and
copies bytes both ways to kube-apiserver on 127.0.0.1. TLS passes through untouched (the
apiserver's certificate names the ClusterIP, see ``runner.generate_pki``).

Why: the node has no kube-proxy, and the apiserver listens on the host's loopback only, so a
pod's in-cluster client (``KUBERNETES_SERVICE_HOST``/``PORT``, set by the kubelet from that
Service) would reach nothing. ``controlplane.node`` adds the ClusterIP to its own bridge and a
route to the service range in the CNI config, then starts this forwarder; the provisioner's
Deployment then runs exactly as shipped, with no ``hostNetwork`` and no extra environment.
Nothing of the host changes beyond the bridge, which the node removes on the way down.

Test infrastructure only: the provisioner never imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def _forward(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f'address "{text}" is not HOST:PORT')
    return host, int(port)


async def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    """Forward every connection on ``listen`` to ``target`` until SIGTERM or SIGINT."""
    server = await asyncio.start_server(
        lambda r, w: _forward(r, w, target), host=listen[0], port=listen[1], reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"service proxy: {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.service_proxy")
    parser.add_argument("--listen", required=True, help="HOST:PORT, e.g. 10.0.0.1:443")
    parser.add_argument("--to", required=True, help="HOST:PORT of kube-apiserver")
    args = parser.parse_args(argv)
    asyncio.run(serve(parse_address(args.listen), parse_address(args.to)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
