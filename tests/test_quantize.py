"""`llmctl quantize` and model/quant.py: error bounds, packing, calibration, QAT, exact reload,
quantized generate/eval, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from llmctl.artifacts import building
from llmctl.cli import app
from llmctl.model import quant as Q
from llmctl.model.gpt import GPT, preset
from llmctl.model.io import load_model, save_checkpoint

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
runner = CliRunner()
FAST = ["--set", "eval_tokens=2048", "--set", "decode_tokens=4", "-q"]


def linear(n: int = 96, k: int = 256, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight[3, 5] = 0.2  # an outlier: its row/group gets a coarser grid
        lin.bias.normal_(0, 0.01)
    return lin


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------- the math


def test_int8_weight_only_error_is_within_half_a_step() -> None:
    lin = linear()
    q = Q.Int8Linear.from_linear(lin)
    err = (q.dequantize() - lin.weight).abs()
    assert bool((err <= q.scale[:, None] / 2 + 1e-9).all())
    assert q.qweight.dtype == torch.int8 and int(q.qweight.abs().max()) == 127
    x = torch.randn(8, 256)
    with torch.no_grad():
        assert rel_err(q(x), lin(x)) < 0.01
        assert rel_err(q(x.bfloat16()).float(), lin(x)) < 0.02


@pytest.mark.parametrize("zero_point", [False, True])
def test_int4_error_is_within_half_a_step_per_group(zero_point: bool) -> None:
    lin = linear()
    q = Q.Int4Linear.from_weight(lin.weight, lin.bias, 64, zero_point)
    assert q.group == 64 and q.scale.shape == (96, 4) and q.scale.dtype == torch.float32
    assert q.qweight.shape == (96, 128) and q.qweight.dtype == torch.uint8
    step = q.scale.float().repeat_interleave(64, dim=1)
    err = (q.dequantize() - lin.weight).abs()
    assert bool((err <= step / 2 * (1 + 1e-3)).all())
    x = torch.randn(8, 256)
    with torch.no_grad():
        y, ref = q(x), lin(x)
        # the CPU int4 kernel and the dequantized weights agree
        assert torch.allclose(y, x @ q.dequantize().t() + lin.bias, atol=1e-4)
        assert rel_err(y, ref) < 0.12


def test_dynamic_and_static_activation_error() -> None:
    lin = linear()
    x = torch.randn(16, 256)
    with torch.no_grad():
        ref = lin(x)
        dyn = Q.Int8Linear.from_linear(lin, "dynamic")
        assert rel_err(dyn(x), ref) < 0.02
        static = Q.Int8Linear.from_linear(lin, "static")
        static.input_scale.fill_(float(x.abs().max()) / 127)
        assert rel_err(static(x), ref) < 0.03
        # activations really are quantized: the output is the int8 x int8 product
        s = static.input_scale
        xq = torch.round(x / s).clamp(-127, 127)
        expect = (xq @ static.qweight.float().t()) * static.scale * s + lin.bias
        assert torch.allclose(static(x), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["int4", None, "dynamic", "static"])
def test_a_batch_and_its_rows_one_at_a_time_agree(act: str | None) -> None:
    """One row (decoding at batch 1) runs the CPU integer kernel, several rows (eval, prefill)
    dequantize and run a float GEMM: the two paths give the same outputs."""
    lin = linear()
    if act == "int4":
        q: nn.Module = Q.Int4Linear.from_weight(lin.weight, lin.bias, 32, False)
    else:
        q = Q.Int8Linear.from_linear(lin, act)
        if act == "static":
            q.input_scale.fill_(0.02)
    x = torch.randn(2, 5, 256)
    assert not Q._kernel_ok(x, (torch.float32,)) and Q._kernel_ok(x[:1, :1], (torch.float32,))
    with torch.no_grad():
        batch = q(x)
        rows = torch.stack([torch.cat([q(x[b, t][None, None]) for t in range(5)], 1)[0]
                            for b in range(2)])  # fmt: skip
    torch.testing.assert_close(rows, batch, rtol=1e-5, atol=1e-5)


def test_the_quantized_module_table_says_what_each_layer_holds() -> None:
    """The rows the manifest's `quantized` stats and the printed table are made from."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=64, tie_embeddings=True))
    Q.quantize(model, Q.QuantSpec("int4", group_size=32))
    rows = {r["module"]: r for r in Q.quantized_modules(model)}
    q = {"module": "blocks.0.attn.q_proj", "kind": "int4", "shape": [64, 64], "group": 32,
         "how": "group 32"}  # fmt: skip
    assert rows["blocks.0.attn.q_proj"] == q
    assert rows["tok_emb"] == {"module": "tok_emb", "kind": "int8", "shape": [64, 64],
                               "how": "per row"}  # fmt: skip
    assert rows["lm_head"] == {"module": "lm_head", "kind": "int8", "how": "tied to tok_emb"}


