"""The ``nfs-provisioner`` command: parse settings, run the preflight check, start the operator.

A bad setting exits 1 with one line naming it; ``check`` runs only the preflight (exit 0/1).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from provisioner import __version__
from provisioner.config import ConfigError, load_settings, read_service_account_namespace


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"nfs-provisioner {__version__}")
        return 0
    try:
        command, settings = load_settings(args, os.environ, read_service_account_namespace)
    except ConfigError as error:
        print(f"nfs-provisioner: {error}", file=sys.stderr)
        return 1

    # Imported late so that --help, --version and configuration errors answer at once.
    from provisioner import preflight
    from provisioner.app import Provisioner
    from provisioner.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    report = asyncio.run(preflight.run(settings))
    print(report.render(), file=sys.stderr if command == "run" else sys.stdout)
    if command == "check" or not report.ok:
        return 0 if report.ok else 1
    return asyncio.run(Provisioner(settings).run())


if __name__ == "__main__":
    sys.exit(main())
