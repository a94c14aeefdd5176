"""``python -m tests.faulty_provisioner``: the real entry point with filesystem faults injected.

Integration tests start this instead of ``python -m provisioner`` when they need a failing or
hanging export; the rules file is named by ``NFS_PROVISIONER_UNSAFE_FAULTS_FILE``. It lives in
tests/ so that no setting of the shipped image can turn fault injection on.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from provisioner.__main__ import main
from tests.faults import FAULTS_ENV, FaultInjectingSyscalls

if __name__ == "__main__":
    rules = Path(os.environ[FAULTS_ENV])
    logging.getLogger("provisioner").warning("filesystem fault injection from %s", rules)
    sys.exit(main(calls=FaultInjectingSyscalls(rules)))
