"""The CustomResourceDefinition document around a kind's models, and the types every kind
shares (the condition)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmtl_dagmanager.api.fields import field, schema


@dataclass(frozen=True, kw_only=True)
class Condition:
    """A condition of the resource (what core.conditions renders)."""

    type: str = field("Ready, Progressing or Degraded.", required=True)
    status: str = field("True, False or Unknown.", required=True, enum=["True", "False", "Unknown"])
    reason: str = field(
        "A CamelCase reason, e.g. Reconciled, InvalidSpec, DependencyUnavailable.", default=""
    )
    message: str = field("Human-readable detail.", default="")
    last_transition_time: str = field(
        "When the status last changed.", default="", format="date-time"
    )
    observed_generation: int = field(
        "The generation this condition describes.", default=0, format="int64"
    )


@dataclass(frozen=True)
class Kind:
    """A kind's names and the models of its spec and status."""

    group: str
    version: str
    kind: str
    plural: str
    short_names: tuple[str, ...]
    description: str
    spec: type
    spec_doc: str
    status: type
    status_doc: str
    columns: tuple[dict[str, Any], ...]
    validations: tuple[dict[str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.plural}.{self.group}"

    def document(self) -> dict[str, Any]:
        """The CustomResourceDefinition, structural, with the status subresource."""
        spec: dict[str, Any] = {**schema(self.spec), "description": self.spec_doc}
        if self.validations:
            spec["x-kubernetes-validations"] = [dict(v) for v in self.validations]
        root: dict[str, Any] = {
            "type": "object",
            "description": self.description,
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": spec,
                "status": {**schema(self.status), "description": self.status_doc},
            },
            "required": ["spec"],
        }
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": self.name},
            "spec": {
                "group": self.group,
                "scope": "Namespaced",
                "names": {
                    "plural": self.plural,
                    "singular": self.kind.lower(),
                    "kind": self.kind,
                    "shortNames": list(self.short_names),
                    "categories": ["qmtl"],
                },
                "versions": [
                    {
                        "name": self.version,
                        "served": True,
                        "storage": True,
                        "subresources": {"status": {}},
                        "schema": {"openAPIV3Schema": root},
                        "additionalPrinterColumns": [dict(c) for c in self.columns],
                    }
                ],
            },
        }
