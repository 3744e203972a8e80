"""RWKV checkpoints through every stage after pretrain, from the CLI: finetune (packed rows),
lora (+ merge, generate --adapter, PEFT on the export), distill (RWKV as student and as
teacher), quantize (+ generate and eval), export hf (== transformers' RwkvForCausalLM) and
import hf; gguf refused in one line. The tiny chain with the `rwkv-tiny` preset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact
from llmctl.cli import app
from llmctl.model.io import load_model
from llmctl.model.lora import apply_lora, resolve_targets
from llmctl.model.rwkv import RWKV, preset
from rwkv_models import random_model

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
SFT = Path(__file__).parents[1] / "recipes" / "data" / "sft" / "identity.jsonl"
RUN = ["--batch-size", "4", "--seq-len", "32", "--device", "cpu", "-q"]

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def llmctl(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: object) -> str:
    r = llmctl(*args)
    assert r.exit_code == 0, r.output
    return r.stdout


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_packed_rows_compute_each_document_alone(chunk: int) -> None:
    model = random_model(chunk, chunk_size=chunk)
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(chunk))
    seg = torch.tensor([[1] * 7 + [2] * 20 + [3] * 10 + [0] * 3, [1] * 15 + [2] * 25])
    packed = model(ids, segment_ids=seg)
    for b in range(2):
        for sid in seg[b].unique().tolist():
            at = (seg[b] == sid).nonzero()[:, 0]
            alone = model(ids[b : b + 1, at])[0]
            torch.testing.assert_close(packed[b, at], alone, rtol=0, atol=1e-5)
    # one segment is the plain forward, exactly
    assert torch.equal(model(ids, segment_ids=torch.ones_like(ids)), model(ids))
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=seg, cache=model.make_cache(2, 40))


def test_lora_targets_of_rwkv() -> None:
    model = random_model()
    assert resolve_targets(["attn"], model)[0] == (
        "att.key", "att.value", "att.receptance", "att.output"
    )  # fmt: skip
    assert resolve_targets("mlp,lm_head", model)[0] == (
        "ffn.key", "ffn.value", "ffn.receptance", "lm_head"
    )  # fmt: skip
    names = apply_lora(model, "all", r=2, alpha=4)
    assert len(names) == 2 * 7 and names[:2] == ["blocks.0.att.key", "blocks.0.att.value"]
    assert "blocks.1.ffn.receptance" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with pytest.raises(ValueError, match=r"'q_proj' is not one of attn, mlp, all, att\.key"):
        resolve_targets("q_proj", random_model())


# --- CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tokens, RWKV checkpoint, GPT checkpoint of the same tokenizer), by the real commands."""
    root = tmp_path_factory.mktemp("rwkv-stages")
    ok("tokenize", DATA, "--out", root / "tok", "--vocab-size", 512, "--val-fraction", 0.1, "-q")
    for name, p in (("rwkv", "rwkv-tiny"), ("gpt", "tiny")):
        ok("pretrain", root / "tok", "--out", root / name, "--preset", p, "--steps", 30,
           "--set", "warmup=3", *RUN)  # fmt: skip
    return root / "tok", root / "rwkv", root / "gpt"


