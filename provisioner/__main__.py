"""The ``nfs-provisioner`` command: parse settings, run the preflight check, start the operator.

A bad setting exits 1 with one line naming it; ``check`` runs only the preflight (exit 0/1);
``check --migration`` lists what adoption of the previous provisioner's volumes would do.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from provisioner import __version__
from provisioner.config import (
    ConfigError,
    load_settings,
    parse_handover,
    read_service_account_namespace,
    wants_migration,
)

if TYPE_CHECKING:
    from provisioner.kube import KubeClient
    from provisioner.safefs import Syscalls


def main(
    argv: Sequence[str] | None = None,
    calls: Syscalls | None = None,
    api_class: type[KubeClient] | None = None,
) -> int:
    """``calls`` replaces the real filesystem calls and ``api_class`` the API client of the
    running provisioner; only tests pass them (tests/faults.py)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"nfs-provisioner {__version__}")
        return 0
    try:
        command, settings = load_settings(args, os.environ, read_service_account_namespace)
        request = parse_handover(args) if command == "handover" else None
        migration = wants_migration(args)
    except ConfigError as error:
        print(f"nfs-provisioner: {error}", file=sys.stderr)
        return 1

    # Imported late so that --help, --version and configuration errors answer at once.
    from provisioner import handover, preflight
    from provisioner.app import Provisioner
    from provisioner.logs import configure_logging
    from provisioner.safefs import LocalSyscalls

    if request is not None:
        code, line = asyncio.run(handover.run(settings, request, calls or LocalSyscalls()))
        print(line, file=sys.stdout if code == 0 else sys.stderr)
        return code
    if migration:
        from provisioner import migration as listing

        code, text = asyncio.run(listing.run(settings, calls or LocalSyscalls()))
        print(text, file=sys.stdout if code == 0 else sys.stderr)
        return code

    configure_logging(settings.log_level, settings.log_format)
    report = asyncio.run(preflight.run(settings, calls))
    print(report.render(), file=sys.stderr if command == "run" else sys.stdout)
    if command == "check" or not report.ok:
        return 0 if report.ok else 1
    return asyncio.run(Provisioner(settings, calls, api_class=api_class).run())


if __name__ == "__main__":
    sys.exit(main())
