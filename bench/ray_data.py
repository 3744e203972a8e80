"""What `--engine ray` costs and gains on one machine: clean, dedup and tokenize, Ray vs local.

Corpora: the ones bench/clean.py and bench/dedup.py build (web JSONL repeated to --mb MB; the
synthetic web documents with 10% near copies, --docs of them); tokenize encodes the dedup
corpus with a tokenizer trained once beforehand (training stays on the driver; its time is
printed on its own line). All under bench/out/ (not shipped).

For each stage the real CLI runs four times: `--engine local` with 1 and 2 workers, and
`--engine ray` with 1 and 2 tasks at a time on one local Ray of 2 CPUs that this script
starts first (its start-up is timed on its own; each command then joins it, as a user's
commands join a `ray start` cluster). Stage seconds come from the manifests (clean `seconds`,
dedup `throughput.seconds`, tokenize `encode_s`: the work after the engine is up); wall
seconds include Python start-up and joining Ray. The four artifacts of each stage must be
byte-identical (same file digests), else the script fails.

Run: .venv/bin/python bench/ray_data.py [--mb 50] [--docs 25000] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import clean as clean_bench  # noqa: E402  (bench/clean.py: the clean corpus)
import dedup as dedup_bench  # noqa: E402  (bench/dedup.py: the dedup corpus)

OUT = ROOT / "out" / "ray"
LLMCTL = [sys.executable, "-m", "llmctl.cli"]
KEYS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def ray_ticks() -> dict[int, int]:
    """CPU clock ticks (utime + stime) of each live descendant of this process: the Ray
    processes it started (GCS, raylet, agents) and the raylet's workers. From /proc."""
    parents, ticks = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    tree, frontier = set(), [os.getpid()]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    return {p: ticks[p] for p in tree if p in ticks}


class RayCPU:
    """CPU seconds the Ray processes used while the block ran. The raylet does not collect its
    exited workers' times (they are lost to cutime), so live processes are polled every 0.1 s
    and each one's last reading counts (a worker's final 0.1 s before exiting may be missed)."""

    def __enter__(self) -> RayCPU:
        self.start = ray_ticks()
        self.last = dict(self.start)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.1):
            self.last.update(ray_ticks())

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.last.update(ray_ticks())
        used = sum(t - self.start.get(p, 0) for p, t in self.last.items())
        self.seconds = used / os.sysconf("SC_CLK_TCK")


