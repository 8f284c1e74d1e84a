"""Coverage-guided fuzzing (atheris / libFuzzer) of the DAG parser and the planner's input:
any bytes must end in a parsed DAG or an InvalidSpec; anything else is a crash.

    python tests/fuzz/dag_parser.py -runs=200000 [corpus_dir]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from qmtl_dagmanager.core import dag, identity
    from qmtl_dagmanager.core.errors import InvalidSpec

SEED = (
    b'{"schema_version":"v1","nodes":[{"node_type":"StreamInput","interval":60,"period":5,'
    b'"tags":["BTC"],"code_hash":"a","schema_hash":"b","schema_compat_id":"c",'
    b'"node_id":"blake3:' + b"0" * 64 + b'"}],"meta":{"topic_namespace":"w.live"}}'
)


def one(data: bytes) -> None:
    for ids in (dag.IdMode.VERIFY, dag.IdMode.TRUST):
        try:
            d = dag.parse(data, ids=ids)
        except InvalidSpec:
            continue
        identity.crc32([n.node_id for n in d.nodes])


def main() -> None:
    one(SEED)
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