def test_int4_bf16_scales_round_up_so_nothing_clips() -> None:
    lin = linear()
    w = lin.weight.detach().bfloat16()
    q = Q.Int4Linear.from_weight(w, None, 64, False)
    assert q.scale.dtype == torch.bfloat16
    step = q.scale.float().repeat_interleave(64, dim=1)
    assert bool(((q.dequantize() - w.float()).abs() <= step / 2 * (1 + 1e-6)).all())


def test_int4_pack_round_trip_and_layout() -> None:
    for width in (2, 7, 64, 172):
        codes = torch.randint(0, 16, (5, width), dtype=torch.int32)
        packed = Q.pack_int4(codes)
        assert packed.shape == (5, (width + 1) // 2) and packed.dtype == torch.uint8
        assert torch.equal(Q.unpack_int4(packed, width), codes)
    # column 2j in the low nibble, 2j+1 in the high one
    assert Q.pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]


def test_int4_group_for_widths_it_does_not_divide() -> None:
    assert Q.int4_group(256, 64) == 64
    assert Q.int4_group(96, 64) == 48  # largest even divisor <= 64, and >= 32
    assert Q.int4_group(172, 64) == 172  # even divisors <= 64 are 2 and 4: per-channel
    assert Q.int4_group(33, 64) == 33
    lin = nn.Linear(172, 8, bias=False)
    q = Q.Int4Linear.from_weight(lin.weight, None, 64, False)
    assert q.scale.shape == (8, 1)
    x = torch.randn(2, 172)
    with torch.no_grad():
        assert torch.allclose(q(x), x @ q.dequantize().t(), atol=1e-5)  # no kernel: dequantized
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].down = q
    assert Q.layer_groups(model, 64) == {"blocks.0.down": "per-channel"}


@pytest.mark.parametrize("group", [0, 3, -2, 7])
def test_bad_group_size_is_refused(group: int) -> None:
    with pytest.raises(ValueError, match="positive even"):
        Q.QuantSpec("int4", group_size=group)


def test_the_smallest_group_size_is_two() -> None:
    assert Q.QuantSpec("int4", group_size=2).group_size == 2


def test_zero_point_scales_keep_the_weights_dtype_and_repr_says_it() -> None:
    w = linear().weight.detach().bfloat16()
    scale, zero = Q.int4_qparams(w, 32, zero_point=True)
    assert scale.dtype == torch.bfloat16 and zero is not None and zero.dtype == torch.uint8
    lin = Q.Int4Linear.from_weight(w.float(), None, 32, True)
    assert repr(lin) == "Int4Linear(256, 96, group=32, zero_point=True)"
    assert "zero_point=False" in repr(Q.Int4Linear.from_weight(w.float(), None, 32, False))


def test_one_row_in_bf16_after_fp32_uses_bf16_kernel_arguments() -> None:
    """The int4 kernel's packed arguments are cached per dtype: a bf16 call after an fp32
    one gets bf16 scales, and both match the dequantized layer."""
    lin = linear()
    q = Q.Int4Linear.from_weight(lin.weight, lin.bias, 32, False)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            want = F.linear(x.to(dtype), q.dequantize().to(dtype), lin.bias.to(dtype))
            torch.testing.assert_close(q(x.to(dtype)), want, rtol=2e-2, atol=2e-2)


