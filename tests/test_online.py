"""Online RL (GRPO, PPO): the objectives equal their closed forms on hand-made numbers; rollouts
inside the loop on a real tiny checkpoint (new tokens capped on a short context), exact resume,
the value head left out of the saved checkpoint, reward specs and their one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact
from llmctl.data.prompts import load_prompts, prompt_of
from llmctl.errors import UsageError
from llmctl.model.gpt import GPT, GPTConfig
from llmctl.model.io import load_model, save_checkpoint
from llmctl.tokenizer import load_specials
from llmctl.train import experience
from llmctl.train.online import (
    GRPO,
    PPO,
    OnlineConfig,
    attach_value_head,
    clipped_surrogate,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_shaped_rewards,
    ppo_loss,
    token_logprobs,
    value_loss,
)
from llmctl.train.online_run import run_online
from llmctl.train.rewards import (
    KeywordReward,
    LengthReward,
    RewardModel,
    Samples,
    load_reward,
)

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
runner = CliRunner()
LN2 = math.log(2)


# --- closed forms ----------------------------------------------------------------------------


def test_group_advantages_standardize_within_each_group() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, eps=1e-4)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert adv.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0])


def test_k3_and_clipped_surrogate_by_hand() -> None:
    kl = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert kl.item() == pytest.approx(0.5 + LN2 - 1)  # exp(q) - q - 1, q = -ln 2
    old = torch.zeros(4)
    logp = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2)
    # ratio 1.5: min(1.5, 1.2) = 1.2 / min(-1.5, -1.2) = -1.5; ratio 0.5: 0.5 / -0.8
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]


def test_grpo_loss_equals_its_closed_form() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])
    old = torch.tensor([[-1.1, -2.0, -0.4], [-0.3, -1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.5, -0.6], [-0.5, -1.2, -1.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    adv = torch.tensor([0.7, -1.3])
    beta, eps = 0.1, 0.2
    total, n = grpo_loss(logp, old, ref, adv, mask, clip_eps=eps, beta=beta)
    want = 0.0
    for i in range(2):
        terms = []
        for t in range(3):
            if not mask[i, t]:
                continue
            r = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            pg = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            q = (ref[i, t] - logp[i, t]).item()
            terms.append(pg + beta * (math.exp(q) - q - 1))
        want += sum(terms) / len(terms)
    assert n == 2
    assert total.item() == pytest.approx(want, rel=1e-6)


def test_ppo_pieces_by_hand() -> None:
    mask = torch.tensor([[0, 1, 1]])
    shaped = kl_shaped_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -1.0, -2.0]]),
                               torch.tensor([[-1.5, -1.0, -1.0]]), mask, 0.1)  # fmt: skip
    assert shaped[0].tolist() == pytest.approx([0.0, 0.0, 2.1])  # -0.1·(-2 - -1) + 2
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), mask,
                   gamma=1.0, lam=0.9)  # fmt: skip
    # δ2 = 1 - 0.7 = 0.3 = A2; δ1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.9·0.3 = 0.37
    assert adv[0].tolist() == pytest.approx([0.0, 0.37, 0.3])
    assert ret[0].tolist() == pytest.approx([0.0, 0.97, 1.0])
    vl = value_loss(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0]), 0.2)
    assert vl.item() == pytest.approx(0.5 * (0.7 - 2.0) ** 2)  # the clipped error is larger
    logp, adv = torch.tensor([[0.0, math.log(1.5), 0.0]]), torch.tensor([[5.0, 1.0, -1.0]])
    total, count = ppo_loss(
        logp, torch.zeros(1, 3), adv, torch.tensor([[9.0, 1.0, 0.0]]),
        torch.tensor([[9.0, 0.5, 0.0]]), torch.tensor([[9.0, 2.0, 0.0]]), mask,
        clip_eps=0.2, vf_coef=0.5, vf_clip=0.2,
    )  # fmt: skip
    # token 1: -min(1.5, 1.2) + 0.5·0.845; token 2: -(1·-1) + 0.5·0 (v = R = 0)
    assert count.item() == 2
    assert total.item() == pytest.approx(-1.2 + 0.5 * 0.845 + 1.0)


def _tiny_lm(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16))


def test_grpo_and_ppo_objectives_equal_the_closed_forms_on_a_model() -> None:
    model = _tiny_lm()
    tokens = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 6, 7, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])
    ref = torch.full((2, 5), -3.0)
    batch = {"tokens": tokens, "mask": mask, "ref_logp": ref, "adv": torch.tensor([1.0, -0.5]),
             "rewards": torch.tensor([1.0, 0.0]), "capped": torch.zeros(2)}  # fmt: skip
    out = GRPO(clip_eps=0.2, beta=0.1)(model, batch, torch.Generator())
    logp = token_logprobs(model(tokens[:, :-1]), tokens[:, 1:]).detach()
    want, _ = grpo_loss(logp, logp, ref, batch["adv"], mask, clip_eps=0.2, beta=0.1)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.count.item() == 2
    assert out.metrics["response_len"][0].item() == 6
    assert out.metrics["clip_frac"][0].item() == 0  # ρ = 1 on the first pass

    attach_value_head(model)
    adv = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)) * mask
    ppo_batch = {**batch, "adv": adv, "values": torch.zeros(2, 5), "returns": adv}
    out = PPO(clip_eps=0.2, vf_coef=0.5, vf_clip=0.2)(model, ppo_batch, torch.Generator())
    want, count = ppo_loss(logp, logp, adv, torch.zeros(2, 5), torch.zeros(2, 5), adv, mask,
                           clip_eps=0.2, vf_coef=0.5, vf_clip=0.2)  # fmt: skip
    assert out.total.item() == pytest.approx(want.item(), rel=1e-6)  # zero-init head: V = 0
    assert out.count.item() == count.item() == 6


# --- rewards and prompts ---------------------------------------------------------------------


def test_builtin_rewards() -> None:
    s = Samples([[1]] * 3, [[5] * 8, [5] * 4, []], ["p"] * 3, ["a Happy end", "no", ""])
    assert LengthReward(8)(s).tolist() == [1.0, 0.5, 0.0]
    assert KeywordReward("happy")(s).tolist() == [1.0, 0.0, 0.0]


def test_reward_spec_errors(tmp_path: Path) -> None:
    for spec, why in [
        ("", "missing"),
        ("builtin:nope", "unknown builtin"),
        ("builtin:length:-3", "positive integer"),
        ("builtin:keyword:", "give the word"),
        (str(tmp_path / "none"), "not a checkpoint directory"),
    ]:
        with pytest.raises(UsageError, match=why) as e:
            load_reward(spec, tokenizer_dir=tmp_path)
        assert "\n" not in str(e.value)


def test_prompt_forms() -> None:
    assert prompt_of({"prompt": "Hi"}) == ("Hi", "")
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert prompt_of({"messages": msgs}) == ([msgs[0]], "")
    assert prompt_of({"prompt": "Q", "chosen": "A", "rejected": "B"}) == ("Q", "")
    hh = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello",
        "rejected": "\n\nHuman: hi\n\nAssistant: go",
    }
    assert prompt_of(hh) == ("\n\nHuman: hi\n\nAssistant:", "")
    sharegpt = {"conversations": [{"from": "human", "value": "Q"}], "chosen": {}, "rejected": {}}
    assert prompt_of(sharegpt) == ([{"role": "user", "content": "Q"}], "")
    assert prompt_of({"text": "x"})[0] is None


# --- end to end on a real tiny checkpoint ----------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_lm: Path) -> Path:
    return tiny_lm


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"{w} speaks of the king and"}) for w in
             ("First Citizen", "ROMEO", "JULIET", "KING", "MENENIUS", "QUEEN", "Nurse",
              "GLOUCESTER", "HAMLET", "LEAR")]  # fmt: skip
    lines.insert(3, '{"text": "no prompt here"}')
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = dict(batch_size=2, group_size=3, max_new_tokens=8, eval_prompts=2, device="cpu",
            lr=1e-3, log_every=1, chat="no")  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed(a: Path, b: Path) -> bool:
    """Whether the weights of two checkpoints differ (so a resume test is not vacuous)."""
    x, y = load_model(a).state_dict(), load_model(b).state_dict()
    return any(not torch.equal(x[k], y[k]) for k in x)


def rows(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]


@pytest.mark.slow
def stopped_and_rerun(monkeypatch: pytest.MonkeyPatch, base: Path, prompts: Path, out: Path,
                      method: str, cfg: OnlineConfig, stop_at: int) -> Path:  # fmt: skip
    """Run until the `stop_at`-th rollout is asked for (Ctrl-C there), then rerun the same
    command; returns what the rerun published."""
    real = experience.Rollouts.__next__
    calls = {"n": 0}

    def failing(self: experience.Rollouts) -> dict:
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(experience.Rollouts, "__next__", failing)
    with pytest.raises(KeyboardInterrupt):
        run_online(base, [prompts], out, method, "builtin:distinct", cfg)
    monkeypatch.setattr(experience.Rollouts, "__next__", real)
    return run_online(base, [prompts], out, method, "builtin:distinct", cfg)


def test_grpo_publishes_stats_and_resumes_bit_for_bit(
    base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = OnlineConfig(steps=4, save_every=2, eval_every=0, **FAST)
    straight = run_online(base, [prompts], tmp_path / "a", "grpo", "builtin:distinct", cfg)
    m = open_artifact(straight, "checkpoint")
    rl = m.stats["rl"]
    assert rl["method"] == "grpo" and rl["steps"] == 4
    assert set(rl) >= {"reward_before", "reward_after", "kl"}
    assert m.stats["prompts"]["rejected"] == {"bad_prompt": 1}
    assert "bad_prompt" in (straight / "rejected" / "errors.jsonl").read_text()
    last = [r for r in rows(straight) if "reward" in r][-1]
    assert {"reward", "kl", "clip_frac", "response_len"} <= set(last)

    # Stop during step 3 (after the state of step 2 was saved), then rerun: same weights.
    resumed = stopped_and_rerun(monkeypatch, base, prompts, tmp_path / "b", "grpo", cfg, 4)
    assert open_artifact(resumed, "checkpoint").stats["start_step"] == 2
    assert changed(base, straight)
    assert sha(resumed / "model.safetensors") == sha(straight / "model.safetensors")
    assert rows(resumed) == rows(straight)


@pytest.mark.slow
def test_rollouts_cap_new_tokens_on_a_short_context(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    # max_new_tokens above the whole context (64): prompts are cut, new tokens capped, no error
    cfg = OnlineConfig(steps=1, eval_every=0, **{**FAST, "max_new_tokens": 100})
    out = run_online(base, [prompts], tmp_path / "o", "grpo", "builtin:distinct", cfg)
    first = rows(out)[0]
    assert first["capped"] == 1.0
    assert first["response_len"] <= 63


@pytest.mark.slow
def test_ppo_trains_a_value_head_that_is_not_saved(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    cfg = OnlineConfig(steps=2, eval_every=0, ppo_epochs=2, **FAST)
    out = run_online(base, [prompts], tmp_path / "p", "ppo", "builtin:distinct", cfg)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("aux")]  # noqa: SIM118
    assert "value_loss" in rows(out)[-2]
    # the state in progress held the value head (it trains), the checkpoint does not
    assert load_model(out).aux is not None and len(load_model(out).aux) == 0
    assert open_artifact(out, "checkpoint").stats["rl"]["method"] == "ppo"


def _reward_model(base: Path, out: Path) -> Path:
    cfg = dataclasses.replace(load_model(base).config, head="score")
    torch.manual_seed(0)
    rm = GPT(cfg)
    with building(out, kind="checkpoint", command="test", config={}) as art:
        save_checkpoint(
            art.dir, rm, {n: base / n for n in ("tokenizer.json", "tokenizer_config.json")}
        )
    return out


@pytest.mark.slow
def test_reward_model_and_judge_specs(base: Path, tmp_path: Path) -> None:
    rm_dir = _reward_model(base, tmp_path / "rm")
    rm = load_reward(str(rm_dir), tokenizer_dir=base)
    assert isinstance(rm, RewardModel)
    s = Samples([[1, 2, 3], [1, 2]], [[4, 5], [6]], ["a", "b"], ["c", "d"])
    scores = rm(s)
    # read where `align --method reward` trained it: after the answer's end-of-turn token
    # (a response body comes without its stop token; reading at its last word was the bug)
    end = load_specials(rm_dir).end_of_turn
    assert rm.end == (end,)
    want = rm.model(torch.tensor([[1, 2, 3, 4, 5, end]]))[0, -1, 0]
    assert scores.shape == (2,) and scores[0].item() == pytest.approx(want.item(), rel=1e-5)
    bare = rm.model(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1, 0]
    assert scores[0].item() != pytest.approx(bare.item(), rel=1e-5)
    with pytest.raises(UsageError, match="not a reward model"):
        load_reward(str(base), tokenizer_dir=base)
    with pytest.raises(UsageError, match="a judge must be a language model"):
        load_reward(f"judge:{rm_dir}", tokenizer_dir=base)
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "tokenizer.json").write_text((base / "tokenizer.json").read_text().replace(
        '"model"', '"model" ', 1))  # fmt: skip
    with pytest.raises(UsageError, match="tokenizer differs"):
        load_reward(str(rm_dir), tokenizer_dir=other)
    judge = load_reward(f"judge:{base}", tokenizer_dir=base)
    got = judge(Samples([[1]] * 2, [[1], [2]], ["KING", "KING"], ["the king", "zzzz qqqq"]))
    assert got.shape == (2,) and bool(torch.isfinite(got).all())
    yes = load_reward(f"judge-yes:{base}", tokenizer_dir=base)
    assert yes(Samples([[1]], [[1]], ["KING"], ["the king"])).item() < 0


def test_prompts_are_cut_from_the_left_and_bad_lines_counted(base: Path, prompts: Path) -> None:
    from llmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    got = load_prompts([prompts], tok, template=None, max_tokens=4)
    assert got.truncated == 10 and all(len(ids) == 4 for ids in got.ids)
    assert got.stats["rejected"] == {"bad_prompt": 1}
    with pytest.raises(UsageError, match=r"prompts.jsonl:4: prompt: missing"):
        load_prompts([prompts], tok, template=None, max_tokens=4, strict=True)


@pytest.mark.slow
def test_lora_grpo_trains_only_the_adapter(base: Path, prompts: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    cfg = OnlineConfig(steps=2, eval_every=0, lora=True, lora_rank=2, **FAST)
    out = run_online(base, [prompts], tmp_path / "ad", "grpo", "builtin:distinct", cfg)
    m = open_artifact(out, "adapter")
    assert m.stats["lora"]["r"] == 2 and m.stats["rl"]["steps"] == 2
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_a_nan_reward_stops_the_loop_before_the_weights_change(base: Path, tmp_path: Path) -> None:
    from llmctl.model.sample import Stops
    from llmctl.train.loop import NonFiniteLoss, Writer, train

    class NanReward:
        name = "nan"

        def __call__(self, samples: Samples) -> torch.Tensor:
            return torch.full((len(samples.response_ids),), float("nan"))

    policy = load_model(base).float()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ref = load_model(base).requires_grad_(False)
    cfg = OnlineConfig(steps=2, eval_every=0, **FAST)
    batches = experience.Rollouts(policy, ref, NanReward(), [[1, 2, 3]] * 4, ["x"] * 4, cfg,
                                  stops=Stops(8), pad_id=0, method="grpo", decode=str)  # fmt: skip
    with pytest.raises(NonFiniteLoss, match="step 1: loss is nan"):
        train(policy, batches, GRPO(), cfg, Writer(tmp_path / "w", {}))
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


@pytest.mark.slow
def test_ppo_resumes_bit_for_bit_inside_a_rollout_cycle(
    base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ppo_epochs=2: step 1 reuses step 0's rollout; a stop there resumes from the saved rollout
    cfg = OnlineConfig(steps=3, save_every=1, eval_every=0, ppo_epochs=2, **FAST)
    straight = run_online(base, [prompts], tmp_path / "a", "ppo", "builtin:distinct", cfg)
    resumed = stopped_and_rerun(monkeypatch, base, prompts, tmp_path / "b", "ppo", cfg, 2)
    assert open_artifact(resumed, "checkpoint").stats["start_step"] == 1
    assert changed(base, straight)
    assert sha(resumed / "model.safetensors") == sha(straight / "model.safetensors")
    assert rows(resumed) == rows(straight)
