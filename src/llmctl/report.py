"""The build report: figures gathered from manifests and metrics, drawn into one HTML page.

`gather(nodes)` reads only what the artifacts of a lineage walk already hold (manifests,
`metrics.jsonl`, `samples.jsonl`, each listed and verified) and returns plain JSON-able figures;
`render_html(figures)` draws them with matplotlib (Agg, PNGs embedded as base64 data URIs) into
one self-contained page: no script, no stylesheet or font from the network.

Sections (keys of the figures): `artifacts`, `funnel`, `tokenizer`, `training`, `evals`,
`preference`, `samples`.

Example:
    nodes = [n for root in roots for n in walk(root)]
    figures = gather(nodes)
    Path("report.html").write_text(render_html(figures))
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

from llmctl.files import display
from llmctl.lineage import Node

SECTIONS = ("artifacts", "funnel", "tokenizer", "training", "evals", "preference", "samples")

# What a checkpoint is in the eval table, by the command that made it.
ROLES = {
    "pretrain": "base", "finetune": "finetuned", "align": "aligned", "distill": "distilled",
    "quantize": "quantized", "import": "imported", "lora": "LoRA merged",
}  # fmt: skip


def _jsonl(node: Node, name: str, limit: int = 100_000) -> list[dict[str, Any]]:
    """Rows of a listed JSONL file of a verified artifact (malformed lines skipped)."""
    m = node.manifest
    if m is None or node.status != "ok" or name not in m.files:
        return []
    rows = []
    with open(m.path / name, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _by_command(nodes: list[Node], command: str) -> list[Node]:
    return [n for n in nodes if n.command == command and n.manifest is not None]


def gather(nodes: list[Node]) -> dict[str, Any]:
    """Every section's figures from the nodes of one or more lineage walks (deduplicated)."""
    uniq: dict[str, Node] = {}
    for n in nodes:
        uniq.setdefault(n.path, n)
    nodes = list(uniq.values())
    return {
        "artifacts": [
            {"path": n.path, "kind": n.kind, "command": n.command, "status": n.status,
             "digest": n.digest, "config_digest": n.config_digest, "figures": n.figures,
             "duration_s": _num((n.manifest.data if n.manifest else {}).get("duration_s")),
             "flagged": [f"{lk.name} <- {lk.path}: {lk.status}" for lk in n.inputs
                         if lk.status != "ok"]}
            for n in nodes
        ],
        "funnel": _funnel(nodes),
        "tokenizer": _tokenizer(nodes),
        "training": _training(nodes),
        "evals": _evals(nodes),
        "preference": _preference(nodes),
        "samples": _samples(nodes),
    }  # fmt: skip


def _funnel(nodes: list[Node]) -> dict[str, Any]:
    """Documents and bytes per data stage, and why documents were dropped."""
    stages: list[dict[str, Any]] = []
    reasons: dict[str, dict[str, Any]] = {}
    for n in _by_command(nodes, "clean"):
        s = n.manifest.stats  # type: ignore[union-attr]
        stages.append({"stage": "raw", "path": n.path, "docs": s.get("docs_in"),
                       "bytes": s.get("text_bytes_in")})  # fmt: skip
        stages.append({"stage": "clean", "path": n.path, "docs": s.get("docs_kept"),
                       "bytes": s.get("text_bytes_out")})  # fmt: skip
        for reason, r in (s.get("dropped_by_reason") or {}).items():
            if isinstance(r, dict):
                reasons[reason] = {"stage": f"clean/{r.get('step', '?')}",
                                   "docs": r.get("docs"), "bytes": r.get("bytes")}  # fmt: skip
        for reason, count in (s.get("malformed_by_reason") or {}).items():
            reasons[f"malformed: {reason}"] = {"stage": "clean", "docs": count, "bytes": None}
    for n in _by_command(nodes, "dedup"):
        s = n.manifest.stats  # type: ignore[union-attr]
        stages.append({"stage": "dedup", "path": n.path, "docs": s.get("docs_out"),
                       "bytes": s.get("bytes_out")})  # fmt: skip
        for key, what in (("exact_removed", "exact duplicate"), ("near_removed", "near duplicate"),
                          ("contaminated", "eval contamination")):  # fmt: skip
            if s.get(key):
                reasons[what] = {"stage": "dedup", "docs": s.get(key), "bytes": None}
    for n in _by_command(nodes, "tokenize"):
        s = n.manifest.stats  # type: ignore[union-attr]
        docs = s.get("docs") or {}
        tokens = s.get("tokens") or {}
        stages.append({"stage": "tokenize", "path": n.path,
                       "docs": sum(v for v in docs.values() if isinstance(v, int)) or None,
                       "bytes": s.get("text_bytes"),
                       "tokens": sum(v for v in tokens.values() if isinstance(v, int)) or None,
                       })  # fmt: skip
        if s.get("empty_docs"):
            reasons["empty after tokenizing"] = {"stage": "tokenize", "docs": s["empty_docs"],
                                                 "bytes": None}  # fmt: skip
    return {"stages": stages, "drop_reasons": reasons}


