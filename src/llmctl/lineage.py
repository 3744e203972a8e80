"""The chain of artifacts behind an artifact, walked back through the manifests' `inputs`.

Every manifest names its inputs with what they were at build time: an artifact's path, kind and
digest, a raw file's size and sha256, a raw folder's digest (`artifacts.input_ref`). Walking
back, each link is checked against what is on disk now, and each artifact against its own
manifest (every file's size and sha256, and the `digest` recomputed from the `files` table), so
a link that no longer holds is flagged instead of trusted:

- node `ok`: the artifact verifies; `damaged`: a file differs from its manifest, or the manifest
  does not parse, or its digest does not match its files (hand-edited); `missing`: nothing there.
- link `ok`: the input is what the manifest recorded; `stale`: the artifact at that path now has
  another digest (rebuilt or replaced upstream since); `changed`: a raw file or folder whose
  sha256/digest differs; `unverified`: recorded without a hash (an older manifest), or the input
  is damaged or missing.

Example:
    nodes = walk(Path("out/q-int8"))
    [n.path for n in nodes]   # out/q-int8, out/model, out/tokens, ..., recipes/data/web
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.artifacts import (
    KINDS,
    MANIFEST,
    Manifest,
    files_digest,
    is_artifact,
    open_artifact,
    raw_ref,
)
from llmctl.errors import UsageError
from llmctl.files import display


@dataclass
class Link:
    """One recorded input of a node: its role, the recorded ref and what it is now."""

    name: str
    path: str  # as recorded
    kind: str
    recorded: str | None  # the digest or sha256 the manifest recorded
    current: str | None  # what the input has now (None: cannot tell)
    status: str  # ok, stale, changed, unverified
    node: int | None = None  # index of the input's node in the walk


@dataclass
class Node:
    """One artifact (or raw input) of the chain."""

    path: str
    kind: str
    command: str | None = None
    config_digest: str | None = None
    digest: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    inputs: list[Link] = field(default_factory=list)
    status: str = "ok"  # ok, damaged, missing (raw: ok, changed, missing)
    problem: str = ""
    created: str | None = None
    manifest: Manifest | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "manifest"}
        d["inputs"] = [link.__dict__ for link in self.inputs]
        return d


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON: equal digests, equal settings."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


# Figures worth a glance per node, by stats key; nested ones by dotted path.
_FIGURES = (
    "docs_in", "docs_kept", "docs_out", "text_bytes_out", "exact_removed", "near_removed",
    "tokens.train", "tokens.val", "vocab_size", "bytes_per_token", "steps", "params",
    "params_trainable", "train_loss", "val_loss", "base_val_loss", "loss", "bits_per_byte",
    "samples", "tokens_per_s", "report.method", "report.after.bits_per_byte",
    "report.after.file_bytes", "report.size_ratio", "preference.accuracy", "preference.margin",
    "rl.reward_before", "rl.reward_after", "format", "type", "bytes",
)  # fmt: skip


def key_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """The scalar figures of `_FIGURES` present in a manifest's stats."""
    out: dict[str, Any] = {}
    for key in _FIGURES:
        value: Any = stats
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[key] = round(value, 4) if isinstance(value, float) else value
    return out


def _candidates(recorded: str, child: Path) -> list[Path]:
    """Where a recorded input may be now, in order: a sibling of the artifact that recorded it
    with the recorded name (a build directory is copied or moved as a whole, as make's OUT),
    then the path as recorded (relative to the directory the build ran in, usually this one).
    Whichever is found, its digest is compared with the recorded one: a wrong guess shows as a
    flagged link, never as a trusted one."""
    p = Path(recorded)
    sibling = child.parent / p.name
    return [sibling, p] if p.name and sibling.resolve() != child.resolve() else [p]


def _open_node(path: Path) -> Node:
    """A node for the artifact at `path`, verified file by file; damaged/missing, not raised."""
    node = Node(path=display(path), kind="?")
    if not path.exists() and not path.is_symlink():
        node.status, node.problem = "missing", "no such artifact"
        return node
    try:
        m = open_artifact(path, KINDS, verify=True)
    except UsageError as e:
        node.status, node.problem = "damaged", str(e)
        _read_loose(node, path)
        return node
    node.manifest = m
    node.kind, node.command, node.digest = m.kind, m.data.get("command"), m.digest
    node.config_digest = config_digest(m.config)
    node.figures = key_figures(m.stats)
    node.created = m.data.get("created")
    if files_digest(m.files) != m.digest:
        node.status = "damaged"
        node.problem = f"{display(path / MANIFEST)}: digest does not match its files (edited)"
    return node


