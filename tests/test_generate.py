"""`llmctl generate` end to end: real tiny checkpoints (tokenizer trained by `llmctl tokenize`),
the CLI writing a samples artifact, prompt files, stops, truncation, drafts, adapters,
masked-LM fill, the chat template and the chat REPL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact
from llmctl.cli import app
from llmctl.commands.generate import GenerateConfig, chat_repl
from llmctl.model.gpt import GPT, preset
from llmctl.model.io import load_model, save_checkpoint
from llmctl.model.sample import GenerationParams, Stops, generate
from llmctl.tokenizer import EOS_ID, decode, encode, load_tokenizer, render_chat

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
runner = CliRunner()


@dataclass
class Ckpts:
    tok: Path
    model: Path
    draft: Path
    mlm: Path
    other_tok_draft: Path


def make_checkpoint(out: Path, tok_dir: Path, seed: int, **kw: object) -> Path:
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=vocab, **kw))
    with torch.no_grad():  # sharper than the init's 0.02 std, so texts are not all ties
        for p in model.parameters():
            p.mul_(10)
    files = {n: tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}
    with building(out, kind="checkpoint", command="test", config={"seed": seed}) as art:
        save_checkpoint(art.dir, model, files)
    return out


def llmctl(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Ckpts:
    root = tmp_path_factory.mktemp("gen")
    for name, vocab in (("tok", 400), ("tok2", 380)):
        r = llmctl("tokenize", DATA, "--out", root / name, "--vocab-size", vocab, "-q")
        assert r.exit_code == 0, r.output
    return Ckpts(
        tok=root / "tok",
        model=make_checkpoint(root / "model", root / "tok", 0),
        draft=make_checkpoint(root / "draft", root / "tok", 1, n_layer=1),
        mlm=make_checkpoint(root / "mlm", root / "tok", 2, causal=False),
        other_tok_draft=make_checkpoint(root / "draft2", root / "tok2", 1, n_layer=1),
    )


def samples(out: Path) -> list[dict]:
    m = open_artifact(out, "samples")
    assert sorted(m.files) == ["samples.jsonl"]
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_cli_writes_a_samples_artifact(ckpts: Ckpts, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "ROMEO:"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Speak."}]}) + "\n"
        + json.dumps({"prompt": "First Citizen:\nBefore we proceed"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "s"
    # float32: compared below with the library run on the float32 model
    r = llmctl("generate", ckpts.model, "--prompts", prompts, "--out", out, "--do-sample",
               "--num-samples", 2, "--seed", 3, "--max-new-tokens", 12, "--top-p", 0.9,
               "--dtype", "float32")  # fmt: skip
    assert r.exit_code == 0, r.output
    recs = samples(out)
    assert [(x["index"], x["sample"]) for x in recs] == [(i, s) for i in range(3) for s in range(2)]
    assert {x["finish_reason"] for x in recs} <= {"length", "eos"}
    assert all(0 < x["completion_tokens"] <= 12 for x in recs)
    assert recs[2]["prompt"] == [{"role": "user", "content": "Speak."}]
    assert recs[0]["settings"]["seed"] == 3 and recs[0]["settings"]["top_p"] == 0.9
    tok = load_tokenizer(ckpts.tok)
    assert recs[0]["prompt_tokens"] == 1 + len(encode(tok, "ROMEO:"))  # <|eos|> + prompt
    chat = render_chat([{"role": "user", "content": "Speak."}], add_generation_prompt=True)
    assert recs[2]["prompt_tokens"] == len(encode(tok, chat))
    # the library gives the same texts for the same settings
    model = load_model(ckpts.model)
    params = GenerationParams(do_sample=True, num_samples=2, seed=3, max_new_tokens=12, top_p=0.9)
    stops = Stops(12, eos_ids=frozenset({EOS_ID}), decode=lambda ids: decode(tok, ids))
    [lib] = generate(model, [[EOS_ID, *encode(tok, "ROMEO:")]], params, stops=stops)
    assert [c.text for c in lib] == [recs[0]["completion"], recs[1]["completion"]]
    stats = open_artifact(out, "samples").stats
    assert (stats["prompts"], stats["samples"]) == (3, 6)
    assert stats["completion_tokens"] == sum(x["completion_tokens"] for x in recs)
    # stdout holds the completions, in order
    assert all(x["completion"] in r.stdout for x in recs)


def test_greedy_beam_and_stop_strings_from_the_cli(ckpts: Ckpts, tmp_path: Path) -> None:
    r = llmctl("generate", ckpts.model, "--prompt", "KING:", "--max-new-tokens", 24,
               "--out", tmp_path / "g")  # fmt: skip
    assert r.exit_code == 0, r.output
    [free] = samples(tmp_path / "g")
    text = free["completion"]
    stop = text[6:9]
    assert len(stop) == 3 and free["finish_reason"] == "length"
    r = llmctl("generate", ckpts.model, "--prompt", "KING:", "--max-new-tokens", 24,
               "--stop", stop, "--out", tmp_path / "s")  # fmt: skip
    [cut] = samples(tmp_path / "s")
    assert (cut["completion"], cut["finish_reason"]) == (text[: text.index(stop)], "stop_string")
    r = llmctl("generate", ckpts.model, "--prompt", "KING:", "--max-new-tokens", 10,
               "--num-beams", 3, "--num-return-sequences", 2, "--out", tmp_path / "b")  # fmt: skip
    assert r.exit_code == 0, r.output
    beams = samples(tmp_path / "b")
    assert len(beams) == 2 and beams[0]["score"] >= beams[1]["score"]


def test_bad_prompt_files_and_options_are_clear_errors(ckpts: Ckpts, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    r = llmctl("generate", ckpts.model, "--prompts", bad)
    assert r.exit_code == 2 and f"{bad}:2" in r.output
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    r = llmctl("generate", ckpts.model, "--prompts", bad)
    assert r.exit_code == 2 and f"{bad}:2: not valid JSON" in r.output
    bad.write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "\n")
    r = llmctl("generate", ckpts.model, "--prompts", bad)
    assert r.exit_code == 2 and f"{bad}:2: not usable JSON (RecursionError)" in r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = llmctl("generate", ckpts.model, "--prompts", empty)
    assert r.exit_code == 2 and "no prompts" in r.output
    r = llmctl("generate", ckpts.model)
    assert r.exit_code == 2 and "--prompt" in r.output
    r = llmctl("generate", ckpts.model, "--prompt", "a", "--num-return-sequences", 2,
               "--max-new-tokens", 8)  # fmt: skip
    assert r.exit_code == 2 and "num_return_sequences" in r.output
    r = llmctl("generate", ckpts.tok, "--prompt", "a")
    assert r.exit_code == 2 and "expected checkpoint" in r.output


def test_long_prompts_are_truncated_left_or_refused(ckpts: Ckpts, tmp_path: Path) -> None:
    long = "To be, or not to be, that is the question. " * 20
    r = llmctl("generate", ckpts.model, "--prompt", long, "--max-new-tokens", 8,
               "--out", tmp_path / "t")  # fmt: skip
    assert r.exit_code == 0 and "keeping its last 56 tokens" in r.output
    [rec] = samples(tmp_path / "t")
    assert rec["prompt_tokens"] == 64 - 8
    r = llmctl("generate", ckpts.model, "--prompt", long, "--max-new-tokens", 8, "--strict")
    assert r.exit_code == 2 and "--prompt: prompt has" in r.output
    r = llmctl("generate", ckpts.model, "--prompt", "a", "--max-new-tokens", 64)
    assert r.exit_code == 2 and "leaves no room" in r.output


def test_draft_must_share_the_tokenizer_and_gives_greedy_output(ckpts: Ckpts, tmp_path: Path
                                                                ) -> None:  # fmt: skip
    args = ["generate", ckpts.model, "--prompt", "JULIET:", "--max-new-tokens", 20]
    plain = llmctl(*args, "--out", tmp_path / "plain")
    spec = llmctl(*args, "--draft", ckpts.draft, "--draft-k", 3, "--out", tmp_path / "spec")
    assert plain.exit_code == spec.exit_code == 0, spec.output
    assert (
        samples(tmp_path / "plain")[0]["completion"] == samples(tmp_path / "spec")[0]["completion"]
    )
    r = llmctl(*args, "--draft", ckpts.other_tok_draft)
    assert r.exit_code == 2 and "tokenizer.json differs" in r.output


def test_adapter_is_merged_only_onto_its_base(ckpts: Ckpts, tmp_path: Path) -> None:
    model = load_model(ckpts.model)
    digest = open_artifact(ckpts.model, "checkpoint").digest
    torch.manual_seed(0)
    w = model.blocks[0].attn.q_proj.weight
    a, b = torch.randn(2, w.shape[1]), torch.randn(w.shape[0], 2)
    from safetensors.torch import save_file

    for name, base in (("good", digest), ("foreign", "0" * 64)):
        with building(tmp_path / name, kind="adapter", command="test", config={}) as art:
            # the tiny preset is Llama-shaped: tensors go under Llama's module names
            save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
                       "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b},
                      art.dir / "adapter_model.safetensors")  # fmt: skip
            (art.dir / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                "base_checkpoint_digest": base}))  # fmt: skip
    args = ["generate", ckpts.model, "--prompt", "ROMEO:", "--max-new-tokens", 10]
    args += ["--dtype", "float32"]  # compared below with the float32 library run
    r = llmctl(*args, "--adapter", tmp_path / "foreign")
    assert r.exit_code == 2 and f"this checkpoint's digest is {digest}" in r.output
    r = llmctl(*args, "--adapter", tmp_path / "good", "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        w += b @ a * 2.0
    tok = load_tokenizer(ckpts.tok)
    stops = Stops(10, eos_ids=frozenset({EOS_ID}), decode=lambda ids: decode(tok, ids))
    [[c]] = generate(model, [[EOS_ID, *encode(tok, "ROMEO:")]],
                     GenerationParams(max_new_tokens=10), stops=stops)  # fmt: skip
    assert samples(tmp_path / "s")[0]["completion"] == c.text


def test_masked_lm_checkpoint_fills_masks(ckpts: Ckpts, tmp_path: Path) -> None:
    r = llmctl("generate", ckpts.mlm, "--prompt", "ROMEO: <|mask|> is <|mask|>.",
               "--out", tmp_path / "m")  # fmt: skip
    assert r.exit_code == 0, r.output
    [rec] = samples(tmp_path / "m")
    assert rec["finish_reason"] == "filled" and "<|mask|>" not in rec["completion"]
    assert rec["completion"].startswith("ROMEO: ") and rec["completion"].endswith(".")
    r = llmctl("generate", ckpts.mlm, "--prompt", "a <|mask|>", "--num-beams", 2)
    assert r.exit_code == 2 and "masked-LM" in r.output and "num_beams" in r.output
    r = llmctl("generate", ckpts.mlm, "--prompt", "no mask here")
    assert r.exit_code == 2 and "no <|mask|>" in r.output


def test_chat_template_renders_as_transformers_renders_it(ckpts: Ckpts) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(ckpts.model))
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    for gen_prompt in (True, False):
        ours = render_chat(msgs, add_generation_prompt=gen_prompt)
        theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours == theirs
    tok = load_tokenizer(ckpts.model)
    text = render_chat(msgs, add_generation_prompt=True)
    assert encode(tok, text) == hf(text, add_special_tokens=False)["input_ids"]


def test_chat_repl_keeps_the_conversation_and_resets(ckpts: Ckpts) -> None:
    model, tok = load_model(ckpts.model), load_tokenizer(ckpts.model)
    params = GenerateConfig(chat=True, max_new_tokens=6).params(None)
    stops = Stops(6, eos_ids=frozenset({EOS_ID}), decode=lambda ids: decode(tok, ids))
    seen: list[list[int]] = []

    def tokens_of(where: str, msgs: list[dict[str, str]]) -> list[int]:
        seen.append(encode(tok, render_chat(msgs, add_generation_prompt=True)))
        return seen[-1]

    lines = iter(["Hello", "How are you?", "/reset", "Again", "/exit", "never read"])
    out: list[str] = []
    recs = chat_repl(model, tok, params, stops, None, tokens_of, out.append, lambda _: next(lines))
    assert [len(r["messages"]) for r in recs] == [2, 4, 2]
    assert recs[1]["messages"][:2] == recs[0]["messages"]  # the second turn saw the first
    assert recs[2]["messages"][0] == {"role": "user", "content": "Again"}
    assert len(seen[1]) > len(seen[0]) > len(seen[2]) - 3
    assert "".join(out).count("assistant> ") == 3


def test_decode_dtype_auto_is_bf16_only_where_the_cpu_runs_it_natively() -> None:
    from llmctl.model.sample import decode_dtype

    assert decode_dtype("float32", "cpu") is torch.float32
    assert decode_dtype("bfloat16", "cpu") is torch.bfloat16
    assert decode_dtype("auto", "cuda") is torch.bfloat16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert decode_dtype("auto", "cpu") is (torch.bfloat16 if native else None)