def _tokenizer(nodes: list[Node]) -> list[dict[str, Any]]:
    out = []
    for n in _by_command(nodes, "tokenize"):
        s = n.manifest.stats  # type: ignore[union-attr]
        tok = s.get("tokenizer") or {}
        out.append({
            "path": n.path, "vocab_size": s.get("vocab_size"), "vocab_used": s.get("vocab_used"),
            "bytes_per_token": s.get("bytes_per_token"), "tokens": s.get("tokens"),
            "docs": s.get("docs"), "val_split": s.get("val_split"), "dtype": s.get("dtype"),
            "trained": tok.get("trained"), "sample_docs": tok.get("sample_docs"),
            "sample_bytes": tok.get("sample_bytes"), "train_s": tok.get("train_s"),
        })  # fmt: skip
    return out


def _training(nodes: list[Node]) -> list[dict[str, Any]]:
    """Train and val loss per logged step of every artifact holding a metrics.jsonl."""
    out = []
    for n in nodes:
        rows = _jsonl(n, "metrics.jsonl")
        if not rows:
            continue
        train = [(r["step"], r["loss"]) for r in rows if _num(r.get("loss")) is not None
                 and _num(r.get("step")) is not None]  # fmt: skip
        val = [(r["step"], r["val_loss"]) for r in rows if _num(r.get("val_loss")) is not None
               and _num(r.get("step")) is not None]  # fmt: skip
        s = n.manifest.stats if n.manifest else {}
        s = {**s, **s.get("qat", {})}  # quantize --method qat keeps its training figures there
        out.append({"path": n.path, "command": n.command, "train": train, "val": val,
                    "final_train_loss": s.get("train_loss"), "final_val_loss": s.get("val_loss"),
                    "steps": s.get("steps"), "tokens_per_s": s.get("tokens_per_s")})  # fmt: skip
    return out


def _file_bytes(n: Node) -> int | None:
    files = n.manifest.files if n.manifest else {}
    total = sum(f["bytes"] for name, f in files.items() if name.endswith(".safetensors"))
    return total or None


