"""Write the CRDs generated from the API models into crds/ (or into the folder given)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from qmtl_dagmanager.kube import api, sentinel_api

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "crds")
out.mkdir(parents=True, exist_ok=True)
for module in (api, sentinel_api):
    source = f"src/{module.__name__.replace('.', '/')}.py"
    text = f"# Generated from {source} by `make crds`: do not edit.\n"
    text += yaml.safe_dump(module.crd(), sort_keys=False, width=100)
    (out / f"{module.PLURAL}.{api.GROUP}.yaml").write_text(text)
