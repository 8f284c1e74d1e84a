"""qmtl.io/v1alpha1: StrategyDAG and VersionSentinel."""

GROUP = "qmtl.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
