"""`llmctl lineage`: the chain of artifacts behind one artifact, back to the raw files.

Prints each node (path, kind, command, config digest, key figures, inputs) and flags every
link that no longer holds (see `llmctl.lineage`); `--json` prints the same as a list of nodes.
Reads manifests and hashes files; writes nothing.

Example:
    llmctl lineage out/q-int8
    llmctl lineage out/sft --json | jq '.[] | select(.status != "ok")'
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from llmctl.lineage import Node, flagged, walk
from llmctl.runtime import info, warn


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


def render(nodes: list[Node]) -> str:
    """The human view: one block per node, inputs as `name <- path [status]`."""
    lines = []
    for i, n in enumerate(nodes):
        what = f"{n.kind} by {n.command}" if n.command else n.kind
        lines.append(f"[{i}] {n.path}  ({what})  {n.status.upper()}")
        if n.problem:
            lines.append(f"    ! {n.problem}")
        if n.command:
            lines.append(f"    config {_short(n.config_digest)}  digest {_short(n.digest)}"
                         f"  created {n.created or '-'}")  # fmt: skip
        elif n.digest:
            what = "digest" if "files" in n.figures else "sha256"  # a folder: its files' digest
            lines.append(f"    {what} {_short(n.digest)}")
        if n.figures:
            lines.append("    " + "  ".join(f"{k}={v}" for k, v in n.figures.items()))
        for link in n.inputs:
            mark = "" if link.status == "ok" else f"  <-- {link.status.upper()}"
            if link.status == "stale":
                mark += f" (recorded {_short(link.recorded)}, now {_short(link.current)})"
            lines.append(f"    {link.name} <- [{link.node}] {link.path} [{link.status}]{mark}")
    return "\n".join(lines)


def run(artifact: Path, as_json: bool = False) -> list[Node]:
    """Walk `artifact`'s lineage; print it (text or JSON on stdout), warn about flagged links."""
    nodes = walk(artifact)
    if as_json:
        print(json.dumps([n.to_json() for n in nodes], indent=2, default=str))
    else:
        print(render(nodes))
    bad = flagged(nodes)
    arts = sum(1 for n in nodes if n.command)
    raw = sum(1 for n in nodes if n.kind == "file")
    if bad:
        for line in bad:
            warn(f"not trusted: {escape(line)}")
    info(f"lineage: {arts} artifacts, {raw} raw inputs; "
                  + (f"{len(bad)} flagged" if bad else "every link holds"))  # fmt: skip
    return nodes
