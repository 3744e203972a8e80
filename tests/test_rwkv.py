"""RWKV-4 (model/rwkv.py): the parallel (chunked) and recurrent forms agree, the state reorders
for beams, padding does not leak, checkpoints round-trip, and the CLI chain runs on it
(pretrain with exact resume, eval, generate with every strategy)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact
from llmctl.cli import app
from llmctl.commands import eval as eval_cmd
from llmctl.model.io import load_config, load_model, save_checkpoint
from llmctl.model.rwkv import NEG, RWKV, RWKVConfig, preset, wkv_chunked, wkv_empty, wkv_step
from llmctl.model.sample import GenerationParams, Stops, generate
from rwkv_models import random_model

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
TINY = ["--preset", "rwkv-tiny", "--batch-size", "4", "--seq-len", "32", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def stepwise(model: RWKV, ids: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Logits of `ids` fed through the recurrent state in pieces ending at `splits`."""
    state = model.make_cache(ids.shape[0], ids.shape[1])
    outs, start = [], 0
    for end in [*splits, ids.shape[1]]:
        outs.append(model(ids[:, start:end], cache=state))
        start = end
    assert state.length == ids.shape[1]
    return torch.cat(outs, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_parallel_equals_recurrent_for_any_split(chunk: int) -> None:
    model = random_model(chunk, chunk_size=chunk)
    gen = torch.Generator().manual_seed(chunk)
    ids = torch.randint(0, 61, (3, 40), generator=gen)
    full = model(ids)
    assert full.abs().max() > 1.0  # logits of a size where 1e-5 means something
    one_by_one = stepwise(model, ids, list(range(1, 40)))
    torch.testing.assert_close(one_by_one, full, rtol=0, atol=1e-5)
    for _ in range(3):  # random splits into pieces of any length, prefill included
        cuts = sorted(torch.randperm(39, generator=gen)[:5].add(1).tolist())
        torch.testing.assert_close(stepwise(model, ids, cuts), full, rtol=0, atol=1e-5)


def test_parallel_and_recurrent_gradients_agree() -> None:
    model = random_model(1, chunk_size=4).train()
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    grads = []
    for splits in ([], list(range(1, 13))):
        model.zero_grad()
        stepwise(model, ids, splits).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_wkv_is_stable_where_a_naive_sum_overflows() -> None:
    gen = torch.Generator().manual_seed(2)
    B, T, C = 2, 50, 6
    k = torch.randn(B, T, C, generator=gen) * 60  # e^k over- and underflows float32
    v = torch.randn(B, T, C, generator=gen)
    w = torch.exp(torch.tensor([-6.0, -1.0, 0.0, 1.0, 3.0, 5.0]))
    u = torch.randn(C, generator=gen) * 30
    state = wkv_empty(B, C, "cpu")
    want = []
    for t in range(T):
        y, state = wkv_step(w, u, k[:, t], v[:, t], state)
        want.append(y)
    want_t = torch.stack(want, 1)
    assert torch.isfinite(want_t).all()
    for chunk in (1, 7, 50):
        got, end = wkv_chunked(w, u, k, v, wkv_empty(B, C, "cpu"), chunk)
        torch.testing.assert_close(got, want_t, rtol=1e-5, atol=1e-5)
        for a, b in zip(end, state, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # every output is a convex combination of the values seen so far
    assert (want_t <= v.cummax(1).values + 1e-5).all()
    assert (want_t >= v.cummin(1).values - 1e-5).all()


@torch.no_grad()
def test_bfloat16_stays_close_to_float32() -> None:
    model = random_model(3)
    ids = torch.randint(0, 61, (2, 64), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    half = model.to(torch.bfloat16)(ids).float()
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.05 * full.abs().max()
    state = model.make_cache(2, 64)
    assert state.wkv[0][0].dtype == torch.float32 and state.att_x[0].dtype == torch.bfloat16
    steps = stepwise(model, ids, list(range(1, 64, 5))).float()
    assert (steps - full).abs().max() < 0.05 * full.abs().max()


@torch.no_grad()
def test_left_padding_does_not_leak() -> None:
    model = random_model(4)
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 61, (n,), generator=gen) for n in (20, 13, 5)]
    width = 20
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, width - len(r) :] = True
    outs = []
    for pad_id in (0, 60):  # what the padding holds must not matter
        ids = torch.full((3, width), pad_id)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
        outs.append(model(ids, attention_mask=mask))
        state = model.make_cache(3, width + 4)  # prefill, then two more tokens
        model(ids, attention_mask=mask, cache=state)
        nxt = torch.tensor([[7, 8]] * 3)
        more = torch.cat([mask, torch.ones(3, 2, dtype=torch.bool)], 1)
        outs.append(model(nxt, attention_mask=more, cache=state))
    # real positions are bitwise the same whatever the padding held (pads add exact zeros)
    assert torch.equal(outs[0][mask], outs[2][mask]) and torch.equal(outs[1], outs[3])
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, torch.tensor([7, 8])])[None])
        torch.testing.assert_close(outs[0][i, width - len(r) :], alone[0, : len(r)],
                                   rtol=0, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(outs[1][i], alone[0, len(r) :], rtol=0, atol=1e-5)


@torch.no_grad()
def test_state_reorder_for_beams() -> None:
    model = random_model(5)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    state = model.make_cache(2, 16)
    model(ids, cache=state)
    state.reorder(torch.tensor([1, 1, 0]))  # row 1 twice, then row 0: the batch grows
    assert state.batch_size == 3 and state.length == 9
    nxt = torch.tensor([[3], [4], [5]])
    got = model(nxt, cache=state)[:, -1]
    for row, src in enumerate((1, 1, 0)):
        want = model(torch.cat([ids[src], nxt[row]])[None])[0, -1]
        torch.testing.assert_close(got[row], want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot roll back"):
        state.crop(5)
    state.crop(10)  # the current length: nothing to forget


@torch.no_grad()
def test_generate_every_strategy_batched_equals_one_at_a_time() -> None:
    model = random_model(6)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [11, 12, 13, 14]]
    for params in (
        GenerationParams(max_new_tokens=8),
        GenerationParams(max_new_tokens=8, do_sample=True, top_p=0.9, num_samples=2, seed=3),
        GenerationParams(max_new_tokens=6, num_beams=3, num_return_sequences=2),
        GenerationParams(max_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=2),
    ):
        together = generate(model, prompts, params, stops=Stops(params.max_new_tokens))
        for i, p in enumerate(prompts):
            alone = generate(model, [p], params, stops=Stops(params.max_new_tokens),
                             first_index=i)  # fmt: skip
            assert [c.tokens for c in together[i]] == [c.tokens for c in alone[0]], params
        # the recurrent state and recomputing the whole sequence agree
        again = generate(
            model, prompts, GenerationParams(**{**params.__dict__, "use_cache": False})
        )
        assert [[c.tokens for c in r] for r in again] == [[c.tokens for c in r] for r in together]
    greedy = generate(model, [prompts[0]], GenerationParams(max_new_tokens=8))[0][0].tokens
    ids = torch.tensor([prompts[0]])
    for t in greedy:  # greedy is the argmax of the parallel form's logits
        assert int(model(ids)[0, -1].argmax()) == t
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    # speculative decoding: the state rolls back to the accepted tokens; greedy with a draft
    # (another RWKV, or a GPT of the same vocabulary) is plain greedy
    from llmctl.model.gpt import GPT
    from llmctl.model.gpt import preset as gpt_preset

    torch.manual_seed(1)
    drafts = (random_model(7), model, GPT(gpt_preset("tiny", vocab_size=61)).eval())
    plain = generate(model, prompts, GenerationParams(max_new_tokens=12))
    for draft in drafts:
        for k in (1, 3, 5):
            spec = generate(model, prompts, GenerationParams(max_new_tokens=12, draft_k=k),
                            draft=draft)  # fmt: skip
            assert [r[0].tokens for r in spec] == [r[0].tokens for r in plain]
    sampled = GenerationParams(max_new_tokens=12, do_sample=True, seed=1, draft_k=3)
    assert all(len(r[0].tokens) == 12 for r in generate(model, prompts, sampled, draft=drafts[0]))


@torch.no_grad()
def test_crop_rolls_the_state_back() -> None:
    model = random_model(10)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(10))
    full = model(ids)
    state = model.make_cache(2, 20)
    model(ids[:, :6], cache=state)
    model(ids[:, 6:11], cache=state)
    model(torch.randint(0, 61, (2, 4)), cache=state)  # rejected drafts
    model(torch.randint(0, 61, (2, 1)), cache=state)
    state.crop(9)  # inside the second call: its first 3 tokens are fed again
    assert state.length == 9
    torch.testing.assert_close(model(ids[:, 9:], cache=state), full[:, 9:], rtol=0, atol=1e-5)
    state.crop(6)  # a call boundary: restored as it was
    torch.testing.assert_close(model(ids[:, 6:12], cache=state), full[:, 6:12], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot roll back"):
        state.crop(13)  # beyond the current length


def test_config_round_trip_and_checkpoint(tmp_path: Path) -> None:
    cfg = preset("rwkv-small", vocab_size=100)
    assert RWKVConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.causal and cfg.head == "lm" and cfg.d_ff == 1344
    with pytest.raises(ValueError, match="unknown key"):
        RWKVConfig.from_dict({**cfg.to_dict(), "n_head": 4})
    with pytest.raises(ValueError, match="d_model must be int"):
        RWKVConfig(vocab_size=10, n_layer=1, d_model=2.5)  # type: ignore[arg-type]
    model = random_model(7)
    save_checkpoint(tmp_path, model)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llmctl-rwkv"
    loaded = load_model(tmp_path)
    assert isinstance(loaded, RWKV) and load_config(tmp_path) == model.config
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_paper_initialization_and_parameter_budget() -> None:
    from llmctl.model.gpt import GPT
    from llmctl.model.gpt import preset as gpt_preset

    torch.manual_seed(0)
    for name in ("tiny", "small"):
        r = RWKV(preset(f"rwkv-{name}", vocab_size=512))
        g = GPT(gpt_preset(name, vocab_size=512))
        # equal weight matrices (the GPT's tied embedding is its head): only norms and the
        # RWKV per-channel vectors differ
        assert abs(r.num_params() - g.num_params()) < 0.02 * g.num_params()
    block = r.blocks[0]
    assert block.att.key.weight.abs().sum() == 0 and block.ffn.value.weight.abs().sum() == 0
    assert r.tok_emb.weight.abs().max() <= 1e-4
    decay = r.blocks[-1].att.time_decay.detach()
    assert decay[0] == pytest.approx(-5.0) and decay[-1] == pytest.approx(3.0)
    assert torch.all(decay[1:] >= decay[:-1])
    assert r.blocks[0].att.time_mix_k[0] == 0 and r.flops_per_token(256) > 6 * r.num_params()
    assert NEG < -1e29


# --- the CLI chain ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokens"
    args = ["tokenize", str(DATA), "--out", str(out), "--vocab-size", "512"]
    res = runner.invoke(app, [*args, "--val-fraction", "0.1", "-q"])
    assert res.exit_code == 0, res.output
    return out


def pretrain(tokens: Path, out: Path, *args: str) -> object:
    return runner.invoke(app, ["pretrain", str(tokens), "--out", str(out), *TINY, "-q", *args])


@pytest.mark.slow
def test_tiny_chain_pretrain_eval_generate(tokens: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    res = pretrain(tokens, ckpt, "--steps", "30", "--set", "warmup=3", "--set", "eval_every=10")
    assert res.exit_code == 0, res.output
    assert isinstance(load_model(ckpt), RWKV)
    stats = open_artifact(ckpt, "checkpoint").stats
    assert stats["val_loss"] < math.log(512) - 0.5
    assert stats["params_non_embedding"] == load_model(ckpt).num_params()

    res = runner.invoke(app, ["eval", str(ckpt), str(tokens), "-q"])
    assert res.exit_code == 0, res.output
    ev = eval_cmd.run(ckpt, [tokens], eval_cmd.EvalConfig(device="cpu"))
    # eval scores the same val split the training loop did
    assert ev["loss"] == pytest.approx(stats["val_loss"], abs=0.05) and ev["bits_per_byte"] > 0

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("ROMEO:", "To be")))
    for extra in ([], ["--do-sample", "--top-k", "20", "--seed", "1"], ["--num-beams", "3"]):
        out = tmp_path / f"s{len(extra)}"
        args = ["generate", str(ckpt), "--prompts", str(prompts), "--max-new-tokens", "12"]
        res = runner.invoke(app, [*args, "--out", str(out), "-q", *extra])
        assert res.exit_code == 0, res.output
        rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["completion_tokens"] >= 1 for r in rows)
    greedy = ["generate", str(ckpt), "--prompt", "To be", "--max-new-tokens", "12", "-q"]
    plain = runner.invoke(app, greedy)
    spec = runner.invoke(app, [*greedy, "--draft", str(ckpt), "--dtype", "float32"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    fp32 = runner.invoke(app, [*greedy, "--dtype", "float32"])
    assert spec.stdout == fp32.stdout and len(spec.stdout) > 5

    mlm = pretrain(tokens, tmp_path / "x", "--objective", "mlm", "--steps", "2")
    assert mlm.exit_code == 2 and "RWKV" in mlm.output
    arch = pretrain(tokens, tmp_path / "y", "--preset", "tiny", "--set", "model.arch=rwkv",
                    "--steps", "2")  # fmt: skip
    assert arch.exit_code == 0, arch.output and isinstance(load_model(tmp_path / "y"), RWKV)
    bad = pretrain(tokens, tmp_path / "z", "--set", "model.arch=mamba")
    assert bad.exit_code == 2 and "model.arch" in bad.output


KILLER = """
import os, signal, sys
from pathlib import Path
from llmctl.commands import pretrain
from llmctl.config import load_config
from llmctl.train import objectives
n, calls = int(sys.argv[3]), [0]
call = objectives.NextToken.__call__
def counted(self, *a, **k):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return call(self, *a, **k)
objectives.NextToken.__call__ = counted
cfg = load_config(pretrain.PretrainConfig, None, sys.argv[4:])
pretrain.run(Path(sys.argv[1]), Path(sys.argv[2]), cfg)
"""


@pytest.mark.slow
def test_resume_after_a_kill_is_bitwise(tokens: Path, tmp_path: Path) -> None:
    sets = ["preset=rwkv-tiny", "batch_size=4", "seq_len=32", "device=cpu", "steps=12",
            "grad_accum=2", "warmup=2", "save_every=4", "log_every=1", "eval_every=0"]  # fmt: skip
    opts = [x for s in sets[4:] for x in ("--set", s)]

    def records(ckpt: Path) -> list[tuple]:
        rows = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r]

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    straight = tmp_path / "straight"
    assert pretrain(tokens, straight, *opts).exit_code == 0
    out = tmp_path / "killed"  # SIGKILL between the micro-batches of step 7 (state 4 saved)
    cmd = [sys.executable, "-c", KILLER, str(tokens), str(out), "14", *sets]
    assert subprocess.run(cmd, capture_output=True, env=ENV).returncode == -signal.SIGKILL
    res = pretrain(tokens, out, *opts)
    assert res.exit_code == 0, res.output
    assert open_artifact(out, "checkpoint").stats["start_step"] == 4
    assert records(out) == records(straight) and len(records(out)) == 12
    assert sha(out / "model.safetensors") == sha(straight / "model.safetensors")


def test_labels_give_the_summed_loss_as_the_objectives_expect() -> None:
    from llmctl.train.objectives import IGNORE, token_loss

    model = random_model(9)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(9))
    labels = ids[:, 1:].clone()
    labels[0, :3] = IGNORE
    total, count = model(ids[:, :-1], labels=labels)
    want_total, want_count = token_loss(model(ids[:, :-1]), labels)
    assert int(count) == int(want_count) == 19 and torch.equal(total, want_total)
