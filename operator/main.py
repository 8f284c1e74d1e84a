"""The operator from a checkout: `python operator/main.py [--config F] [flags]`.

The operator's composition root is `qmtl_dagmanager.kube.main`; the image runs the same
root as `dagmanager operator` (or `dagmanager-operator`).
"""

import sys

from qmtl_dagmanager.kube.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
