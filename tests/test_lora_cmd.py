"""`llmctl lora` end to end on CPU: a tiny checkpoint from `pretrain`, an adapter artifact,
`--merge` agreeing with `generate --adapter`, exact resume, and one-line refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact
from llmctl.cli import app
from llmctl.model.adapter import load_adapter
from llmctl.model.io import load_model
from procs import run_tree

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
RUN = ["--batch-size", "4", "--seq-len", "32", "--device", "cpu", "-q"]

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def llmctl(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tokens, checkpoint): a tiny model pretrained for a few steps on tinyshakespeare."""
    root = tmp_path_factory.mktemp("lora")
    r = llmctl("tokenize", DATA, "--out", root / "tok", "--vocab-size", 512,
               "--val-fraction", 0.1, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = llmctl("pretrain", root / "tok", "--out", root / "ckpt", "--preset", "tiny",
               "--steps", 30, *RUN)  # fmt: skip
    assert r.exit_code == 0, r.output
    return root / "tok", root / "ckpt"


def lora(tokens: Path, ckpt: Path, out: Path, *args: object) -> object:
    return llmctl("lora", ckpt, tokens, "--out", out, *RUN, *args)


def records(dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adapter_artifact_merge_and_generate_agree(base: tuple[Path, Path], tmp_path: Path) -> None:
    tokens, ckpt = base
    out = tmp_path / "lora"
    r = lora(tokens, ckpt, out, "--steps", 20, "--lr", "3e-3", "--set", "warmup=2",
             "--set", "eval_every=10", "--set", "eval_batches=4")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "metrics.jsonl"
    }  # fmt: skip
    m = open_artifact(out, "adapter")
    c = open_artifact(ckpt, "checkpoint")
    s = m.stats
    # rank 8 on q, k, v, o of 2 layers: r * (in + out), k and v have 32 outputs (GQA)
    assert s["params_trainable"] == 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64)) == 7168
    assert s["params_total"] == c.stats["params"] + 7168 and s["adapted_layers"] == 8
    assert s["base_digest"] == c.digest and s["val_loss"] < s["base_val_loss"]
    assert m.data["inputs"]["checkpoint"]["digest"] == c.digest
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.05
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["base_checkpoint_digest"] == c.digest and cfg["base_model_name_or_path"] == str(ckpt)
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 16 and all(t.dtype == torch.float32 for t in tensors.values())
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in tensors

    r = llmctl("lora", ckpt, "--merge", out, "--out", tmp_path / "merged", "-q")
    assert r.exit_code == 0, r.output
    merged = load_model(tmp_path / "merged")
    assert open_artifact(tmp_path / "merged", "checkpoint").stats["merged_layers"] == 8
    live = load_model(ckpt)
    load_adapter(live, out, base_digest=c.digest)
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(x), live(x), atol=1e-5, rtol=0)
        assert not torch.allclose(merged(x), load_model(ckpt)(x), atol=1e-3)

    gen = ["--prompt", "ROMEO:", "--max-new-tokens", 24, "-q"]
    r1 = llmctl("generate", tmp_path / "merged", *gen, "--out", tmp_path / "s1")
    r2 = llmctl("generate", ckpt, "--adapter", out, *gen, "--out", tmp_path / "s2")
    assert r1.exit_code == r2.exit_code == 0, r1.output + r2.output
    texts = [
        [json.loads(x)["completion"] for x in (tmp_path / s / "samples.jsonl").open()]
        for s in ("s1", "s2")
    ]
    assert texts[0] == texts[1]


