"""`llmctl finetune` end to end on CPU: a real tiny checkpoint tuned on chat files, the val
curve from the base's loss down, the chat template carried to the output, exact resume after
a crash, and bad input (exit 2, nothing published)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact
from llmctl.cli import app
from llmctl.model.gpt import GPT, preset
from llmctl.model.io import save_checkpoint
from llmctl.tokenizer import CHAT_TEMPLATE, load_tokenizer
from llmctl.train import objectives
from procs import run_tree

TEXT = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
IDENTITY = Path(__file__).parents[1] / "recipes" / "data" / "sft" / "identity.jsonl"
ALPACA = Path(
    "/work/shared/data/sft/alpaca_en_demo/alpaca_en_demo.json"
)  # non-commercial: tests only
FAST = ["--batch-size", "4", "--seq-len", "48", "--device", "cpu", "-q"]
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def llmctl(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def make_checkpoint(out: Path, tok_dir: Path, *, template: bool | str = True) -> Path:
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=load_tokenizer(tok_dir).get_vocab_size()))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    if template is False:
        del cfg["chat_template"]
    elif isinstance(template, str):
        cfg["chat_template"] = template
    files = {"tokenizer.json": tok_dir / "tokenizer.json",
             "tokenizer_config.json": json.dumps(cfg).encode()}  # fmt: skip
    with building(out, kind="checkpoint", command="test", config={}) as art:
        save_checkpoint(art.dir, model, files)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    r = llmctl("tokenize", TEXT, "--out", root / "tok", "--vocab-size", 400, "-q")
    assert r.exit_code == 0, r.output
    return make_checkpoint(root / "base", root / "tok")


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multi-turn messages plus the bundled identity set (Alpaca shape), one folder."""
    root = tmp_path_factory.mktemp("chats")
    turns = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Count to {n}."},
                      {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))},
                      {"role": "user", "content": "Again?"},
                      {"role": "assistant", "content": "Done."}]}
        for n in range(1, 9)
    ]  # fmt: skip
    lines = [json.dumps(t) for t in turns] + ["{broken"]
    (root / "turns.jsonl").write_text("\n".join(lines) + "\n")
    (root / "identity.jsonl").write_bytes(IDENTITY.read_bytes())
    return root


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_lowers_val_loss_from_the_base_and_keeps_the_template(
    base: Path, chats: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sft"
    r = llmctl("finetune", base, chats, "--out", out, *FAST, "--steps", 30, "--lr", 3e-3,
               "--set", "eval_every=15")  # fmt: skip
    assert r.exit_code == 0, r.output
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "manifest.json", "metrics.jsonl", "model.safetensors",
                     "rejected", "tokenizer.json", "tokenizer_config.json"}  # fmt: skip
    m = open_artifact(out, "checkpoint")
    s = m.stats
    val = [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]
    assert [step for step, _ in val] == [0, 15, 30]
    assert s["base_val_loss"] == val[0][1] and s["val_loss"] == val[-1][1]
    assert val[-1][1] < val[0][1] - 1.0  # the held-out assistant tokens got much likelier
    assert s["examples"] == 99 and s["records"] == 100 and s["rejected"] == {"bad_json": 1}
    assert s["examples_train"] + s["examples_val"] == 99 and s["examples_val"] >= 1
    assert s["steps"] == 30 and s["loss_on"] == "assistant" and s["packing"] is True
    shapes = {Path(k).name: v["shape"] for k, v in s["data_files"].items()}
    assert shapes == {"identity.jsonl": "alpaca", "turns.jsonl": "messages"}
    (bad,) = [json.loads(x) for x in (out / "rejected" / "errors.jsonl").read_text().splitlines()]
    assert bad["line"] == 9 and bad["reason"] == "bad_json" and bad["file"].endswith("turns.jsonl")
    assert m.data["inputs"]["checkpoint"]["kind"] == "checkpoint"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_a_base_without_a_template_gets_the_default_written_in(base: Path, tmp_path: Path) -> None:
    bare = make_checkpoint(tmp_path / "bare", base, template=False)
    assert "chat_template" not in json.loads((bare / "tokenizer_config.json").read_text())
    out = tmp_path / "sft"
    r = llmctl("finetune", bare, IDENTITY, "--out", out, *FAST, "--steps", 2)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert open_artifact(out, "checkpoint").stats["chat_template"].startswith("llmctl default")


