"""``python -m tests.faulty_provisioner``: the real entry point with faults injected.

Integration tests start this instead of ``python -m provisioner`` when they need a failing or
hanging export or API call; the rules file is named by ``NFS_PROVISIONER_UNSAFE_FAULTS_FILE``
(see ``tests/faults.py``). It lives in tests/ so that no setting of the shipped image can turn
fault injection on.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from provisioner.__main__ import main
from tests.faults import FAULTS_ENV, FaultInjectingKubeApi, FaultInjectingSyscalls

if __name__ == "__main__":
    rules = Path(os.environ[FAULTS_ENV])
    logging.getLogger("provisioner").warning("fault injection from %s", rules)
    FaultInjectingKubeApi.rules_file = rules
    sys.exit(main(calls=FaultInjectingSyscalls(rules), api_class=FaultInjectingKubeApi))
