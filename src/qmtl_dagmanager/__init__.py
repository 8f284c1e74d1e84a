"""QMTL DAG Manager: the single source of truth for strategy DAGs, as a Kubernetes operator."""

__version__ = "0.1.0"
