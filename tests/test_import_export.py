"""`llmctl import` / `llmctl export` end to end: transformers models built here with
`save_pretrained` come in with the same logits and the same greedy text as transformers gives;
our checkpoints go out to transformers (same greedy text) and to GGUF; bad inputs are one line,
exit 2, nothing written; `pretrain --init` continues an imported model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact
from llmctl.cli import app
from llmctl.commands import generate as gen_cmd
from llmctl.model.gpt import GPT, preset
from llmctl.model.io import load_model, save_checkpoint
from llmctl.tokenizer import encode_prompt, load_tokenizer, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
TEXT = DATA.read_text(encoding="utf-8")[:20000].split("\n\n")
PROMPTS = ["First Citizen:\nBefore we proceed", "hello world", "  What, ho!"]
runner = CliRunner()


def llmctl(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def hf_tokenizer(dir: Path, llama: bool, post: bool = True) -> int:
    """A byte-level BPE tokenizer saved by transformers: GPT-2 style (no BOS added) or Llama
    style (add_bos_token in the config; <s> added by tokenizer.json's post-processor, or with
    `post=False` by transformers alone, as a file without one makes it). Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"] if llama else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXT, trainer)
    if llama:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
        )
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            add_bos_token=True,
        )  # fmt: skip
    else:
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
        )
    fast.save_pretrained(dir)
    if llama:  # transformers 5 leaves add_bos_token out of what it saves; Llama repos have it
        path = dir / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "add_bos_token": True}))
    if not post:
        path = dir / "tokenizer.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "post_processor": None}))
    return tok.get_vocab_size()


def hf_model(dir: Path, kind: str) -> torch.nn.Module:
    vocab = hf_tokenizer(dir, llama=kind.startswith("llama"), post=kind != "llama-nopost")
    kind = kind.removesuffix("-nopost")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0, initializer_range=0.2,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    model.eval().save_pretrained(dir)
    return model


def hf_greedy(model: torch.nn.Module, tok: object, text: str, n: int) -> str:
    ids = tok(text, return_tensors="pt").input_ids
    eos = tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    if new and new[-1] == eos:
        new = new[:-1]
    return tok.decode(new)


def ours_greedy(ckpt: Path, text: str, n: int) -> str:
    cfg = gen_cmd.GenerateConfig(prompt=text, max_new_tokens=n, dtype="float32", device="cpu")
    [rec] = gen_cmd.run(ckpt, cfg, write=lambda s: None)
    return rec["completion"]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-nopost"])
