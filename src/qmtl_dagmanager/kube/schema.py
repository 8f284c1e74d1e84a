"""Building blocks of the custom resources' OpenAPI schemas: each field declared once with
its type and the documentation `kubectl explain` shows, and the CRD document around them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUP = "qmtl.io"
VERSION = "v1alpha1"


@dataclass(frozen=True)
class F:
    """A field: its schema and its documentation."""

    schema: dict[str, Any]
    doc: str
    required: bool = False


def s(doc: str, required: bool = False, **extra: Any) -> F:
    return F({"type": "string", **extra}, doc, required)


def obj(doc: str, fields: dict[str, F], required: bool = False, **extra: Any) -> F:
    props = {k: {**v.schema, "description": v.doc} for k, v in fields.items()}
    schema: dict[str, Any] = {"type": "object", "properties": props, **extra}
    req = [k for k, v in fields.items() if v.required]
    if req:
        schema["required"] = req
    return F(schema, doc, required)


FREE = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}

CONDITION = obj(
    "A condition of the resource.",
    {
        "type": s("Ready, Progressing or Degraded.", True),
        "status": s("True, False or Unknown.", True, enum=["True", "False", "Unknown"]),
        "reason": s("A CamelCase reason, e.g. Reconciled, InvalidSpec, DependencyUnavailable."),
        "message": s("Human-readable detail."),
        "lastTransitionTime": s("When the status last changed.", format="date-time"),
        "observedGeneration": F(
            {"type": "integer", "format": "int64"}, "The generation this condition describes."
        ),
    },
)

INT_OR_STRING = {"x-kubernetes-int-or-string": True}


def conditions(doc: str) -> F:
    return F({"type": "array", "items": dict(CONDITION.schema)}, doc)


def crd_document(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    description: str,
    spec: F,
    status: F,
    columns: list[dict[str, Any]],
    validations: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    spec_schema: dict[str, Any] = {**spec.schema, "description": spec.doc}
    if validations:
        spec_schema["x-kubernetes-validations"] = validations
    schema: dict[str, Any] = {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": {**status.schema, "description": status.doc},
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": plural,
                "singular": kind.lower(),
                "kind": kind,
                "shortNames": short_names,
                "categories": ["qmtl"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": schema},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }
