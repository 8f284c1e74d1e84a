"""Write the CRDs generated from the API models into crds/ (or into the folder given)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from qmtl_dagmanager.kube import api

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "crds")
out.mkdir(parents=True, exist_ok=True)
text = "# Generated from src/qmtl_dagmanager/kube/api.py by `make crds`: do not edit.\n"
text += yaml.safe_dump(api.crd(), sort_keys=False, width=100)
(out / f"{api.PLURAL}.{api.GROUP}.yaml").write_text(text)
