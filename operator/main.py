"""Entry of the operator process (used by the container image): `dagmanager operator`."""

import sys

from qmtl_dagmanager.cli import main

if __name__ == "__main__":
    sys.exit(main(["operator", *sys.argv[1:]]))
