"""Generate, from the API models, everything derived from the CRDs:

    crds/<plural>.qmtl.io.yaml                         for kubectl apply
    charts/qmtl-dagmanager/files/crds/<...>.yaml       the chart's copy (kept on uninstall)
    docs/crd-reference.md                              the field reference

`python hack/gen-crds.py [ROOT]` writes under ROOT (default: the project); `make crds-check`
generates into a temporary ROOT and compares.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from qmtl_dagmanager.api.v1alpha1 import strategydag, versionsentinel

PROJECT = Path(__file__).resolve().parent.parent
OUTPUTS = ("crds", "charts/qmtl-dagmanager/files/crds", "docs/crd-reference.md")


def fields(schema: dict[str, Any], path: str, out: list[str]) -> None:
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type", "int-or-string" if prop.get("x-kubernetes-int-or-string") else "")
        if kind == "array" and isinstance(prop.get("items"), dict):
            kind = f"[]{prop['items'].get('type', 'object')}"
        extra = []
        if "enum" in prop:
            extra.append("one of " + ", ".join(f"`{e}`" for e in prop["enum"]))
        if "default" in prop:
            extra.append(f"default `{json.dumps(prop['default'])}`")
        if "minimum" in prop or "maximum" in prop:
            extra.append(f"{prop.get('minimum', '')}..{prop.get('maximum', '')}")
        req = name in (schema.get("required") or [])
        desc = " ".join(str(prop.get("description", "")).split())
        note = f" ({'; '.join(extra)})" if extra else ""
        out.append(f"| `{path}{name}` | {kind}{' (required)' if req else ''} | {desc}{note} |")
        if prop.get("type") == "object" and "properties" in prop:
            fields(prop, f"{path}{name}.", out)
        items = prop.get("items")
        if isinstance(items, dict) and "properties" in items:
            fields(items, f"{path}{name}[].", out)


def reference(crds: list[dict[str, Any]]) -> str:
    lines = [
        "# CRD reference",
        "",
        "Generated from the API models by `make crds` (`hack/gen-crds.py`): do not edit.",
        "",
    ]
    for crd in crds:
        names = crd["spec"]["names"]
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        lines += [
            f"## {names['kind']} (`{crd['spec']['group']}/{version['name']}`)",
            "",
            f"{schema['description']} Short names: "
            + ", ".join(f"`{s}`" for s in names.get("shortNames", []))
            + "; category `qmtl`; printer columns: "
            + ", ".join(c["name"] for c in version["additionalPrinterColumns"])
            + ".",
            "",
            "| field | type | meaning |",
            "|---|---|---|",
        ]
        for part in ("spec", "status"):
            fields({"properties": {part: schema["properties"][part]}}, "", lines)
        lines.append("")
    return "\n".join(lines)


def main(root: Path) -> None:
    crds = [module.crd() for module in (strategydag, versionsentinel)]
    (root / "crds").mkdir(parents=True, exist_ok=True)
    chart = root / "charts" / "qmtl-dagmanager" / "files" / "crds"
    chart.mkdir(parents=True, exist_ok=True)
    (root / "docs").mkdir(parents=True, exist_ok=True)
    for module, crd in zip((strategydag, versionsentinel), crds, strict=True):
        source = f"src/{module.__name__.replace('.', '/')}.py"
        header = f"# Generated from {source} by `make crds`: do not edit.\n"
        name = f"{module.PLURAL}.{strategydag.GROUP}.yaml"
        (root / "crds" / name).write_text(header + yaml.safe_dump(crd, sort_keys=False, width=100))
        kept = copy.deepcopy(crd)
        kept["metadata"]["annotations"] = {"helm.sh/resource-policy": "keep"}
        (chart / name).write_text(header + yaml.safe_dump(kept, sort_keys=False, width=100))
    (root / "docs" / "crd-reference.md").write_text(reference(crds))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else PROJECT)
