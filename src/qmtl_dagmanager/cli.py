"""The `dagmanager` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.config import Settings, SettingsError
from qmtl_dagmanager.core.errors import DagManagerError

log = logging.getLogger("qmtl_dagmanager")


async def _neo4j(settings: Settings, action: str, out: Path | None) -> int:
    if settings.embedded_graph:
        print(
            "error: NEO4J_URI is not set (the embedded graph store has no schema)", file=sys.stderr
        )
        return 2
    graph = bootstrap.graph_store(settings)
    try:
        if action == "init":
            await graph.init_schema()
            print(f"schema ready on {settings.neo4j_uri}")
        elif action == "rollback":
            await graph.rollback_schema()
            print(f"schema removed from {settings.neo4j_uri}")
        else:
            text = ";\n".join(graph.schema_statements()) + ";\n"
            if out is None:
                sys.stdout.write(text)
            else:
                out.write_text(text)
                print(f"wrote {len(graph.schema_statements())} statements to {out}")
    finally:
        await graph.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dagmanager", description="QMTL DAG Manager")
    ap.add_argument("--log-level", default=os.environ.get("QMTL_LOG_LEVEL", "INFO"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("neo4j-init", help="create the graph's constraints and indexes (idempotent)")
    sub.add_parser("neo4j-rollback", help="drop the graph's constraints and indexes")
    exp = sub.add_parser("export-schema", help="write the graph schema as Cypher")
    exp.add_argument("--out", type=Path, help="file to write (default: standard output)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env(os.environ)
        if args.cmd in ("neo4j-init", "neo4j-rollback"):
            return asyncio.run(_neo4j(settings, args.cmd.removeprefix("neo4j-"), None))
        if args.cmd == "export-schema":
            if settings.embedded_graph:  # the schema does not depend on a server: export it
                settings = Settings(neo4j_uri="bolt://127.0.0.1:7687")
            return asyncio.run(_neo4j(settings, "export", args.out))
    except (SettingsError, DagManagerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