def _evals(nodes: list[Node]) -> list[dict[str, Any]]:
    """One row per checkpoint: val bits per byte (an eval artifact of it, or the quantize
    report), file size, decode tokens/s (quantize's batch-1 timing, else its samples')."""
    evals: dict[str, dict[str, Any]] = {}
    speeds: dict[str, float] = {}
    for n in nodes:
        if n.manifest is None:
            continue
        ckpt = (n.manifest.data.get("inputs") or {}).get("checkpoint") or {}
        target = ckpt.get("digest")
        if n.kind == "eval" and target:
            evals[target] = n.manifest.stats
        speed = _num(n.manifest.stats.get("tokens_per_s"))
        if n.kind == "samples" and target and speed and not n.manifest.config.get("adapter"):
            speeds.setdefault(target, speed)
    rows = []
    for n in nodes:
        if n.kind != "checkpoint" or n.manifest is None:
            continue
        s = n.manifest.stats
        if (s.get("preference") or {}).get("method") == "reward":
            continue  # a reward model scores pairs (the preference section), not text
        q = s.get("report") if isinstance(s.get("report"), dict) else {}
        after = q.get("after") or {}
        e = evals.get(n.digest or "", {})
        role = ROLES.get(n.command or "", n.command or "?")
        if n.command == "quantize":
            role = f"quantized ({q.get('method') or n.manifest.config.get('method', '?')})"
        bpb, loss, source = e.get("bits_per_byte"), e.get("loss"), "eval" if e else None
        if bpb is None and after.get("bits_per_byte") is not None:
            bpb, loss, source = after["bits_per_byte"], after.get("val_loss"), "quantize report"
        speed, speed_src = after.get("decode_tokens_per_s"), "quantize (batch 1)"
        if speed is None and (n.digest or "") in speeds:
            speed, speed_src = speeds[n.digest or ""], "generate"
        params = s.get("params") or s.get("params_total")
        if params is None and n.command == "quantize":  # the same parameters as its base
            base = next((m for m in nodes if m.manifest and m.digest == ckpt_digest(n)), None)
            params = base.manifest.stats.get("params") if base and base.manifest else None
        rows.append({
            "path": n.path, "role": role, "command": n.command,
            "params": params, "file_bytes": _file_bytes(n),
            "val_bits_per_byte": bpb, "val_loss": loss, "bpb_source": source,
            "eval_tokens": e.get("tokens") or q.get("eval_tokens"),
            "decode_tokens_per_s": speed, "speed_source": speed_src if speed else None,
            "digest": n.digest,
        })  # fmt: skip
    # base first, then what was made from it, each quantized form last
    order = ["base", "imported", "finetuned", "aligned", "LoRA merged", "distilled"]
    return sorted(rows, key=lambda r: (order.index(r["role"]) if r["role"] in order
                                       else len(order), r["path"]))  # fmt: skip


def ckpt_digest(n: Node) -> str | None:
    """The digest of the checkpoint an artifact was made from (its `checkpoint` input)."""
    ref = ((n.manifest.data.get("inputs") if n.manifest else None) or {}).get("checkpoint")
    return ref.get("digest") if isinstance(ref, dict) else None


def _preference(nodes: list[Node]) -> list[dict[str, Any]]:
    out = []
    for n in nodes:
        s = n.manifest.stats if n.manifest else {}
        pref, rl = s.get("preference"), s.get("rl")
        if isinstance(pref, dict) or isinstance(rl, dict):
            out.append({"path": n.path, "command": n.command,
                        "preference": pref if isinstance(pref, dict) else None,
                        "rl": rl if isinstance(rl, dict) else None})  # fmt: skip
    return out


