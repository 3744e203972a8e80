"""The loop's extension points that finetune, lora, align, distill and QAT build on: objective
metrics, several batch keys, frozen parameters, trainable extras, probes, generation inside
training, the model registry and module swaps, score heads, hidden states, special ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from llmctl.model.gpt import GPT, preset
from llmctl.model.io import load_model, register_swap, save_checkpoint
from llmctl.model.sample import GenerationParams, Stops, generate
from llmctl.tokenizer import load_specials
from llmctl.train.batches import StepBatches
from llmctl.train.loop import Writer, train
from llmctl.train.objectives import LossOutput, NextToken
from llmctl.train.rollout import complete
from llmctl.train.settings import TrainSettings
from llmctl.train.state import TENSORS, latest

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
_rng = np.random.default_rng(1)
CORPUS = np.cumsum(_rng.integers(1, 4, 50_000)) % 50 + 8


def source(i: int) -> dict[str, np.ndarray]:
    """Micro-batch i: 4 windows of 17 tokens, and a loss mask on their second half."""
    starts = (np.arange(i * 4, i * 4 + 4) * 7919) % (len(CORPUS) - 17)
    tokens = np.stack([CORPUS[s : s + 17] for s in starts])
    mask = np.zeros_like(tokens, dtype=np.int8)
    mask[:, 9:] = 1
    return {"tokens": tokens, "loss_mask": mask}


def model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=VOCAB, max_seq_len=32, **kw))


def rows(dir: Path) -> list[dict]:
    return [json.loads(x) for x in (dir / "metrics.jsonl").read_text().splitlines()]


class Counted(NextToken):
    """NextToken that also reports the mean id of its targets (a metric that differs from
    batch to batch, so a window that lost a step would log a different mean)."""

    def __call__(self, model, batch, generator) -> LossOutput:
        out = super().__call__(model, batch, generator)
        on = batch["loss_mask"][:, 1:] > 0
        out.metrics = {"target_mean": ((batch["tokens"][:, 1:] * on).sum(), on.sum())}
        return out


def test_several_batch_keys_reach_the_objective() -> None:
    batch = next(StepBatches(source))
    assert set(batch) == {"tokens", "loss_mask"}
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.int64
    out = NextToken()(model(), batch, torch.Generator())
    assert int(out.count) == 4 * 8  # the mask's ones after position 0


def test_metrics_are_window_means_and_survive_a_resume(tmp_path: Path) -> None:
    cfg = TrainSettings(steps=6, lr=3e-3, warmup=1, log_every=2, save_every=3, eval_every=0)
    straight = tmp_path / "s"
    res = train(model(), StepBatches(source), Counted(), cfg, Writer(straight, {}))
    logged = [r["target_mean"] for r in rows(straight) if "loss" in r]
    # steps 5-6 are micro-batches 4 and 5: their targets' mean, computed here directly
    on = [source(i)["loss_mask"][:, 1:] > 0 for i in (4, 5)]
    total = sum((source(i)["tokens"][:, 1:] * m).sum() for i, m in zip((4, 5), on, strict=True))
    direct = total / sum(m.sum() for m in on)
    assert len(set(logged)) == 3 and logged[-1] == pytest.approx(direct, rel=1e-12)
    assert res.metrics == {"target_mean": logged[-1]}

    # the window of steps 3-4 straddles the save at step 3: its mean must not change on resume
    class Die(Counted):
        calls = 0

        def __call__(self, *a, **k) -> LossOutput:
            Die.calls += 1
            if Die.calls == 5:
                raise KeyboardInterrupt
            return super().__call__(*a, **k)

    resumed = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(model(), StepBatches(source), Die(), cfg, Writer(resumed, {}))
    train(model(seed=9), StepBatches(source), Counted(), cfg, Writer(resumed, {}))

    def figures(dir: Path) -> list[dict]:  # throughput differs between runs; nothing else may
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows(dir)]

    assert figures(resumed) == figures(straight)


def test_frozen_parameters_stay_out_of_the_state_and_resume_is_bitwise(tmp_path: Path) -> None:
    def frozen_model(seed: int = 0) -> GPT:
        m = model(seed)
        for name, p in m.named_parameters():
            p.requires_grad = name.startswith("blocks.1.")
        return m

    cfg = TrainSettings(steps=4, lr=3e-3, warmup=1, log_every=1, save_every=2)
    a = frozen_model()
    before = {n: p.clone() for n, p in a.named_parameters()}
    train(a, StepBatches(source), NextToken(), cfg, Writer(tmp_path / "a", {"base": "x"}))
    changed = {n for n, p in a.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("blocks.1.") for n in changed)
    with safe_open(latest(tmp_path / "a" / "_state") / TENSORS, "pt") as f:
        saved = {k.removeprefix("model/") for k in f.keys() if k.startswith("model/")}  # noqa: SIM118
    assert saved == {n for n in a.state_dict() if n.startswith("blocks.1.")}

    # die after step 3 (state of step 2 saved); resume from a model with the same frozen base
    class Die(NextToken):
        calls = 0

        def __call__(self, *a, **k) -> LossOutput:
            Die.calls += 1
            if Die.calls == 4:
                raise KeyboardInterrupt
            return super().__call__(*a, **k)

    b_dir = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(frozen_model(), StepBatches(source), Die(), cfg, Writer(b_dir, {"base": "x"}))
    b = frozen_model()
    train(b, StepBatches(source), NextToken(), cfg, Writer(b_dir, {"base": "x"}))
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_aux_modules_train_save_with_the_state_and_never_ship(tmp_path: Path) -> None:
    m = model()
    m.aux["proj"] = nn.Linear(64, 8)
    target = torch.randn(8)

    class WithAux(NextToken):
        def __call__(self, net, batch, generator) -> LossOutput:
            out = super().__call__(net, batch, generator)
            inner = getattr(net, "module", net)
            extra = ((inner.aux["proj"](inner.tok_emb.weight[:4]) - target) ** 2).sum()
            return LossOutput(out.total + extra, out.count, out.tokens)

    w0 = m.aux["proj"].weight.clone()
    cfg = TrainSettings(steps=3, lr=1e-2, warmup=1, log_every=1, save_every=1)
    train(m, StepBatches(source), WithAux(), cfg, Writer(tmp_path / "run", {}))
    assert not torch.equal(m.aux["proj"].weight, w0)
    with safe_open(latest(tmp_path / "run" / "_state") / TENSORS, "pt") as f:
        assert "model/aux.proj.weight" in set(f.keys())
    save_checkpoint(tmp_path / "ckpt", m)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith("aux.")]  # noqa: SIM118
    assert m.num_params() == model().num_params()  # aux is not the model's size
    loaded = load_model(tmp_path / "ckpt")
    x = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(loaded(x), m.eval()(x))


def test_probes_run_at_each_evaluation(tmp_path: Path) -> None:
    seen: list[int] = []

    def probe(net: nn.Module, step: int) -> dict[str, float]:
        seen.append(step)
        assert not net.training and not torch.is_grad_enabled()
        return {"probe_norm": float(net.norm_f.weight.sum())}

    cfg = TrainSettings(steps=4, lr=3e-3, warmup=1, log_every=1, eval_every=2, save_every=0)
    writer = Writer(tmp_path, {})
    res = train(model(), StepBatches(source), NextToken(), cfg, writer, probes=[probe])
    assert seen == [2, 4]
    probed = [r for r in rows(tmp_path) if "probe_norm" in r]
    assert [r["step"] for r in probed] == [2, 4]
    assert res.val_metrics == {"probe_norm": probed[-1]["probe_norm"]} and res.val_loss is None


def test_generation_inside_training_caps_to_the_context_and_leaves_weights_alone() -> None:
    m = model()  # context 32
    m.train()
    strides = {n: p.stride() for n, p in m.named_parameters()}
    prompts = [list(range(8, 20)), list(range(8, 40)), list(range(8, 12))]
    params = GenerationParams(max_new_tokens=25)
    done, stats = complete(m, prompts, params, stops=Stops(25), pad_id=2)
    assert stats.prompts == 3 and stats.truncated_prompts == 1
    # 12 + 25 > 32 -> 20; the long one keeps 31 tokens -> 1; 4 + 25 fits
    assert stats.capped == 2 and sorted(stats.new_token_caps) == [1, 20]
    assert [len(c[0].tokens) for c in done] == [20, 1, 25]
    assert m.training and {n: p.stride() for n, p in m.named_parameters()} == strides
    # the capped rows decode exactly as a direct call would
    direct = generate(m.eval(), [prompts[0]], GenerationParams(max_new_tokens=20), pad_id=2)
    assert direct[0][0].tokens == done[0][0].tokens


def test_score_head_and_hidden_layers() -> None:
    rm = model(head="score")
    x = torch.randint(0, VOCAB, (2, 7))
    assert rm(x).shape == (2, 7, 1) and not hasattr(rm, "lm_head")
    with pytest.raises(ValueError, match="reward model"):
        generate(rm, [[1, 2]], GenerationParams(max_new_tokens=2))
    m = model().eval()
    logits, hs = m(x, hidden_layers=(0, 1, 2))
    assert [h.shape for h in hs] == [(2, 7, 64)] * 3
    torch.testing.assert_close(m.norm_f(hs[2]), m(x, return_hidden=True)[1])
    torch.testing.assert_close(m.lm_head(m.norm_f(hs[2])), logits)
    with pytest.raises(ValueError, match=r"not in 0\.\.2"):
        m(x, hidden_layers=(3,))


class Int8Linear(nn.Module):
    """A stand-in swapped module: int8 weight + a float scale (the shape of quantized layers)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("qweight", (w / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.float() * self.scale).t()


def _apply(model: nn.Module, block: dict) -> None:
    for name in block["modules"]:
        parent, attr = name.rsplit(".", 1)
        mod = model.get_submodule(parent)
        setattr(mod, attr, Int8Linear(getattr(mod, attr)))


def _describe(model: nn.Module) -> dict | None:
    names = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    return {"modules": names} if names else None


def test_a_swap_block_rebuilds_swapped_modules_on_load(tmp_path: Path) -> None:
    register_swap("test_int8", _apply, _describe)
    try:
        m = model().eval()
        _apply(m, {"modules": ["blocks.0.attn.q_proj", "blocks.1.mlp.up_proj"]})
        save_checkpoint(tmp_path, m)
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert cfg["test_int8"] == {"modules": ["blocks.0.attn.q_proj", "blocks.1.mlp.up_proj"]}
        loaded = load_model(tmp_path)
        assert isinstance(loaded.blocks[0].attn.q_proj, Int8Linear)
        assert loaded.blocks[0].attn.q_proj.qweight.dtype == torch.int8
        x = torch.randint(0, VOCAB, (2, 9))
        assert torch.equal(loaded(x), m(x))
        assert load_model(tmp_path, dtype=torch.bfloat16).blocks[1].mlp.up_proj.qweight.dtype == (
            torch.int8
        )
    finally:
        from llmctl.model.io import SWAPS

        SWAPS.pop("test_int8", None)


def test_special_ids_come_from_the_tokenizer_files(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    s = load_specials(tmp_path)
    assert (s.bos, s.eos, s.pad, s.mask, s.end_of_turn) == (1, 2, None, None, 2)
    assert s.all == {0, 1, 2} and s.stop == {2} and s.pad_or_eos == 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg | {"pad_token": "<pad>"}))
    with pytest.raises(Exception, match="pad_token '<pad>' is not in the vocabulary"):
        load_specials(tmp_path)