def rows(dir: Path) -> list[dict]:
    return [json.loads(x) for x in (dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_packs_chats_and_generates(base: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, ckpt, _ = base
    out = tmp_path / "sft"
    ok("finetune", ckpt, SFT, "--out", out, "--steps", 12, "--lr", "3e-3", *RUN)
    s = open_artifact(out, "checkpoint").stats
    assert s["packing"] is True and s["val_loss"] < s["base_val_loss"]
    assert isinstance(load_model(out), RWKV)
    ok("generate", out, "--chat", "--prompt", "Who are you?", "--max-new-tokens", 8,
       "--out", tmp_path / "chat")  # fmt: skip
    assert rows(tmp_path / "chat")[0]["completion_tokens"] >= 1
    # quantization-aware SFT publishes the quantized RWKV
    ok("finetune", ckpt, SFT, "--out", tmp_path / "qat", "--steps", 2, "--set", "qat=int8", *RUN)
    assert load_model(tmp_path / "qat").quantization["method"] == "int8"


@pytest.mark.slow
def test_lora_merge_generate_and_peft_agree(base: tuple[Path, Path, Path], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, ckpt, _ = base
    lo = tmp_path / "lora"
    ok("lora", ckpt, SFT, "--out", lo, "--steps", 6, "--lr", "1e-2",
       "--targets", "att.key,ffn.value,lm_head", *RUN)  # fmt: skip
    s = open_artifact(lo, "adapter").stats
    # rank 8: att.key 64→64, ffn.value 224→64, head 64→512
    assert s["adapted_layers"] == 5 and s["params_trainable"] == 8 * (
        2 * (64 + 64) + 2 * (224 + 64) + (64 + 512)
    )
    cfg = json.loads((lo / "adapter_config.json").read_text())
    assert cfg["llmctl_layout"] == "rwkv"
    assert cfg["target_modules"] == ["attention.key", "feed_forward.value", "head"]
    tensors = load_file(lo / "adapter_model.safetensors")
    assert "base_model.model.rwkv.blocks.1.feed_forward.value.lora_B.weight" in tensors
    default = tmp_path / "lora-default"  # the default targets: time mixing (attn)
    ok("lora", ckpt, SFT, "--out", default, "--steps", 1, *RUN)
    assert json.loads((default / "adapter_config.json").read_text())["target_modules"] == [
        "attention.key", "attention.output", "attention.receptance", "attention.value"
    ]  # fmt: skip

    merged = tmp_path / "merged"
    ok("lora", ckpt, "--merge", lo, "--out", merged, "-q")
    greedy = ["--prompt", "ROMEO:", "--max-new-tokens", 12, "-q"]
    assert ok("generate", merged, *greedy) == ok("generate", ckpt, "--adapter", lo, *greedy)
    before, after = load_model(ckpt).state_dict(), load_model(merged).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {
        *(f"blocks.{i}.{n}.weight" for i in (0, 1) for n in ("att.key", "ffn.value")),
        "lm_head.weight",
    }

    # PEFT applies the adapter to the transformers export as it is: the merged logits
    ok("export", ckpt, "--format", "hf", "--out", tmp_path / "hf", "-q")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with_adapter = peft.PeftModel.from_pretrained(hf, lo).eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_model(merged)(ids)
        torch.testing.assert_close(with_adapter(ids).logits, want, rtol=0, atol=1e-4)

    bad = llmctl("lora", ckpt, SFT, "--out", tmp_path / "x", "--targets", "q_proj", *RUN)
    assert bad.exit_code == 2 and "'q_proj' is not one of" in bad.output


@pytest.mark.slow
def test_distill_with_rwkv_as_student_and_teacher(
    base: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    tokens, rwkv, gpt = base
    common = ["--steps", 4, "--set", "eval_every=4", *RUN]
    runs = {
        "rwkv→rwkv logit": ["--kind", "logit", "--teacher", rwkv, "--student-preset", "rwkv-tiny"],
        "gpt→rwkv feature": ["--kind", "feature", "--teacher", gpt, "--student-preset",
                             "rwkv-tiny"],
        "rwkv→gpt feature": ["--kind", "feature", "--teacher", rwkv, "--student", gpt],
        "gpt→rwkv logit": ["--kind", "logit", "--teacher", gpt, "--student", rwkv],
    }  # fmt: skip
    for i, (what, args) in enumerate(runs.items()):
        out = tmp_path / f"d{i}"
        ok("distill", tokens, "--out", out, *args, *common)
        s = open_artifact(out, "checkpoint").stats
        assert s["steps"] == 4 and math.isfinite(s["val_loss"]), what
        if "feature" in what:
            assert s["layer_pairs"] == [[0, 0], [1, 1]], what  # 2 layers each
    assert isinstance(load_model(tmp_path / "d1"), RWKV)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ROMEO:"}\n{"prompt": "To be"}\n{"prompt": "KING"}\n')
    out = tmp_path / "seq"  # the RWKV teacher answers; the student trains on packed rows
    ok("distill", prompts, "--kind", "sequence", "--teacher", rwkv, "--student-preset",
       "rwkv-tiny", "--out", out, "--steps", 2, "--set", "gen.max_new_tokens=8", *RUN)  # fmt: skip
    assert isinstance(load_model(out), RWKV)


@pytest.mark.slow
def test_quantize_then_generate_and_eval(base: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tokens, ckpt, _ = base
    plain = ["--prompt", "ROMEO:", "--max-new-tokens", 10, "--dtype", "float32", "-q"]
    base_text = ok("generate", ckpt, *plain)
    base_loss = json.loads(ok("eval", ckpt, tokens, "--json"))["loss"]
    for method, extra in (("int8", []), ("int4", []), ("dynamic", []),
                          ("static", ["--calib", tokens]),
                          ("qat", ["--calib", tokens, "--steps", 2])):  # fmt: skip
        out = tmp_path / method
        ok("quantize", ckpt, "--out", out, "--method", method, *extra, "-q")
        model = load_model(out)
        want = "int4" if method == "qat" else method  # QAT publishes its int4 weights
        assert isinstance(model, RWKV) and model.quantization["method"] == want
        assert len(ok("generate", out, *plain)) > 0
        loss = json.loads(ok("eval", out, tokens, "--json"))["loss"]
        assert abs(loss - base_loss) < 0.05, method
        if method == "int8":  # weight-only int8 keeps the greedy text of this tiny model
            assert ok("generate", out, *plain) == base_text
    # QLoRA: an adapter trained on the int4 RWKV, applied by generate
    ok("lora", tmp_path / "int4", SFT, "--out", tmp_path / "qlora", "--steps", 2, *RUN)
    ok("generate", tmp_path / "int4", "--adapter", tmp_path / "qlora", *plain)


def test_export_hf_equals_transformers_and_imports_back(
    base: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    tokens, ckpt, _ = base
    # a random-weight model (all parameters non-trivial) in a checkpoint artifact: import hf of
    # transformers' own save, then export hf, then transformers reads the export
    model = random_model(7, vocab=512)
    src = tmp_path / "src"
    from llmctl.model.hf_rwkv import to_hf_rwkv

    to_hf_rwkv(model).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((tokens / f).read_bytes())
    ok("import", "hf", src, "--out", tmp_path / "imp", "-q")
    imported = load_model(tmp_path / "imp")
    assert isinstance(imported, RWKV)
    for (n, a), b in zip(model.state_dict().items(), imported.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    ok("export", tmp_path / "imp", "--format", "hf", "--out", tmp_path / "hf", "-q")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["RwkvForCausalLM"] and cfg["rescale_every"] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "RwkvForCausalLM"
    ids = torch.randint(0, 512, (3, 50), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # (not compared: transformers' own one-token state path, which in transformers 5.24
    # broadcasts the [B, C] shift state against [B, 1, C] into [B, B, V] logits)

    # the trained checkpoint exports too; gguf and a norm_eps transformers lacks are refused
    ok("export", ckpt, "--format", "hf", "--out", tmp_path / "hf2", "-q")
    gguf = llmctl("export", ckpt, "--format", "gguf", "--out", tmp_path / "gg")
    assert gguf.exit_code == 2 and "llama.cpp has no RWKV-4" in gguf.output
    assert not (tmp_path / "gg").exists()
    from llmctl.model.hf import hf_layout

    assert hf_layout(imported.config) == "rwkv"
    with pytest.raises(ValueError, match=r"eps at 1e-05; this model has norm_eps=1e-06"):
        hf_layout(preset("rwkv-tiny", norm_eps=1e-6))


def test_import_hf_refuses_what_rwkv_cannot_compute(tmp_path: Path) -> None:
    from llmctl.model.hf import read_hf

    src = tmp_path / "src"
    from llmctl.model.hf_rwkv import to_hf_rwkv

    to_hf_rwkv(random_model(vocab=61)).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    for key, value, message in (
        ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"),
        ("attention_hidden_size", 32, "attention_hidden_size"),
        ("some_new_key", 1, "some_new_key"),
    ):
        (src / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=message):
            read_hf(src)