def _samples(nodes: list[Node]) -> list[dict[str, Any]]:
    """Generations grouped by prompt: {prompt, by: [{model, path, completion, finish}]}."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        if n.kind != "samples" or n.manifest is None:
            continue
        inputs = n.manifest.data.get("inputs") or {}
        model = (inputs.get("checkpoint") or {}).get("path", "?")
        adapter = n.manifest.config.get("adapter") or ""
        label = f"{model} + {display(adapter)}" if adapter else model
        for row in _jsonl(n, "samples.jsonl", limit=50):
            prompt = str(row.get("prompt", ""))
            groups.setdefault(prompt, []).append({
                "model": label, "path": n.path, "chat": bool(n.manifest.config.get("chat")),
                "sample": row.get("sample", 0), "completion": str(row.get("completion", "")),
                "finish_reason": row.get("finish_reason"),
            })  # fmt: skip
    return [{"prompt": p, "by": by} for p, by in groups.items()]


# ---------------------------------------------------------------- rendering


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:,.{digits}g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return str(x)


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    out = ["<table><thead><tr>", *(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def plots(figures: dict[str, Any]) -> dict[str, str]:
    """The report's PNGs (base64), by name: funnel, drops, loss-<i>, evals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    stages = [s for s in figures["funnel"]["stages"] if s.get("docs") is not None]
    if stages:
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
        names = [s["stage"] for s in stages]
        a.bar(names, [s["docs"] for s in stages], color="#4878a8")
        a.set_title("documents per stage")
        b.bar(names, [(s.get("bytes") or 0) / 1e6 for s in stages], color="#6a9f58")
        b.set_title("text MB per stage")
        out["funnel"] = _png(fig)
    reasons = figures["funnel"]["drop_reasons"]
    if reasons:
        items = sorted(reasons.items(), key=lambda kv: kv[1].get("docs") or 0)
        fig, ax = plt.subplots(figsize=(9, 0.3 * len(items) + 1))
        ax.barh([k for k, _ in items], [v.get("docs") or 0 for _, v in items], color="#c06050")
        ax.set_title("documents dropped, by reason")
        out["drops"] = _png(fig)
    for i, t in enumerate(figures["training"]):
        if not t["train"] and not t["val"]:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3))
        if t["train"]:
            ax.plot(*zip(*t["train"], strict=True), label="train", color="#4878a8")
        if t["val"]:
            ax.plot(*zip(*t["val"], strict=True), "o-", label="val", color="#c06050")
        ax.set_title(f"{t['command']}: {t['path']}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        out[f"loss-{i}"] = _png(fig)
    pts = [r for r in figures["evals"] if r["val_bits_per_byte"] is not None and r["file_bytes"]]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        markers = "os^Dv<>pP*hX"
        for i, r in enumerate(pts):  # a legend, not labels: quantized forms sit close together
            ax.scatter(r["file_bytes"] / 1e6, r["val_bits_per_byte"], marker=markers[i % 12],
                       s=50, label=f"{r['path'].rsplit('/', 1)[-1]} ({r['role']})")  # fmt: skip
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        ax.set_xlabel("file MB")
        ax.set_ylabel("val bits per byte")
        ax.set_title("quality vs size (lower left is better)")
        out["evals"] = _png(fig)
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}img{max-width:100%}.absent{color:#888;font-style:italic}
.flag{color:#b00;font-weight:bold}.grid{display:flex;flex-wrap:wrap;gap:8px}
.sample{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em}
"""


def render_html(figures: dict[str, Any], images: dict[str, str], title: str) -> str:
    """The one page: every section, absent ones said so."""
    e = html.escape
    absent = '<p class="absent">{}</p>'.format
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    arts = figures["artifacts"]
    bad = [a for a in arts if a["status"] != "ok" or a["flagged"]]
    parts.append('<section id="artifacts"><h2>Artifacts</h2>')
    if bad:
        parts.append(f'<p class="flag">{len(bad)} artifact(s) or links not trusted: '
                     + e("; ".join(f"{a['path']} ({a['status']}; {', '.join(a['flagged'])})"
                                   for a in bad)) + "</p>")  # fmt: skip
    else:
        parts.append("<p>Every artifact verifies against its manifest and every link holds.</p>")
    parts.append(_table(["path", "kind", "command", "status", "seconds", "config", "digest"], [
        [a["path"], a["kind"], a["command"], a["status"], a["duration_s"],
         (a["config_digest"] or "")[:12] or None, (a["digest"] or "")[:12] or None]
        for a in arts]) + "</section>")  # fmt: skip

    f = figures["funnel"]
    parts.append('<section id="funnel"><h2>Data funnel</h2>')
    if f["stages"]:
        if "funnel" in images:
            parts.append(_img(images["funnel"], "documents and bytes per stage"))
        parts.append(_table(["stage", "artifact", "documents", "text bytes", "tokens"], [
            [s["stage"], s["path"], s.get("docs"), s.get("bytes"), s.get("tokens")]
            for s in f["stages"]]))  # fmt: skip
        if "drops" in images:
            parts.append(_img(images["drops"], "documents dropped by reason"))
        parts.append(_table(["drop reason", "stage", "documents", "bytes"], [
            [k, v.get("stage"), v.get("docs"), v.get("bytes")]
            for k, v in sorted(f["drop_reasons"].items(), key=lambda kv: -(kv[1].get("docs") or 0))
        ]) if f["drop_reasons"] else absent("nothing dropped"))  # fmt: skip
    else:
        parts.append(absent("no data stages in this build"))
    parts.append("</section>")

    parts.append('<section id="tokenizer"><h2>Tokenizer</h2>')
    toks = figures["tokenizer"]
    parts.append(_table(
        ["artifact", "vocab", "used", "bytes/token", "train tokens", "val tokens", "val docs",
         "trained on (docs, bytes)"],
        [[t["path"], t["vocab_size"], t["vocab_used"], t["bytes_per_token"],
          (t["tokens"] or {}).get("train"), (t["tokens"] or {}).get("val"),
          (t["docs"] or {}).get("val"),
          f"{_fmt(t['sample_docs'])}, {_size(t['sample_bytes'])}" if t["trained"] else "reused"]
         for t in toks]) if toks else absent("no tokenize stage in this build"))  # fmt: skip
    parts.append("</section>")

    parts.append('<section id="training"><h2>Loss curves</h2><div class="grid">')
    shown = [i for i in range(len(figures["training"])) if f"loss-{i}" in images]
    parts.extend(_img(images[f"loss-{i}"], f"loss of {figures['training'][i]['path']}")
                 for i in shown)  # fmt: skip
    parts.append("</div>")
    tr = figures["training"]
    parts.append(_table(["artifact", "command", "steps", "final train loss", "final val loss",
                         "tokens/s"],
                        [[t["path"], t["command"], t["steps"], t["final_train_loss"],
                          t["final_val_loss"], t["tokens_per_s"]] for t in tr])
                 if tr else absent("no training stage in this build"))  # fmt: skip
    parts.append("</section>")

    parts.append('<section id="evals"><h2>Evaluation across checkpoints</h2>')
    ev = figures["evals"]
    if ev:
        parts.append(
            "<p>Val bits per byte on the tokens' val split (lower is better; does not "
            "depend on the tokenizer); — marks a figure no artifact recorded.</p>"
        )
        parts.append(_table(
            ["checkpoint", "role", "params", "file", "val bits/byte", "val loss", "from",
             "decode tokens/s", "timed by"],
            [[r["path"], r["role"], r["params"], _size(r["file_bytes"]), r["val_bits_per_byte"],
              r["val_loss"], r["bpb_source"], r["decode_tokens_per_s"], r["speed_source"]]
             for r in ev]))  # fmt: skip
        if "evals" in images:
            parts.append(_img(images["evals"], "val bits per byte against file size"))
    else:
        parts.append(absent("no checkpoints in this build"))
    parts.append("</section>")

    parts.append('<section id="preference"><h2>Preference accuracy and rewards</h2>')
    pref = figures["preference"]
    prows = [r for r in pref if r["preference"]]
    rrows = [r for r in pref if r["rl"]]
    if prows:
        keys = ["accuracy", "base_accuracy", "margin", "chosen_logp", "rejected_logp", "kl",
                "pairs", "cut", "rejected"]  # fmt: skip
        parts.append(
            _table(
                ["artifact", *keys],
                [[r["path"], *(r["preference"].get(k) for k in keys)] for r in prows],
            )
        )
    if rrows:
        keys = ["method", "reward_before", "reward_after", "kl", "steps"]
        parts.append(
            _table(
                ["artifact", *keys], [[r["path"], *(r["rl"].get(k) for k in keys)] for r in rrows]
            )
        )
    if not pref:
        parts.append(absent("no align stage in this build (DPO, reward model + RL, RLAIF)"))
    parts.append("</section>")

    parts.append('<section id="samples"><h2>Samples side by side</h2>')
    for g in figures["samples"]:
        parts.append(f"<h3>{e(repr(g['prompt']))}</h3>")
        parts.append("<table><thead><tr><th>model</th><th>completion</th><th>finish</th>"
                     "</tr></thead><tbody>")  # fmt: skip
        for b in g["by"]:
            many = sum(1 for x in g["by"] if x["path"] == b["path"]) > 1
            tag = (" (chat)" if b["chat"] else "") + (f" #{b['sample']}" if many else "")
            parts.append(f"<tr><td>{e(b['model'] + tag)}</td>"
                         f'<td class="sample">{e(b["completion"])}</td>'
                         f"<td>{e(str(b['finish_reason']))}</td></tr>")  # fmt: skip
        parts.append("</tbody></table>")
    if not figures["samples"]:
        parts.append(absent("no samples in this build"))
    parts.append("</section></body></html>\n")
    return "\n".join(parts)