def _read_loose(node: Node, path: Path) -> None:
    """What a damaged artifact's manifest still says (to keep walking), when it parses."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and isinstance(data.get("inputs"), dict):
        node.kind = str(data.get("kind", "?"))
        node.command = data.get("command") if isinstance(data.get("command"), str) else None
        node.digest = data.get("digest") if isinstance(data.get("digest"), str) else None
        node.manifest = Manifest(path=path, data=data)


def _raw_link(name: str, ref: dict[str, Any], child: Path) -> tuple[Link, Node]:
    recorded = ref.get("sha256") or ref.get("digest")
    # a raw input is never an artifact: a sibling artifact of the same name (out/sft beside
    # out/lora, which read recipes/data/sft) is not it
    cands = _candidates(str(ref.get("path", "")), child)
    where = next((p for p in cands if p.exists() and not is_artifact(p)), None)
    node = Node(path=str(ref.get("path", "")), kind="file", figures={
        k: ref[k] for k in ("bytes", "files") if isinstance(ref.get(k), int)})  # fmt: skip
    if where is None:
        node.status, node.problem = "missing", "no longer on disk"
        return Link(name, node.path, "file", recorded, None, "unverified"), node
    node.path = display(where)
    now = raw_ref(where)
    current = now.get("sha256") or now.get("digest")
    node.digest = current
    if recorded is None:
        status = "unverified"
    elif current == recorded:
        status = "ok"
    else:
        status, node.status = "changed", "changed"
        node.problem = "differs from what the build read"
    return Link(name, node.path, "file", recorded, current, status), node


def walk(root: Path | str) -> list[Node]:
    """Every node behind `root` (itself first), each once, with its checked input links.

    Raises UsageError when `root` itself is not an artifact (a typo, a plain folder)."""
    root = Path(root)
    if not is_artifact(root):
        raise UsageError(f"{display(root)}: not an artifact (no {MANIFEST}); nothing to trace")
    open_artifact(root, KINDS)  # the artifact asked about must hold (exit 2); upstream: flagged
    nodes: list[Node] = []
    seen: dict[str, int] = {}

    def visit(path: Path) -> int:
        key = str(path.resolve())
        if key in seen:
            return seen[key]
        node = _open_node(path)
        seen[key] = len(nodes)
        nodes.append(node)
        if node.manifest is None:
            return seen[key]
        inputs = node.manifest.data.get("inputs", {})
        for name, ref in inputs.items() if isinstance(inputs, dict) else ():
            if not isinstance(ref, dict):
                continue
            if ref.get("kind") in KINDS:
                node.inputs.append(_artifact_link(name, ref, path, visit))
            else:
                link, raw = _raw_link(name, ref, path)
                rkey = "raw:" + str(Path(raw.path).resolve())
                if rkey not in seen:
                    seen[rkey] = len(nodes)
                    nodes.append(raw)
                link.node = seen[rkey]
                node.inputs.append(link)
        return seen[key]

    visit(root)
    # a link to an input that fails its own checks is not trusted either
    for n in nodes:
        for link in n.inputs:
            target = nodes[link.node] if link.node is not None else None
            if target is not None and target.status != "ok" and link.status == "ok":
                link.status = target.status
    return nodes


def _artifact_link(name: str, ref: dict[str, Any], child: Path, visit: Any) -> Link:
    recorded = ref.get("digest") if isinstance(ref.get("digest"), str) else None
    kind = ref.get("kind")
    found = [(p, _kind_of(p)) for p in _candidates(str(ref.get("path", "")), child)]
    # of the recorded kind, else one whose manifest no longer parses (to report it damaged)
    cands = [p for p, k in found if k == kind] or [p for p, k in found if k == "?"]
    where = (cands or [Path(str(ref.get("path", "")))])[0]
    index = visit(where)
    current = _digest_of(where)
    if recorded is None or current is None:
        status = "unverified"
    else:
        status = "ok" if current == recorded else "stale"
    return Link(name, str(ref.get("path", "")), str(ref.get("kind")), recorded, current, status,
                index)  # fmt: skip


def _kind_of(path: Path) -> str | None:
    """The kind a directory's manifest claims (None: not an artifact or unreadable)."""
    if not is_artifact(path):
        return None
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "?"  # an artifact whose manifest is damaged: still the candidate to report
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else "?"


def _digest_of(path: Path) -> str | None:
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    d = data.get("digest") if isinstance(data, dict) else None
    return d if isinstance(d, str) else None


def flagged(nodes: list[Node]) -> list[str]:
    """One line per node or link that is not `ok` (empty: the whole chain holds)."""
    out = []
    for n in nodes:
        if n.status != "ok":
            out.append(f"{n.path}: {n.status}" + (f" ({n.problem})" if n.problem else ""))
        for link in n.inputs:
            if link.status != "ok":
                out.append(f"{n.path} <- {link.name} {link.path}: {link.status}")
    return out
