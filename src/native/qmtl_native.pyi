from typing import Any

def read_nodes(
    raw_nodes: list[Any],
    verify: bool,
    max_tags: int,
    max_depth: int,
    max_text: int,
    node_cls: type,
    context_keys: list[str],
) -> tuple[list[Any], int, list[int] | None] | None: ...
def compute_keys(node_ids: list[str], suffix: str) -> list[str]: ...