def test_resume_after_a_crash_is_exact(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmctl.train import objectives

    tokens, ckpt = base
    args = ["--steps", 12, "--set", "save_every=4", "--set", "log_every=1",
            "--set", "eval_every=0", "--set", "warmup=2", "--set", "grad_accum=2"]  # fmt: skip
    assert lora(tokens, ckpt, tmp_path / "straight", *args).exit_code == 0
    want = records(tmp_path / "straight")
    assert len(want) == 12

    call = objectives.NextToken.__call__
    seen = [0]

    def crashing(self, model, batch, gen):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():  # training micro-batches, not evaluations
            seen[0] += 1
            if seen[0] == 13:  # inside step 7; the state of step 4 is on disk
                raise RuntimeError("simulated crash")
        return call(self, model, batch, gen)

    monkeypatch.setattr(objectives.NextToken, "__call__", crashing)
    out = tmp_path / "resumed"
    r = lora(tokens, ckpt, out, *args)
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
    state = tmp_path / ".resumed.partial" / "_state" / "step-00000004" / "state.safetensors"
    saved = {k.split("/", 1)[1] for k in load_file(state) if k.startswith("model/")}
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # no base tensors
    monkeypatch.setattr(objectives.NextToken, "__call__", call)
    r = lora(tokens, ckpt, out, *args, "--rank", 4)  # other settings: refused, state kept
    assert r.exit_code == 2 and "rank: 8 -> 4" in " ".join(r.output.split())
    r = lora(tokens, ckpt, out, *args)
    assert r.exit_code == 0, r.output
    assert open_artifact(out, "adapter").stats["start_step"] == 4
    assert records(out) == want
    assert sha(out / "adapter_model.safetensors") == sha(
        tmp_path / "straight" / "adapter_model.safetensors"
    )


def test_bad_inputs_are_one_line_errors(base: tuple[Path, Path], tmp_path: Path) -> None:
    tokens, ckpt = base

    def fails(*args: object) -> str:
        r = llmctl(*args)
        assert r.exit_code == 2, r.output
        assert not (tmp_path / "x").exists()
        return " ".join(r.output.split())

    assert "head is tied to the token embedding" in fails(
        "lora", ckpt, tokens, "--out", tmp_path / "x", "--targets", "q_proj,lm_head"
    )
    assert "'qkv' is not one of" in fails("lora", ckpt, tokens, "--out", tmp_path / "x",
                                          "--targets", "qkv")  # fmt: skip
    assert "'rank': must be >= 1" in fails("lora", ckpt, tokens, "--out", tmp_path / "x",
                                           "--rank", 0)  # fmt: skip
    assert "is a 'checkpoint' artifact, expected tokens" in fails(
        "lora", ckpt, ckpt, "--out", tmp_path / "x"
    )
    other = tmp_path / "tok2"
    r = llmctl("tokenize", DATA, "--out", other, "--vocab-size", 300, "-q")
    assert r.exit_code == 0, r.output
    assert "tokenizer.json differs" in fails("lora", ckpt, other, "--out", tmp_path / "x")
    assert "--merge takes no DATA" in fails("lora", ckpt, tokens, "--merge", tmp_path,
                                            "--out", tmp_path / "x")  # fmt: skip
    # an adapter is merged only onto the checkpoint it was trained on
    r = llmctl("lora", ckpt, tokens, "--out", tmp_path / "a", *RUN, "--steps", 2)
    assert r.exit_code == 0, r.output
    r = llmctl("pretrain", tokens, "--out", tmp_path / "c2", "--preset", "tiny", "--steps", 1,
               *RUN)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "this checkpoint's digest is" in fails(
        "lora", tmp_path / "c2", "--merge", tmp_path / "a", "--out", tmp_path / "x"
    )


def test_instruction_files_train_an_adapter(base: tuple[Path, Path], tmp_path: Path) -> None:
    _, ckpt = base
    chats = tmp_path / "chats.jsonl"
    names = ["Romeo", "Juliet", "Mercutio", "Tybalt", "Benvolio", "Paris", "Capulet"]
    lines = [json.dumps({"prompt": f"Who is {n}?", "response": f"{n} is of Verona."})
             for n in names * 4]  # fmt: skip
    lines.append('{"prompt": "unterminated')
    # a second shape in one file: those records are malformed (skipped, counted, kept aside)
    say = [[{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": n}]
           for n in names]  # fmt: skip
    lines += [json.dumps({"messages": m}) for m in say]
    chats.write_text("\n".join(lines) + "\n")
    out = tmp_path / "lora"
    sets = ["--set", "warmup=2", "--set", "val_fraction=0.2", "--set", "eval_every=8"]
    r = llmctl("lora", ckpt, chats, "--out", out, *RUN, "--steps", 16, "--lr", "3e-3", *sets)
    assert r.exit_code == 0, r.output
    s = open_artifact(out, "adapter").stats
    assert s["data"] == "instructions" and s["records"] == 36 and s["examples"] == 28
    assert s["rejected_total"] == 8 and s["examples_train"] + s["examples_val"] == 28
    assert s["val_loss"] < s["base_val_loss"]
    errors = [json.loads(x) for x in (out / "rejected" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 8 and errors[0]["line"] == 29 and errors[0]["reason"] == "bad_json"
    assert not (out / "tokenizer_config.json").exists()  # the base has a chat template

    junk = tmp_path / "junk.jsonl"
    junk.write_text(json.dumps({"text": "no known shape"}) + "\n")
    r = llmctl("lora", ckpt, junk, "--out", tmp_path / "x", *RUN, "--steps", 2)
    assert r.exit_code == 2 and "no record has a known shape" in " ".join(r.output.split())
    assert not (tmp_path / "x").exists()


def test_damaged_adapters_are_one_line_errors(base: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    from llmctl.artifacts import sha256_file

    tokens, ckpt = base
    good = tmp_path / "good"
    assert lora(tokens, ckpt, good, "--steps", 1).exit_code == 0
    weights = "adapter_model.safetensors"

    def rehash(dir: Path, name: str) -> None:  # damage the manifest cannot see
        m = json.loads((dir / "manifest.json").read_text())
        m["files"][name] = {"bytes": (dir / name).stat().st_size, "sha256": sha256_file(dir / name)}
        (dir / "manifest.json").write_text(json.dumps(m))

    def nan(dir: Path) -> str:
        t = load_file(dir / weights)
        next(v for k, v in t.items() if "lora_B" in k)[0, 0] = float("nan")
        save_file(t, dir / weights)
        return "NaN or infinite values"

    def truncated(dir: Path) -> str:
        data = (dir / weights).read_bytes()
        (dir / weights).write_bytes(data[: len(data) // 2])
        return "not a readable safetensors file"

    def no_rank(dir: Path) -> str:
        cfg = json.loads((dir / "adapter_config.json").read_text())
        (dir / "adapter_config.json").write_text(json.dumps({**cfg, "r": "eight"}))
        return "'r' must be a positive integer"

    for damage in (nan, truncated, no_rank):
        bad = Path(shutil.copytree(good, tmp_path / damage.__name__))
        message = damage(bad)
        name = "adapter_config.json" if damage is no_rank else weights
        rehash(bad, name)
        for args in (["lora", ckpt, "--merge", bad, "--out", tmp_path / "m"],
                     ["generate", ckpt, "--adapter", bad, "--prompt", "To be", "-q"]):  # fmt: skip
            r = llmctl(*args)
            text = " ".join(r.output.split())
            assert r.exit_code == 2 and message in text and str(bad / name) in text, text
            assert "Traceback" not in r.output and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_double_accumulation(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    tokens, ckpt = base
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "lora",
        str(ckpt),
        str(tokens),
        *map(str, RUN),
        "--steps",
        "4",
        "--lr",
        "3e-3",
        "--set",
        "log_every=1",
        "--set",
        "eval_every=0",
        "--set",
        "dropout=0",
    ]  # fmt: skip (dropout masks differ by rank)
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([str(bin_dir / "llmctl"), *args, "--out", str(one),
                          "--set", "grad_accum=2"], capture_output=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    torchrun = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    res = run_tree([*torchrun, str(bin_dir / "llmctl"), *args, "--out", str(two)], timeout=300,
                   capture_output=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    a, b = records(one), records(two)
    assert [r[0] for r in a] == [r[0] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x[1] == pytest.approx(y[1], abs=1e-5)
    assert open_artifact(two, "adapter").stats["world_size"] == 2
    ta, tb = (
        load_file(one / "adapter_model.safetensors"),
        load_file(two / "adapter_model.safetensors"),
    )
    assert ta.keys() == tb.keys()
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)