def test_the_base_template_is_trained_on_and_generate_renders_with_it(
    base: Path, tmp_path: Path
) -> None:
    from llmctl.tokenizer import encode, render_chat

    custom = CHAT_TEMPLATE.replace("'<|end|>'", "'<|end|>\\n'")  # a newline after each turn
    assert custom != CHAT_TEMPLATE
    own = make_checkpoint(tmp_path / "own", base, template=custom)
    out = tmp_path / "sft"
    r = llmctl("finetune", own, IDENTITY, "--out", out, *FAST, "--steps", 2)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == custom
    assert open_artifact(out, "checkpoint").stats["chat_template"] == "base"
    r = llmctl("generate", out, "--chat", "--prompt", "Who are you?", "--max-new-tokens", 2,
               "--out", tmp_path / "gen", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(x) for x in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]
    msgs = [{"role": "user", "content": "Who are you?"}]
    tok = load_tokenizer(out)
    want = encode(tok, render_chat(msgs, add_generation_prompt=True, template=custom))
    assert row["prompt_tokens"] == len(want)
    assert len(want) != len(encode(tok, render_chat(msgs, add_generation_prompt=True)))


def test_epochs_set_the_step_count_and_padding_works(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    r = llmctl("finetune", base, IDENTITY, "--out", out, *FAST, "--epochs", 0.5,
               "--set", "packing=false", "--set", "loss_on=all")  # fmt: skip
    assert r.exit_code == 0, r.output
    s = open_artifact(out, "checkpoint").stats
    assert s["rows_per_epoch"] == s["examples_train"]  # padded: one example a row
    assert s["steps"] == -(-s["examples_train"] // 2 // 4) and 0.5 <= s["epochs"] < 0.6
    both = llmctl("finetune", base, IDENTITY, "--out", tmp_path / "x", "--steps", 2, "--epochs", 1)
    assert both.exit_code == 2 and "not both" in both.output


def test_a_crash_then_the_same_command_resumes_exactly(
    base: Path, chats: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*FAST, "--steps", 8, "--lr", 3e-3, "--set", "save_every=3", "--set", "log_every=1",
            "--set", "eval_every=4", "--set", "grad_accum=2"]  # fmt: skip
    straight = tmp_path / "straight"
    assert llmctl("finetune", base, chats, "--out", straight, *args).exit_code == 0

    out = tmp_path / "resumed"
    call = objectives.NextToken.__call__
    calls = [0]

    def crashing(self: objectives.NextToken, *a: object, **k: object) -> object:
        calls[0] += 1
        if calls[0] == 14:  # in step 5 (2 val calls at step 0 and 4, 2 per step): saved 3
            raise RuntimeError("power cut")
        return call(self, *a, **k)

    monkeypatch.setattr(objectives.NextToken, "__call__", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        runner.invoke(app, ["finetune", str(base), str(chats), "--out", str(out),
                            *map(str, args)], catch_exceptions=False)  # fmt: skip
    monkeypatch.setattr(objectives.NextToken, "__call__", call)
    assert not out.exists() and (tmp_path / ".resumed.partial" / "_state").is_dir()
    r = llmctl("finetune", base, chats, "--out", out, *args)
    assert r.exit_code == 0, r.output
    assert open_artifact(out, "checkpoint").stats["start_step"] == 3
    assert sha(out / "model.safetensors") == sha(straight / "model.safetensors")

    def figures(path: Path) -> list[dict]:
        timing = ("tokens_per_s", "wall_s", "mfu")  # clocks, not figures
        return [{k: v for k, v in x.items() if k not in timing} for x in metrics(path)]

    assert figures(out) == figures(straight)
    assert [x["step"] for x in metrics(out) if "val_loss" in x] == [0, 4, 8]


def test_bad_inputs_are_one_line_errors_and_publish_nothing(base: Path, tmp_path: Path) -> None:
    def fails(*args: object) -> str:
        out = tmp_path / "out"
        r = llmctl("finetune", base, "--out", out, *FAST, "--steps", 2, *args)
        assert r.exit_code == 2, r.output
        assert not out.exists() and not (tmp_path / ".out.partial").exists()
        return " ".join(r.output.split())

    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert "junk.jsonl: no record has a known shape" in fails(junk)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": 1, "response": "x"}\n{bad\n')
    assert "broken.jsonl: no usable example" in fails(broken)
    assert "no such file" in fails(tmp_path / "missing.jsonl")
    assert "DATA" in " ".join(llmctl("finetune", base, "--out", tmp_path / "o").output.split())
    strict = tmp_path / "strict.jsonl"
    strict.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n{bad\n")
    assert "strict.jsonl:2: bad_json" in fails(strict, "--strict")
    assert "max_seq_len" in fails(IDENTITY, "--seq-len", "500")
    r = llmctl("finetune", base.parent / "tok", IDENTITY, "--out", tmp_path / "o", *FAST)
    assert r.exit_code == 2 and "checkpoint" in r.output  # a tokens artifact is not a model


@pytest.mark.skipif(not ALPACA.is_file(), reason="alpaca_en_demo is not on this machine")
def test_alpaca_demo_file_reads_as_one_json_array(base: Path) -> None:
    """999 Alpaca records in one JSON array (non-commercial data: read here, never shipped)."""
    from llmctl.data.chats import ChatDataConfig, load_chats
    from llmctl.tokenizer import END_ID, encode

    tok = load_tokenizer(base)
    data = load_chats([ALPACA], tok, template=None, end_id=END_ID, ctx=4096, opts=ChatDataConfig())
    assert data.stats["records"] == 999 and len(data.examples) == 999 and not data.rejected
    records = json.loads(ALPACA.read_text())
    for ex, rec in list(zip(data.examples, records, strict=True))[:50]:
        assert ex.ids[ex.mask == 1].tolist() == [*encode(tok, rec["output"]), END_ID]


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_double_accumulation(
    base: Path, chats: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["finetune", str(base), str(chats), *FAST, "--steps", "4", "--lr", "3e-3",
            "--set", "log_every=1", "--set", "eval_every=0"]  # fmt: skip
    one = tmp_path / "one"
    res = subprocess.run([str(bin_dir / "llmctl"), *args, "--out", str(one),
                          "--set", "grad_accum=2"], capture_output=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    two = tmp_path / "two"
    torchrun = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    res = run_tree([*torchrun, str(bin_dir / "llmctl"), *args, "--out", str(two)], timeout=300,
                   capture_output=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    a = [r for r in metrics(one) if "loss" in r]
    b = [r for r in metrics(two) if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    s1, s2 = open_artifact(one, "checkpoint").stats, open_artifact(two, "checkpoint").stats
    assert s2["world_size"] == 2 and s1["tokens_seen"] == s2["tokens_seen"]
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], abs=1e-5)
    assert s2["base_val_loss"] == pytest.approx(s1["base_val_loss"], abs=1e-6)


@pytest.mark.slow
def test_greedy_chat_on_a_held_out_instruction_ends_its_turn(base: Path, tmp_path: Path) -> None:
    """What instruction tuning is for: the tuned model answers and stops (<|end|>)."""
    import random

    rng = random.Random(0)
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "tiger",
        "lemon",
        "candle",
        "forest",
        "silver",
        "window",
        "garden",
    ]
    data = tmp_path / "say.jsonl"
    with data.open("w") as f:
        for _ in range(200):
            w, n = rng.choice(words), rng.randint(1, 3)
            rec = {"prompt": f"Say {w} {n} times.", "response": " ".join([w] * n) + "."}
            f.write(json.dumps(rec) + "\n")
    out = tmp_path / "sft"
    r = llmctl("finetune", base, data, "--out", out, "--batch-size", 8, "--seq-len", 32,
               "--device", "cpu", "-q", "--steps", 80, "--lr", 3e-3)  # fmt: skip
    assert r.exit_code == 0, r.output
    s = open_artifact(out, "checkpoint").stats
    assert s["val_loss"] < s["base_val_loss"] / 2
    # "banana" is in no training example
    r = llmctl("generate", out, "--chat", "--prompt", "Say banana 2 times.",
               "--max-new-tokens", 24, "--out", tmp_path / "gen", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(x) for x in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]
    assert row["finish_reason"] == "stop" and row["completion_tokens"] < 24


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_qat_finetune_publishes_the_exact_weight_only_quantized_checkpoint(
    base: Path, chats: Path, tmp_path: Path, bits: str
) -> None:
    """`finetune --set qat=int4|int8` trains through fake-quantized Linears and publishes the
    weight-only quantized checkpoint whose outputs are what the fake-quant training saw."""
    from llmctl.model.io import load_model
    from llmctl.model.quant import FakeQuantLinear

    out = tmp_path / "qat"
    r = llmctl("finetune", base, chats, "--out", out, *FAST, "--steps", 6, "--lr", 3e-3,
               "--set", f"qat={bits}")  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["method"] == bits
    model = load_model(out)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    qtypes = {str(t.dtype) for n, t in model.state_dict().items() if n.endswith("qweight")}
    # int4 packs two values a byte (uint8); the embedding is int8 per row either way
    assert qtypes == ({"torch.int8", "torch.uint8"} if bits == "int4" else {"torch.int8"})
    r = llmctl("generate", out, "--chat", "--prompt", "Hi", "--max-new-tokens", 4, "--device",
               "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