def run_cli(args: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (the command, its pool, the Ray processes) and the manifest
    of one `llmctl` command."""
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with RayCPU() as ray_cpu:
        t0 = time.perf_counter()
        cmd = [*LLMCTL, *args, "--force", "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        time.sleep(1)  # the job's workers exit
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its pool processes
    cpu = ray_cpu.seconds + usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    if r.returncode:
        sys.exit(f"failed: llmctl {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    manifest = json.loads((Path(args[args.index("--out") + 1]) / "manifest.json").read_text())
    return wall, cpu, manifest


def stage_seconds(verb: str, stats: dict) -> float:
    if verb == "clean":
        return stats["seconds"]
    if verb == "dedup":
        return stats["throughput"]["seconds"]
    return stats["encode_s"]


def driver_read_s(path: Path) -> float:
    """Seconds the driver spends reading and batching the input (no parsing: workers parse)."""
    from llmctl.data.docs import ReadOptions, batched, iter_raw

    t0 = time.perf_counter()
    for _ in batched(iter_raw([path], ReadOptions()), 128):
        pass
    return time.perf_counter() - t0


def driver_write_s(verb: str, art: Path) -> float:
    """Seconds the driver spends writing a stage's output (records or tokens) to disk."""
    import gzip
    import tempfile

    import numpy as np

    from llmctl.data import docs, tokens

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        if verb == "tokenize":
            arrays = [np.array(tokens.read_shard(p)) for p in sorted(art.glob("*.bin"))]
            t0 = time.perf_counter()
            w = tokens.ShardWriter(Path(tmp), "train", 10**8, vocab_size=8192, eos_id=1)
            for a in arrays:
                w.write(a)
                np.bincount(a, minlength=8192)
            w.close()
            return time.perf_counter() - t0
        recs = []
        for p in sorted(art.rglob("*.jsonl.gz")):
            with gzip.open(p, "rt", encoding="utf-8") as f:
                recs += [json.loads(line) for line in f]
        t0 = time.perf_counter()
        with docs.ShardWriter(Path(tmp)) as w:
            for r in recs:
                w.write(r)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=50, help="clean corpus size (MB)")
    ap.add_argument("--docs", type=int, default=25_000, help="dedup, tokenize docs (≈50 MB)")
    ap.add_argument("--markdown", action="store_true", help="only the markdown table")
    args = ap.parse_args()
    import ray

    OUT.mkdir(parents=True, exist_ok=True)
    clean_in = clean_bench.make_input(args.mb)
    dedup_bench.OUT.mkdir(parents=True, exist_ok=True)
    docs_in = dedup_bench.OUT / f"docs-{args.docs}.jsonl"
    docs_mb = dedup_bench.make_corpus(docs_in, args.docs, dedup_bench.sentences()) / 1e6

    # The tokenizer is trained once, on the driver, outside the comparison.
    tok = OUT / "tokenizer"
    _, _, tok_manifest = run_cli(["tokenize", str(docs_in), "--out", str(tok), "-j", "2"])
    train_s = tok_manifest["stats"]["tokenizer"]["train_s"]

    t0 = time.perf_counter()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    ray_start = time.perf_counter() - t0
    address = ctx.address_info["gcs_address"]
    stages = {
        "clean": [str(clean_in)],
        "dedup": [str(docs_in)],
        "tokenize": [str(docs_in), "--tokenizer", str(tok)],
    }
    results: dict[str, dict] = {}
    try:
        for verb, inputs in stages.items():
            runs, digests = {}, set()
            for engine in ("local", "ray"):
                for workers in (1, 2):
                    out = OUT / f"{verb}-{engine}-{workers}"
                    cmd = [verb, *inputs, "--out", str(out), "-j", str(workers)]
                    cmd += ["--engine", engine, "--set", f"engine.address={address!r}"]
                    wall, cpu, m = run_cli(cmd)
                    runs[engine, workers] = (stage_seconds(verb, m["stats"]), wall, cpu)
                    digests.add(m["digest"])
            if len(digests) != 1:
                sys.exit(f"{verb}: the four artifacts differ ({len(digests)} digests)")
            mb = args.mb if verb == "clean" else docs_mb
            if verb == "clean":
                mb = m["stats"]["text_bytes_in"] / 1e6
            # What only the driver does (reading, writing; dedup: clustering and its second
            # pass, which re-reads and re-parses in the driver), from the local 1-worker run.
            local = OUT / f"{verb}-local-1"
            driver = driver_read_s(Path(inputs[0])) + driver_write_s(verb, local)
            if verb == "dedup":
                tp = json.loads((local / "manifest.json").read_text())["stats"]["throughput"]
                driver = driver_read_s(Path(inputs[0])) + tp["seconds"] - tp["signature_s"]
            # Ray's fixed cost per command (a new job's worker processes, their `init`):
            # the same stage on the input's first 100 records, Ray minus local, 1 worker.
            head = OUT / f"head-{verb}.jsonl"
            with open(inputs[0], encoding="utf-8") as f:
                head.write_text("".join(f.readline() for _ in range(100)), encoding="utf-8")
            fixed = 0.0
            for engine, sign in (("ray", 1), ("local", -1)):
                cmd = [verb, str(head), *inputs[1:], "--out", str(OUT / f"head-{verb}-{engine}")]
                cmd += ["-j", "1", "--engine", engine, "--set", f"engine.address={address!r}"]
                fixed += sign * stage_seconds(verb, run_cli(cmd)[2]["stats"])
            blocks = mb * 1e6 / (1 << 20)  # tokenize: 1 MiB of input per block
            if verb != "tokenize":  # clean: 128 records a block; dedup: 256
                blocks = m["stats"]["docs_in"] / (128 if verb == "clean" else 256)
            results[verb] = {
                "mb": mb, "runs": runs, "driver": driver, "blocks": blocks, "fixed": fixed
            }  # fmt: skip
    finally:
        ray.shutdown()

    load = os.getloadavg()
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared "
          f"with other users (load average {load[0]:.2f} after the run); Ray {ray.__version__}, "
          f"local Ray of 2 CPUs. Start-up of that Ray: {ray_start:.1f} s (once per cluster). "
          f"Tokenizer training (driver, not compared): {train_s:.1f} s.\n")  # fmt: skip
    print(
        "| stage | MB | local 1 w | local 2 w | ray 1 w | ray 2 w | ray / local (2 w) "
        "| ray 1 → 2 w | local 1 → 2 w | join + start-up per command (ray − local wall) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for verb, r in results.items():
        runs, mb = r["runs"], r["mb"]
        s = {k: v[0] for k, v in runs.items()}
        extra = (runs["ray", 2][1] - s["ray", 2]) - (runs["local", 2][1] - s["local", 2])
        cells = [f"{s[k]:.1f} s ({mb / s[k]:.2f} MB/s)" for k in
                 (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))]  # fmt: skip
        print(f"| {verb} | {mb:.0f} | {' | '.join(cells)} | {s['ray', 2] / s['local', 2]:.2f}× "
              f"| {s['ray', 1] / s['ray', 2]:.2f}× | {s['local', 1] / s['local', 2]:.2f}× "
              f"| {extra:+.1f} s |")  # fmt: skip
    print("\nScaling on paper, from the same runs: T(W) ≈ fixed + max(driver + Ray's per-block "
          "cost, work / W), with work = local 1-worker time − driver time.\n")  # fmt: skip
    print("| stage | driver s | Ray fixed s | Ray per block (ms) | work s "
          "| ceiling (× one worker) | expected 16 w | expected 64 w |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for verb, r in results.items():
        s1, sr = r["runs"]["local", 1][0], r["runs"]["ray", 1][0]
        per_block = max(sr - s1 - r["fixed"], 0.0) / max(r["blocks"], 1)
        serial = r["driver"] + per_block * r["blocks"]
        work = max(s1 - r["driver"], 1e-9)
        x16, x64 = (s1 / (r["fixed"] + max(serial, work / w)) for w in (16, 64))
        print(f"| {verb} | {r['driver']:.1f} | {r['fixed']:.1f} | {per_block * 1e3:.1f} "
              f"| {work:.1f} | {s1 / serial:.1f}× | {x16:.1f}× | {x64:.1f}× |")  # fmt: skip
    print("\nCPU seconds of each whole command: the command, its pool processes, and every "
          "Ray process (GCS, raylet, agents, workers; the idle daemons in the local rows too). "
          "Less sensitive to other users' load than wall time, not immune (caches, SMT)."
          "\n")  # fmt: skip
    print("| stage | local 1 w | local 2 w | ray 1 w | ray 2 w | ray / local (1 w) "
          "| ray / local (2 w) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for verb, r in results.items():
        c = {k: v[2] for k, v in r["runs"].items()}
        cells = " | ".join(
            f"{c[k]:.1f}" for k in (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))
        )
        print(f"| {verb} | {cells} | {c['ray', 1] / c['local', 1]:.2f}× "
              f"| {c['ray', 2] / c['local', 2]:.2f}× |")  # fmt: skip
    if not args.markdown:
        print("\nTargets: ray / local ≤ 1.3× for clean and dedup; ray 1 → 2 workers ≥ 1.6×. "
              "All four artifacts of each stage were byte-identical.")  # fmt: skip


if __name__ == "__main__":
    main()
