"""The full build as users run it: `make -f recipes/build.mk` on the bundled corpus, preset tiny.

Runs the real chain (clean → dedup → tokenize → pretrain → {eval, samples, finetune → chat,
export gguf; lora → lora-chat; distill; quantize int8/int4/static/qat} → report) with `-j2`,
then checks what make promises: every stage's artifact is complete and names its inputs, a
second `make` has nothing to do, touching one stage's TOML reruns exactly that stage and what
follows it, and a `make` killed mid-stage (a data stage, then training) and rerun gives
byte-identical data files and weights. The recipes are copied to a scratch directory (the
corpus linked), so touching TOMLs never touches the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.artifacts import open_artifact
from llmctl.lineage import flagged, walk
from procs import run_tree

REPO = Path(__file__).resolve().parent.parent
LLMCTL = str(Path(sys.executable).with_name("llmctl"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("build"),  # one worker builds the chain once for every test here
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DATA_STAGES = ("clean", "dedup", "tokens")
QUANT = ("int8", "int4", "static", "qat")


def make_cmd(out: str, *targets: str, flags: tuple[str, ...] = ()) -> list[str]:
    return ["make", *flags, "-f", str(REPO / "recipes" / "build.mk"), "PRESET=tiny",
            f"OUT={out}", f"LLMCTL={LLMCTL}", *targets]  # fmt: skip


def make(work: Path, out: str, *targets: str, flags: tuple[str, ...] = ()) -> str:
    r = run_tree(make_cmd(out, *targets, flags=flags), 600, cwd=work, env=ENV,
                 capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def planned(work: Path, out: str = "out") -> set[str]:
    """The artifacts a `make all` would (re)build now, by --out name."""
    text = make(work, out, "all", flags=("-n",))
    return set(re.findall(r"--out \S*?/([\w.-]+)", text))


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("build")
    (work / "recipes").mkdir()
    shutil.copytree(REPO / "recipes" / "tiny", work / "recipes" / "tiny")
    (work / "recipes" / "data").symlink_to(REPO / "recipes" / "data")
    make(work, "out", "all", flags=("-j2",))
    return work


def test_the_tiny_chain_builds_every_stage(build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = build / "out"
    kinds = {"clean": "docs", "dedup": "docs", "tokens": "tokens", "model": "checkpoint",
             "sft": "checkpoint", "lora": "adapter", "distill": "checkpoint",
             "q-int8": "checkpoint", "q-int4": "checkpoint", "q-static": "checkpoint",
             "q-qat": "checkpoint", "gguf": "export", "eval-model": "eval", "eval-sft": "eval",
             "eval-distill": "eval", "samples-model": "samples", "chat-sft": "samples",
             "lora-chat": "samples", "report": "report", "dpo": "checkpoint",
             "rm": "checkpoint", "grpo": "checkpoint", "rlaif": "checkpoint",
             "eval-dpo": "eval", "chat-dpo": "samples", "chat-grpo": "samples",
             "chat-rlaif": "samples", **{f"eval-q-{q}": "eval" for q in QUANT}}  # fmt: skip
    arts = {name: open_artifact(out / name, kind) for name, kind in kinds.items()}
    assert arts["dedup"].data["inputs"]["input-0"]["digest"] == arts["clean"].digest
    assert arts["tokens"].data["inputs"]["input-0"]["digest"] == arts["dedup"].digest
    assert arts["clean"].stats["docs_in"] > arts["clean"].stats["docs_kept"] > 0

    rows = [json.loads(line) for line in (out / "samples-model" / "samples.jsonl").open()]
    assert len(rows) == 2 and all(r["completion_tokens"] == 32 for r in rows)
    ev = arts["eval-model"].stats
    assert ev["loss"] > 0 and ev["bits_per_byte"] > 0
    assert abs(ev["loss"] - arts["model"].stats["val_loss"]) < 0.5  # full val vs sampled batches

    # finetune and lora on the bundled instruction data: held-out loss below the base's
    sft, lora = arts["sft"], arts["lora"]
    assert sft.data["inputs"]["checkpoint"]["digest"] == arts["model"].digest
    assert sft.stats["val_loss"] < sft.stats["base_val_loss"] - 1.0
    assert sft.stats["examples"] == 266 and sft.stats["rejected_total"] == 0
    assert lora.stats["val_loss"] < lora.stats["base_val_loss"] - 1.0
    assert lora.stats["trainable_share"] < 0.15
    for chat in ("chat-sft", "lora-chat"):
        (row,) = [json.loads(line) for line in (out / chat / "samples.jsonl").open()]
        assert row["prompt"] == "Who are you?" and row["finish_reason"] in ("stop", "length")
    # the student is smaller than its teacher; each quantized form is smaller than the base
    assert arts["distill"].stats["params"] < arts["model"].stats["params"] / 2
    base_bytes = arts["model"].files["model.safetensors"]["bytes"]
    for q in ("q-int8", "q-int4", "q-static", "q-qat"):
        assert arts[q].files["model.safetensors"]["bytes"] < base_bytes * 0.6
    assert arts["gguf"].data["inputs"]["checkpoint"]["digest"] == sft.digest
    # align: DPO, the reward model, GRPO against it and RLAIF judged by it, all from sft
    for name in ("dpo", "rm", "grpo", "rlaif"):
        assert arts[name].data["inputs"]["checkpoint"]["digest"] == sft.digest
    assert json.loads((out / "rm" / "config.json").read_text())["head"] == "score"
    assert arts["grpo"].stats["rl"]["steps"] == 4
    pairs = (out / "rlaif" / "pairs.jsonl").read_text().splitlines()
    assert arts["rlaif"].stats["rlaif"]["pairs"] == len(pairs) > 0

    figures = json.loads((out / "report" / "report.json").read_text())
    roles = {r["path"].split("/")[-1]: r["role"] for r in figures["evals"]}
    assert roles == {
        "model": "base", "sft": "finetuned", "distill": "distilled",
        "q-int8": "quantized (int8)", "q-int4": "quantized (int4)",
        "q-static": "quantized (static)", "q-qat": "quantized (qat → int4)",
        "dpo": "aligned", "grpo": "aligned", "rlaif": "aligned",
    }  # fmt: skip
    assert all(r["val_bits_per_byte"] for r in figures["evals"])
    assert all(r["params"] for r in figures["evals"])  # aligned ones too
    # every row's bits per byte from an eval artifact: the same whole val split for all
    assert {r["bpb_source"] for r in figures["evals"]} == {"eval"}
    q8 = next(r for r in figures["evals"] if r["path"].endswith("q-int8"))
    assert q8["val_bits_per_byte"] == arts["eval-q-int8"].stats["bits_per_byte"]
    # pretrain, finetune, lora, distill, qat, and the four align runs
    assert len(figures["training"]) == 9
    qat = next(t for t in figures["training"] if t["path"].endswith("q-qat"))
    assert qat["steps"] == 20 and qat["final_train_loss"] == qat["train"][-1][1]
    assert {p["path"].split("/")[-1] for p in figures["preference"]} == {
        "dpo",
        "rm",
        "grpo",
        "rlaif",
    }

    monkeypatch.chdir(build)  # raw inputs were recorded relative to the build's directory
    nodes = walk(out / "q-int4")
    raw = sorted(n.path for n in nodes if n.kind == "file")
    assert raw == ["recipes/data/books", "recipes/data/web", "recipes/data/wiki"]
    assert flagged(nodes) == []
    # lora read the folder recipes/data/sft; the artifact out/sft beside it is not that input
    lora = walk(out / "lora-chat")
    assert flagged(lora) == [] and "recipes/data/sft" in {n.path for n in lora}
    assert not any(a["flagged"] or a["status"] != "ok" for a in figures["artifacts"])


def test_a_second_make_does_nothing(build: Path) -> None:
    r = run_tree(make_cmd("out", "out/report/manifest.json", flags=("-q",)), 600, cwd=build,
                 env=ENV)  # fmt: skip
    assert r.returncode == 0
    assert planned(build) == set()
    assert "llmctl" not in make(build, "out", "all")


# the align stages downstream of sft: DPO, the reward model, GRPO and RLAIF, each evaluated
# and chatted with (the reward model only goes to the report)
ALIGNED = {"dpo", "eval-dpo", "chat-dpo", "rm", "grpo", "eval-grpo", "chat-grpo", "rlaif",
           "eval-rlaif", "chat-rlaif"}  # fmt: skip


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("quantize-int4.toml", {"q-int4", "eval-q-int4", "samples-q-int4", "report"}),
        ("finetune.toml", {"sft", "eval-sft", "chat-sft", "gguf", "report", *ALIGNED}),
        ("rm.toml", {"rm", "grpo", "eval-grpo", "chat-grpo", "rlaif", "eval-rlaif",
                     "chat-rlaif", "report"}),
        ("distill.toml", {"distill", "eval-distill", "samples-distill", "report"}),
        ("pretrain.toml", {"model", "eval-model", "samples-model", "sft", "eval-sft", "chat-sft",
                           "gguf", "lora", "lora-chat", "distill", "eval-distill",
                           "samples-distill", "q-int8", "q-int4", "q-static", "q-qat",
                           "samples-q-int8", "samples-q-int4", "samples-q-static",
                           "samples-q-qat", *{f"eval-q-{q}" for q in QUANT}, "report",
                           *ALIGNED}),
    ],
)  # fmt: skip
def test_touching_one_toml_reruns_exactly_what_follows(
    build: Path, toml: str, expected: set[str]
) -> None:
    path = build / "recipes" / "tiny" / toml
    before = path.stat()
    try:
        os.utime(path)
        assert planned(build) == expected
    finally:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert planned(build) == set()


@pytest.mark.parametrize(
    ("gone", "expected"),
    [("eval-sft", {"eval-sft", "report"}), ("q-int8", {"q-int8", "eval-q-int8",
                                                      "samples-q-int8", "report"})],
)  # fmt: skip
def test_a_deleted_artifact_is_rebuilt_with_what_follows(
    build: Path, gone: str, expected: set[str]
) -> None:
    """make sees a missing artifact (none is an intermediate file it may skip)."""
    out = build / "out"
    (out / gone).rename(build / f"{gone}.aside")
    try:
        assert planned(build) == expected
    finally:
        (build / f"{gone}.aside").rename(out / gone)
    assert planned(build) == set()


def test_a_touched_toml_rebuilds_only_its_stage_and_the_report(build: Path) -> None:
    out = build / "out"
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/manifest.json")}
    os.utime(build / "recipes" / "tiny" / "eval.toml")
    text = make(build, "out", "all")
    ran = set(re.findall(r"--out \S*?/([\w.-]+)", text))
    assert ran == {
        "eval-model",
        "eval-sft",
        "eval-distill",
        "eval-dpo",
        "eval-grpo",
        "eval-rlaif",
        *{f"eval-q-{q}" for q in QUANT},
        "report",
    }
    now = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/manifest.json")}
    assert {k for k in now if now[k] != mtimes[k]} == ran
    assert planned(build) == set()


def _kill_when(work: Path, out: str, target: str, ready: Path) -> None:
    """Start `make target`, kill its whole process group (make and llmctl) with SIGKILL as
    soon as `ready` exists: a crash mid-stage, nothing gets to clean up."""
    p = subprocess.Popen(make_cmd(out, target), cwd=work, env=ENV, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, f"{target} finished before {ready} appeared"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def test_kill_mid_stage_and_rerun_gives_identical_files(build: Path) -> None:
    out2 = build / "out2"
    model = "out2/model/manifest.json"
    # 1: killed while clean writes its artifact (a data stage)
    _kill_when(build, "out2", model, out2 / ".clean.partial")
    assert not (out2 / "clean").exists()
    # 2: killed in pretrain once its first resumable state is saved (step 20 of 40)
    _kill_when(build, "out2", model, out2 / ".model.partial" / "_state" / "step-00000020")
    assert not (out2 / "model").exists() and (out2 / "tokens" / "manifest.json").exists()
    make(build, "out2", model)
    for name in (*DATA_STAGES, "model"):
        a = open_artifact(build / "out" / name, ("docs", "tokens", "checkpoint")).files
        b = open_artifact(out2 / name, ("docs", "tokens", "checkpoint")).files
        a.pop("metrics.jsonl", None), b.pop("metrics.jsonl", None)  # timings differ
        assert a == b, name
    resumed = open_artifact(out2 / "model", "checkpoint").stats
    assert resumed["start_step"] == 20 and resumed["steps"] == 40
