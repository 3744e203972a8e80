"""Benchmark `llmctl clean`: MB/s per core and peak memory, with datatrove beside it.

Input: the C4 and CCNet samples of ../shared/data/web repeated to 25 and 50 MB (written under
bench/out/). Ours: the full default chain (normalize, fastText language id, Gopher repetition
and quality, C4, FineWeb, PII) through the real CLI with 1 and 2 workers; peak RSS is summed
over the whole process tree (polled from /proc). Peer: datatrove's GopherRepetition +
GopherQuality + C4Quality(no terminal-punct rule) + FineWebQuality on the same documents, in
one process, run from a separate venv (datatrove pins its own deps; it never enters ours):

    python3 -m venv bench/out/datatrove-venv
    bench/out/datatrove-venv/bin/pip install datatrove spacy    # no torch is pulled

Without that venv the peer column falls back to the 1.35 MB/s/core figure of
../shared/reference/data.md and says so. Also printed: how often the two chains agree on
keep/drop for the same documents (ours with language id off, as datatrove's side has none).

Usage: .venv/bin/python bench/clean.py [--quick] [--markdown] [--datatrove-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WEB = ROOT.parent / "shared" / "data" / "web"
SOURCES = [WEB / "c4_demo" / "c4_demo.jsonl", *sorted((WEB / "ccnet_head_sample").glob("*.jsonl"))]
LLMCTL = [sys.executable, "-m", "llmctl.cli"]
REFERENCE_MBS = 1.35  # datatrove Gopher+C4 stack, MB/s per core (reference/data.md)


def make_input(mb: int) -> Path:
    path = OUT / f"clean-web-{mb}MB.jsonl"
    lines = b"".join(p.read_bytes() for p in SOURCES)
    if not path.exists() or path.stat().st_size < mb * 1e6:
        OUT.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(int(mb * 1e6 // len(lines)) + 1):
                f.write(lines)
    return path


def tree_rss_kib(root: int) -> int:
    """Resident memory of `root` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            pid = int(entry.name)
            parents[pid] = int(fields["PPid"])
            rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
        except (OSError, ValueError, KeyError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(rss.get(p, 0) for p in tree)


def run_measured(cmd: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and peak process-tree RSS (KiB) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_kib(proc.pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    watcher.join()
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{stderr}")
    return wall, peak[0], done


def ours(path: Path, workers: int, extra: list[str] | None = None) -> dict:
    out = OUT / "clean-out"
    cmd = [*LLMCTL, "clean", str(path), "--out", str(out), "--force", "-q", "-j", str(workers)]
    wall, peak, _ = run_measured(cmd + (extra or []))
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    mb = stats["text_bytes_in"] / 1e6
    return {"mb": mb, "wall": wall, "mbs": mb / wall, "rss_mib": peak / 1024, "stats": stats}


DATATROVE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter,
        GopherQualityFilter, GopherRepetitionFilter)
    steps = [GopherRepetitionFilter(), GopherQualityFilter(),
             C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter()]
    docs = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
    docs = docs[: int(sys.argv[2])]
    for s in steps:  # warm lazy tokenizers outside the timing
        s.filter(Document(text="Warm up the tokenizer. It loads lazily.", id="w"))
    verdicts, size = [], sum(len(t.encode()) for t in docs)
    t0 = time.perf_counter()
    for i, text in enumerate(docs):
        doc, verdict = Document(text=text, id=str(i)), None
        for s in steps:
            r = s.filter(doc)
            if r is not True and r is not None:
                verdict = r[1] if isinstance(r, tuple) else type(s).__name__
                break
        verdicts.append(verdict)
    sec = time.perf_counter() - t0
    print(json.dumps({"mb": size / 1e6, "sec": sec, "verdicts": verdicts}))
    """
)


def datatrove(python: Path, path: Path, n_docs: int) -> dict | None:
    if not python.exists():
        return None
    script = OUT / "datatrove_filters.py"
    script.write_text(DATATROVE_SCRIPT)
    done = subprocess.run(
        [str(python), str(script), str(path), str(n_docs)], capture_output=True, text=True
    )
    if done.returncode != 0:
        print(f"datatrove run failed, using the reference figure:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def our_verdicts(path: Path, n_docs: int) -> tuple[list[str | None], float, float]:
    """Our chain without language id (as the datatrove side), in this process."""
    from llmctl.commands.clean import CleanConfig
    from llmctl.config import load_config
    from llmctl.data.docs import Doc
    from llmctl.data.filters import build_chain

    cfg = load_config(CleanConfig, None, ["language.enabled=false"])
    chain = build_chain(cfg)
    texts = [json.loads(x)["text"] for x in path.open(encoding="utf-8")][:n_docs]
    t0 = time.perf_counter()
    verdicts = [chain(Doc(str(i), t, "b")) for i, t in enumerate(texts)]
    sec = time.perf_counter() - t0
    mb = sum(len(t.encode()) for t in texts) / 1e6
    return [v[1] if v else None for v in verdicts], mb, sec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5/10 MB instead of 25/50 MB")
    ap.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    ap.add_argument(
        "--datatrove-python", type=Path, default=OUT / "datatrove-venv" / "bin" / "python"
    )
    args = ap.parse_args()
    small, big = (5, 10) if args.quick else (25, 50)
    big_path, small_path = make_input(big), make_input(small)
    load = os.getloadavg()[0]

    rows = []
    one = ours(big_path, 1)
    two = ours(big_path, 2)
    half = ours(small_path, 1)
    rows.append(
        (
            "ours, full chain, 1 worker",
            f"{one['mb']:.1f} MB",
            one["mbs"],
            one["mbs"],
            one["rss_mib"],
        )
    )
    rows.append(
        (
            "ours, full chain, 2 workers",
            f"{two['mb']:.1f} MB",
            two["mbs"],
            two["mbs"] / 2,
            two["rss_mib"],
        )
    )
    rows.append(
        (
            "ours, full chain, 1 worker",
            f"{half['mb']:.1f} MB",
            half["mbs"],
            half["mbs"],
            half["rss_mib"],
        )
    )

    n_docs = 2000 if args.quick else 6000  # the peer is slow: compare on a slice
    ov, omb, osec = our_verdicts(big_path, n_docs)
    rows.append(("ours, no language id, in-process", f"{omb:.1f} MB", omb / osec, omb / osec, None))
    peer = datatrove(args.datatrove_python, big_path, n_docs)
    if peer is not None:
        pmbs = peer["mb"] / peer["sec"]
        rows.append(("datatrove 0.10 Gopher+C4+FineWeb", f"{peer['mb']:.1f} MB", pmbs, pmbs, None))
        agree = sum((a is None) == (b is None) for a, b in zip(ov, peer["verdicts"], strict=True))
        same_reason = sum(a == b for a, b in zip(ov, peer["verdicts"], strict=True))
        peer_note = (
            f"keep/drop agreement with datatrove on {len(ov)} docs: {100 * agree / len(ov):.1f}% "
            f"(same reason {100 * same_reason / len(ov):.1f}%; ours kept "
            f"{sum(v is None for v in ov)}, datatrove {sum(v is None for v in peer['verdicts'])})"
        )
        base = pmbs
    else:
        rows.append(
            ("datatrove (reference/data.md figure)", "-", REFERENCE_MBS, REFERENCE_MBS, None)
        )
        peer_note = (
            f"datatrove not runnable here ({args.datatrove_python} missing): peer column is the "
            f"{REFERENCE_MBS} MB/s/core reference figure, not a measurement"
        )
        base = REFERENCE_MBS

    head = "| run | input | MB/s | MB/s per core | vs peer/core | peak RSS |"
    if not args.markdown:  # --markdown: just the table, for docs/benchmarks.md
        print(f"llmctl clean (load average {load:.2f} at start, {os.cpu_count()} cores)")
    print(head)
    print("|---|---|---|---|---|---|")
    for name, size, mbs, per_core, rss in rows:
        r = f"{rss:.0f} MiB" if rss is not None else "-"
        print(f"| {name} | {size} | {mbs:.2f} | {per_core:.2f} | {per_core / base:.2f}x | {r} |")
    if args.markdown:
        return
    print(f"2 workers / 1 worker: {two['mbs'] / one['mbs']:.2f}x")
    print(
        f"peak RSS {small} MB -> {big} MB input (1 worker): "
        f"{half['rss_mib']:.0f} -> {one['rss_mib']:.0f} MiB"
    )
    print(peer_note)
    kept = one["stats"]["docs_kept"] / max(one["stats"]["docs_in"], 1)
    print(f"kept {100 * kept:.1f}% of {one['stats']['docs_in']:,} docs (full chain)")


if __name__ == "__main__":
    main()