def test_hf_import_matches_transformers(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    theirs = hf_model(src, kind)
    r = llmctl("import", "hf", src, "--out", tmp_path / "ckpt", "--license", "Apache-2.0", "-q")
    assert r.exit_code == 0, r.output
    m = open_artifact(tmp_path / "ckpt", "checkpoint")
    assert m.data["inputs"]["source-0"]["path"].endswith("config.json")
    assert all(len(ref["sha256"]) == 64 for ref in m.data["inputs"].values())
    assert m.stats["eos_id"] == (0 if kind == "gpt2" else 2)
    ours = load_model(tmp_path / "ckpt")
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    if kind != "llama-nopost":
        src_tok = transformers.AutoTokenizer.from_pretrained(src)
        assert tok("hi").input_ids == src_tok("hi").input_ids
    # BOS when add_bos_token says so, even where tokenizer.json lacks the post-processor (the
    # import writes it in, so transformers and llmctl agree on the imported files)
    assert (tok("hi").input_ids[0] == 1) is (kind != "gpt2")
    ltok = load_tokenizer(tmp_path / "ckpt")
    for text in PROMPTS:
        assert encode_prompt(ltok, text) == tok(text).input_ids
        assert ours_greedy(tmp_path / "ckpt", text, 20) == hf_greedy(theirs, tok, text, 20)


@pytest.fixture(scope="module")
def own_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own")
    tok = train_tokenizer(TEXT, vocab_size=320)
    save_tokenizer(tok, root / "tok", model_max_length=64)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.get_vocab_size(), tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    files = {n: root / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json")}
    with building(root / "ckpt", kind="checkpoint", command="test", config={}) as art:
        save_checkpoint(art.dir, model, files)
    return root / "ckpt"


def test_export_hf_then_transformers_and_back(own_ckpt: Path, tmp_path: Path) -> None:
    r = llmctl("export", own_ckpt, "--format", "hf", "--out", tmp_path / "hf", "-q")
    assert r.exit_code == 0, r.output
    m = open_artifact(tmp_path / "hf", "export")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(m.files)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in PROMPTS:
        assert ours_greedy(own_ckpt, text, 20) == hf_greedy(theirs, tok, text, 20)
    r = llmctl("import", "hf", tmp_path / "hf", "--out", tmp_path / "back", "-q")
    assert r.exit_code == 0, r.output
    a, b = load_model(own_ckpt).state_dict(), load_model(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (
        own_ckpt / "tokenizer.json"
    ).read_bytes()


def test_export_gguf_carries_license_and_sources(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    src = tmp_path / "src"
    hf_model(src, "llama")
    r = llmctl("import", "hf", src, "--out", tmp_path / "ckpt", "--license", "MIT", "-q")
    assert r.exit_code == 0, r.output
    out = tmp_path / "gguf"
    r = llmctl("export", tmp_path / "ckpt", "--format", "gguf", "--set", "gguf.type=q8_0",
               "--out", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    m = open_artifact(out, "export")
    assert sorted(m.files) == ["model.gguf"] and m.stats["type"] == "q8_0"
    reader = gguf.GGUFReader(out / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.license"] == "MIT"
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert any(s.startswith("config.json (sha256 ") for s in fields["general.sources"])
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.add_bos_token"]
    assert len(reader.tensors) == 2 + 2 * 9 + 1  # embeddings, head, final norm; 9 per layer


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hf_model(src, "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "out"

    def refused(*args: object, match: str) -> None:
        r = llmctl(*args, "--out", out)
        assert r.exit_code == 2, r.output
        assert match in r.output.replace("\n", " ") or match in r.output, r.output
        assert not out.exists() and not list(tmp_path.glob(".out*"))

    (src / "config.json").write_text(json.dumps({**cfg, "use_parallel_residual": True}))
    refused("import", "hf", src, match="unknown key 'use_parallel_residual'")
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").rename(tmp_path / "weights")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    refused("import", "hf", src, match="a pickle file")
    refused("import", "llama2c", src / "pytorch_model.bin", match="two files")
    refused("import", "onnx", src, match="unknown import format 'onnx'")
    bad = tmp_path / "m.bin"
    bad.write_bytes(struct.pack("<7i", 64, 172, 4, 4, 4, 512, 128) + b"\0" * 100)
    refused("import", "llama2c", bad, bad, match="needs 932,124 bytes but the file has 128")
    refused("export", tmp_path / "nothing", "--format", "hf", match="no such artifact")


def test_pretrain_init_continues_an_imported_model(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hf_model(src, "llama")
    assert llmctl("import", "hf", src, "--out", tmp_path / "ckpt", "-q").exit_code == 0
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT[:200]))
    r = llmctl("tokenize", text, "--tokenizer", tmp_path / "ckpt", "--out", tmp_path / "tokens",
               "--val-fraction", "0.1", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    args = ["--batch-size", "2", "--seq-len", "32", "--steps", "3", "--device", "cpu", "-q",
            "--set", "warmup=1", "--set", "eval_every=0"]  # fmt: skip
    r = llmctl("pretrain", tmp_path / "tokens", "--init", tmp_path / "ckpt",
               "--out", tmp_path / "more", *args)  # fmt: skip
    assert r.exit_code == 0, r.output
    before, after = load_model(tmp_path / "ckpt"), load_model(tmp_path / "more")
    assert after.config == before.config
    assert not torch.equal(before.tok_emb.weight, after.tok_emb.weight)
    r = llmctl("tokenize", text, "--vocab-size", "300", "--out", tmp_path / "other", "-q")
    assert r.exit_code == 0, r.output
    r = llmctl("pretrain", tmp_path / "other", "--init", tmp_path / "ckpt",
               "--out", tmp_path / "bad", *args)  # fmt: skip
    assert r.exit_code == 2 and "different tokenizer" in r.output, r.output


def test_config_ids_that_disagree_are_reported_and_the_tokenizer_wins(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hf_model(src, "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 7}))
    r = llmctl("import", "hf", src, "--out", tmp_path / "ckpt")
    assert r.exit_code == 0, r.output
    assert "config.json eos_token_id=7 but the tokenizer files say 2" in r.output
    assert open_artifact(tmp_path / "ckpt", "checkpoint").stats["eos_id"] == 2


def test_models_no_layout_computes_are_refused(tmp_path: Path, own_ckpt: Path) -> None:
    tok = own_ckpt
    torch.manual_seed(0)
    vocab = load_tokenizer(tok).get_vocab_size()
    for kw in ({"pos": "alibi"}, {"head": "score"}):
        model = GPT(preset("tiny", vocab_size=vocab, **kw))
        files = {n: tok / n for n in ("tokenizer.json", "tokenizer_config.json")}
        out = tmp_path / f"ck-{next(iter(kw.values()))}"
        with building(out, kind="checkpoint", command="test", config={}) as art:
            save_checkpoint(art.dir, model, files)
        r = llmctl("export", out, "--format", "hf", "--out", tmp_path / "x")
        assert r.exit_code == 2 and "error:" in r.output and "\n" not in r.output.strip(), r.output
        assert not (tmp_path / "x").exists()