def test_torchao_oracle_int4_fake_quant() -> None:
    """Our symmetric int4 grid is torchao's (scale = max|group| / 7.5, q in [-8, 7]), which
    checks our arithmetic against an independent implementation."""
    qat = pytest.importorskip("torchao.quantization.qat")
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.02
    fq = qat.IntxFakeQuantizeConfig(torch.int4, group_size=64, is_symmetric=True)
    theirs = qat.FakeQuantizerBase.from_config(fq)(w)
    ours = Q.fake_quantize(w, 4, 64, False)
    # the same grid: codes differ only where w / scale lands on a rounding tie (the group's
    # extreme at ±7.5 steps), which torchao's w * (1 / scale) resolves the other way
    same = torch.isclose(ours, theirs, rtol=1e-6, atol=1e-9)
    assert same.float().mean() > 0.99
    step = (w.reshape(32, 2, 64).abs().amax(-1) / 7.5).repeat_interleave(64, dim=1)
    assert bool(((ours - theirs).abs() <= step * 1.0001).all())


# ---------------------------------------------------------------------------- QAT


def test_qat_gradients_flow_straight_through() -> None:
    lin = linear()
    spec = Q.QuantSpec("qat", bits=4)
    fq = Q.FakeQuantLinear.from_linear(lin, spec)
    x = torch.randn(4, 256, requires_grad=True)
    y = fq(x)
    wq = Q.fake_quantize(lin.weight, 4, 64, False).detach()
    assert torch.allclose(y, x @ wq.t() + lin.bias)  # forward on the int4 grid
    g = torch.randn_like(y)
    y.backward(g)
    # straight-through: d/dW is that of a linear layer, as if rounding were the identity
    assert torch.allclose(fq.weight.grad, g.t() @ x.detach(), atol=1e-6)
    assert torch.allclose(x.grad, g @ wq, atol=1e-6)
    assert fq.weight is lin.weight  # trains the model's own weights


@pytest.mark.parametrize("bits", [4, 8])
def test_qat_converts_exactly(bits: int) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny", d_ff=172)).eval()
    spec = Q.QuantSpec("qat", bits=bits)
    Q.apply_qat(model, spec)
    fq = {n: Q.fake_quantize(lin.weight, bits, 64, False).detach()
          for n, _, _, lin in _fake(model)}  # fmt: skip
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(x)
        block = Q.quantize(model, spec)
        assert block["method"] == f"int{bits}"
        for name, w in fq.items():
            assert torch.equal(model.get_submodule(name).dequantize(), w), name
        # the embedding is now int8 too, so compare the blocks' effect loosely
        assert rel_err(model(x), ref) < 0.05


def _fake(model: nn.Module) -> list:
    return [
        (n, None, None, m) for n, m in model.named_modules() if isinstance(m, Q.FakeQuantLinear)
    ]


# ---------------------------------------------------------------------------- calibration


def test_calibration_uses_the_data() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    a = Q.calibrate(model, [torch.randint(0, 128, (2, 32))])
    b = Q.calibrate(model, [torch.randint(128, 256, (2, 32))])
    assert a.keys() == b.keys() and len(a) == 14
    assert all(a[k] != b[k] for k in a)
    again = Q.calibrate(model, [torch.randint(0, 128, (2, 32), generator=torch.Generator())])
    assert again.keys() == a.keys()
    p = Q.calibrate(model, [torch.randint(0, 128, (2, 32))], kind="percentile", percentile=50)
    assert all(p[k] < a[k] for k in a)  # the median |x| is below the largest


# ---------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("method", ["int8", "int4", "int4-zp", "dynamic", "static"])
@pytest.mark.parametrize("tied", [True, False])
def test_save_load_is_exact(method: str, tied: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny", d_ff=172, tie_embeddings=tied, bias=True)).eval()
    x = torch.randint(0, 256, (2, 12))
    spec = Q.QuantSpec(method.split("-")[0], zero_point=method.endswith("zp"))
    scales = Q.calibrate(model, [x]) if method == "static" else None
    Q.quantize(model, spec, scales)
    save_checkpoint(tmp_path, model)
    loaded = load_model(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"]["method"] == spec.method
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("tok_emb.qweight").dtype == torch.int8
    if tied:  # the int8 table is stored once
        assert isinstance(loaded.lm_head, Q.TiedInt8Head)
        assert not any(k.startswith("lm_head") for k in keys)
    else:
        assert isinstance(loaded.lm_head, Q.Int8Linear) and "lm_head.qweight" in keys


def test_embeddings_can_stay_float(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    Q.quantize(model, Q.QuantSpec("int8", quantize_embeddings=False))
    assert isinstance(model.tok_emb, nn.Embedding) and model.lm_head.weight is model.tok_emb.weight
    save_checkpoint(tmp_path, model)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    tok, ck = root / "tokens", root / "ckpt"
    args = ["tokenize", str(DATA), "--out", str(tok), "--vocab-size", "512", "-q"]
    res = runner.invoke(app, [*args, "--val-fraction", "0.1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["pretrain", str(tok), "--out", str(ck), "--preset", "tiny",
                              "--steps", "30", "--batch-size", "8", "-q", "--set",
                              "eval_every=0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"root": root, "tokens": tok, "ckpt": ck}


def quantize(base: dict[str, Path], name: str, *args: str) -> dict:
    out = base["root"] / name
    res = runner.invoke(app, ["quantize", str(base["ckpt"]), "--out", str(out), *args, *FAST])
    assert res.exit_code == 0, res.output
    return json.loads((out / "manifest.json").read_text())


METHODS = {
    "int8": ["--method", "int8"],
    "int4": ["--method", "int4"],
    "dynamic": ["--method", "dynamic"],
    "static": ["--method", "static", "--calib", "TOKENS"],
    "qat": ["--method", "qat", "--calib", "TOKENS", "--steps", "4", "--set", "batch_size=2",
            "--set", "seq_len=32"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_quantizes_generates_and_evaluates(method: str, base: dict[str, Path]) -> None:
    args = [str(base["tokens"]) if a == "TOKENS" else a for a in METHODS[method]]
    m = quantize(base, method, *args)
    report = m["stats"]["report"]
    assert m["kind"] == "checkpoint" and m["command"] == "quantize"
    assert m["inputs"]["checkpoint"]["digest"]
    # the eval data came from the base's lineage: the tokens it was trained on
    assert report["eval_data"] == f"{base['tokens']} (val split)"
    assert report["before"]["bits_per_byte"] > 0 and report["after"]["bits_per_byte"] > 0
    assert abs(report["bpb_change"]) < 0.05
    assert report["after"]["file_bytes"] < 0.3 * report["before"]["file_bytes"]
    assert report["after"]["decode_tokens_per_s"] > 0
    out = str(base["root"] / method)
    # generate (bf16 on CPUs with native bf16, a prompt of several tokens) and eval load it
    res = runner.invoke(app, ["generate", out, "--prompt", "ROMEO: what say you, my lord",
                              "--max-new-tokens", "6", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", out, str(base["tokens"]), "--json", "-q", "--max-tokens",
                              "2048", "--seq-len", str(report["eval_seq_len"])])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bits_per_byte"] == pytest.approx(
        report["after"]["bits_per_byte"], rel=1e-9
    )


@pytest.mark.slow
def test_static_scales_depend_on_the_calibration_data(base: dict[str, Path]) -> None:
    text = base["root"] / "other.txt"
    text.write_text("0123456789 " * 400)
    a = quantize(base, "static-a", "--method", "static", "--calib", str(base["tokens"]))
    b = quantize(base, "static-b", "--method", "static", "--calib", str(text))
    assert a["stats"]["calibration"]["data"] != b["stats"]["calibration"]["data"]
    name = "blocks.0.attn.q_proj.input_scale"
    scales = []
    for d in ("static-a", "static-b"):
        with safe_open(base["root"] / d / "model.safetensors", "pt") as f:
            scales.append(float(f.get_tensor(name)))
    assert scales[0] != scales[1]


@pytest.mark.slow
def test_without_eval_data_the_report_says_so(base: dict[str, Path]) -> None:
    bare = base["root"] / "bare"
    model = load_model(base["ckpt"])
    with building(bare, kind="checkpoint", command="test", config={}) as art:
        files = {n: base["ckpt"] / n for n in ("tokenizer.json", "tokenizer_config.json")}
        save_checkpoint(art.dir, model, files)
    out = base["root"] / "bare-int8"
    res = runner.invoke(app, ["quantize", str(bare), "--out", str(out), "--method", "int8",
                              *FAST])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "manifest.json").read_text())["stats"]["report"]
    assert report["eval_data"] == "no eval data"
    assert report["before"]["bits_per_byte"] is None and report["after"]["val_loss"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "int5"], "config key 'method'"),
        (["--method", "static"], "--method static needs calibration data: --calib"),
        (["--method", "qat"], "--method qat needs calibration data: --calib"),
        (["--method", "int4", "--group-size", "0"], "config key 'group_size'"),
        (["--method", "int4", "--group-size", "33"], "config key 'group_size'"),
        (["--method", "int4", "--group-size", "-8"], "config key 'group_size'"),
        (["--method", "int8", "--set", "bits=3"], "config key 'bits'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with building(ckpt, kind="checkpoint", command="test", config={}) as art:
        save_checkpoint(art.dir, GPT(preset("tiny")))
    res = runner.invoke(app, ["quantize", str(ckpt), "--out", str(tmp_path / "q"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "q").exists()


def test_an_already_quantized_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model = GPT(preset("tiny"))
    Q.quantize(model, Q.QuantSpec("int8"))
    with building(ckpt, kind="checkpoint", command="test", config={}) as art:
        save_checkpoint(art.dir, model)
    res = runner.invoke(app, ["quantize", str(ckpt), "--out", str(tmp_path / "q"), "-q"])
    assert res.exit_code == 2 and "already quantized (int8)" in res.output, res.output


def test_lora_on_an_int4_base_trains_only_the_adapter(tmp_path: Path) -> None:
    """QLoRA: a frozen int4 base, LoRA in float, trained through the shared loop."""
    from llmctl.model.lora import apply_lora
    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import Writer, train
    from llmctl.train.objectives import NextToken
    from llmctl.train.settings import TrainSettings

    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    Q.quantize(model, Q.QuantSpec("int4"))
    apply_lora(model, "all", r=4, alpha=8.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randint(0, 256, (64, 33))
    cfg = TrainSettings(steps=3, batch_size=4, lr=1e-2, warmup=0, save_every=0, eval_every=0)
    train(model, StepBatches(lambda i: data[i % 16 * 4 : i % 16 * 4 + 4].numpy()), NextToken(),
          cfg, Writer(tmp_path / "run", {"t": 1}))  # fmt: skip
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed), changed
    assert any(".lora_B." in k for k in changed)  # B starts at zero: it moved


def test_dequantize_model_keeps_the_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    Q.quantize(model, Q.QuantSpec("int4"))
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(x)
        assert Q.dequantize_model(model) == 15
        assert torch.allclose(model(x), ref, atol=1e-4)
    assert model.lm_head.weight is model.tok_emb.weight
    save_checkpoint(tmp_path, model)
    assert "quantization" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_qlora_generate_and_merge_from_the_cli(base: dict[str, Path]) -> None:
    quantize(base, "q4-lora", "--method", "int4")
    q4, root = str(base["root"] / "q4-lora"), base["root"]
    res = runner.invoke(app, ["lora", q4, str(base["tokens"]), "--out", str(root / "ad"),
                              "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                              "--device", "cpu", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", q4, "--adapter", str(root / "ad"), "--prompt",
                              "ROMEO: my lord", "--max-new-tokens", "4", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["lora", q4, "--merge", str(root / "ad"), "--out",
                              str(root / "merged")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "full-precision" in res.output.replace("\n", " ")
    config = json.loads((root / "merged" / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "float32"


@pytest.mark.slow
def test_export_of_a_quantized_checkpoint_says_it_requantizes(base: dict[str, Path]) -> None:
    quantize(base, "q8-export", "--method", "int8")
    out = base["root"] / "q8-gguf"
    res = runner.invoke(app, ["export", str(base["root"] / "q8-export"), "--format", "gguf",
                              "--set", "gguf.type=q8_0", "--set", "license=MIT", "--out",
                              str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "requantized to q8_0" in res.output.replace("\n", " ")
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["dequantized_from"] == "int8" and (out / "model.gguf").stat().st_size > 0
