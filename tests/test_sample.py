"""Decoding strategies (model/sample.py) and adapter merging (model/adapter.py) on tiny models
and hand-built logits: exact equalities, no tokenizer needed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmctl.model.adapter import merge_adapter
from llmctl.model.gpt import GPT, GPTConfig, preset
from llmctl.model.sample import (
    Completion,
    GenerationParams,
    History,
    Stops,
    accept_or_resample,
    fill_masks,
    frequency_presence_penalty,
    generate,
    min_p_filter,
    process,
    repetition_penalty,
    stream,
    top_k_filter,
    top_p_filter,
)

V = 61
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [3]]
INF = float("-inf")


def tiny(seed: int = 0, **kw: object) -> GPT:
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=V, max_seq_len=48, **kw)).eval()
    with torch.no_grad():  # sharper distributions than the 0.02-std init: fewer near-ties
        for p in model.parameters():
            p.mul_(20)
    return model


def gpt2_like(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=64,
                    norm="layernorm", mlp="gelu", pos="learned", bias=True)  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return model


def toks(results: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.tokens for c in r] for r in results]


# --- processors on hand-built logits ------------------------------------------------------------


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_keeps_exactly_the_k_best_and_ties() -> None:
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert kept(top_k_filter(x, 2)) == [1, 3]
    assert kept(top_k_filter(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 1)) == [1, 2]  # tie kept
    assert kept(top_k_filter(x, 0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    x = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]).log()
    assert kept(top_p_filter(x, 0.7)) == [0, 1]  # 0.5 < 0.7 <= 0.75
    assert kept(top_p_filter(x, 0.8)) == [0, 1, 2]  # 0.75 < 0.8 <= 0.875
    assert kept(top_p_filter(x, 0.4)) == [0]  # the top token alone already crosses p
    kept_logits = top_p_filter(x, 0.8)[0, :3]
    assert torch.equal(kept_logits, x[0, :3])  # survivors untouched


def test_min_p_drops_tokens_below_the_scaled_threshold() -> None:
    x = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]).log()
    assert kept(min_p_filter(x, 0.15)) == [0, 1, 2]  # threshold 0.075
    assert kept(min_p_filter(x, 0.7)) == [0]
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3, 4]


def test_top_p_and_min_p_match_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import MinPLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    x = torch.randn(4, 50) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(top_p_filter(x, p), TopPLogitsWarper(p)(None, x.clone()))
        assert torch.equal(min_p_filter(x, p), MinPLogitsWarper(p)(None, x.clone()))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    x = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert repetition_penalty(x, seen, 2.0).tolist() == [[1.0, -4.0, 3.0, -1.0]]


def test_frequency_and_presence_penalties_follow_openai() -> None:
    x = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = frequency_presence_penalty(x, counts, frequency=0.5, presence=0.25)
    assert out.tolist() == [[1.0, 0.25, -0.75]]


def test_penalties_see_prompt_and_generated_tokens_as_specified() -> None:
    params = GenerationParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    h = History([[0, 1]], params, 4, torch.device("cpu"))
    h.append([2])
    h.append([2])
    out = process(torch.tensor([[4.0, 4.0, 4.0, 4.0]]), h, params, warp=False)
    # repetition: prompt and output tokens (0, 1, 2) halve; frequency/presence: output only
    assert out.tolist() == [[2.0, 2.0, 2.0 - 2 * 1.0 - 0.5, 4.0]]


def test_no_repeat_ngram_bans_exactly_the_completing_tokens() -> None:
    params = GenerationParams(no_repeat_ngram_size=3)
    h = History([[5, 6, 7, 5, 6]], params, 10, torch.device("cpu"))
    assert h.banned() == [[7]]
    h.append([8])  # ... 5 6 8: the prefix (6, 8) was never seen
    assert h.banned() == [[]]
    out = process(torch.zeros(1, 10), History([[1, 2, 1]], params, 10, torch.device("cpu")),
                  params, warp=False)  # fmt: skip
    assert out[0].isinf().nonzero().flatten().tolist() == []  # (2, 1) never followed by anything
    model = tiny()
    [[c]] = generate(model, [[1, 2, 3]], GenerationParams(max_new_tokens=30,
                                                          no_repeat_ngram_size=2))  # fmt: skip
    seq = [1, 2, 3, *c.tokens]
    bigrams = list(itertools.pairwise(seq))
    assert len(bigrams) == len(set(bigrams))


def test_invalid_settings_are_refused() -> None:
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(num_return_sequences=3),
                dict(num_samples=2), dict(do_sample=True, num_beams=2)):  # fmt: skip
        with pytest.raises(ValueError):
            GenerationParams(**bad)  # type: ignore[arg-type]


# --- strategies on tiny models ------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal", "alibi", "relative"])
def test_greedy_and_beam_cached_uncached_batched_unbatched_agree(pos: str) -> None:
    model = tiny(pos=pos)
    beam = GenerationParams(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    for params in (GenerationParams(max_new_tokens=12), beam):
        stops = Stops(params.max_new_tokens, eos_ids=frozenset({5}))
        batched = toks(generate(model, PROMPTS, params, stops=stops))
        one_by_one = [toks(generate(model, [p], params, stops=stops))[0] for p in PROMPTS]
        uncached = toks(generate(model, PROMPTS, GenerationParams(
            **{**params.__dict__, "use_cache": False}), stops=stops))  # fmt: skip
        assert batched == one_by_one == uncached


def test_one_beam_is_greedy() -> None:
    model = tiny(1)
    stops = Stops(15, eos_ids=frozenset({3}))
    greedy = toks(generate(model, PROMPTS, GenerationParams(max_new_tokens=15), stops=stops))
    beam = toks(generate(model, PROMPTS, GenerationParams(max_new_tokens=15, num_beams=1),
                         stops=stops))  # fmt: skip
    assert greedy == beam


@pytest.mark.parametrize(
    ("num_beams", "length_penalty", "early_stopping", "eos"),
    [(3, 1.0, False, [3]), (4, 0.5, True, [3, 7]), (2, 2.0, False, [3]), (4, 1.0, True, [7])],
)
def test_beam_search_equals_transformers(num_beams: int, length_penalty: float,
                                         early_stopping: bool, eos: list[int]) -> None:  # fmt: skip
    pytest.importorskip("transformers")
    from llmctl.model.hf import to_hf_gpt2

    model = gpt2_like()
    hf = to_hf_gpt2(model)
    kw = dict(max_new_tokens=10, num_beams=num_beams, num_return_sequences=num_beams,
              length_penalty=length_penalty, early_stopping=early_stopping)  # fmt: skip
    for seed in range(3):
        prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(seed))
        ref = hf.generate(prompt, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True, **kw)  # fmt: skip
        ours = generate(model, [prompt[0].tolist()], GenerationParams(**kw),
                        stops=Stops(10, eos_ids=frozenset(eos)))[0]  # fmt: skip
        for seq, score, c in zip(ref.sequences, ref.sequences_scores, ours, strict=True):
            gen = seq[5:].tolist()
            ends = [i for i, t in enumerate(gen) if t in eos]  # HF pads finished beams with eos
            assert c.tokens == (gen[: ends[0] + 1] if ends else gen)
            assert c.score == pytest.approx(float(score), abs=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_batching() -> None:
    model = tiny(2)
    params = GenerationParams(max_new_tokens=15, do_sample=True, temperature=0.8, top_k=20,
                              top_p=0.95, min_p=0.02, num_samples=3, seed=7)  # fmt: skip
    a = toks(generate(model, PROMPTS, params))
    assert a == toks(generate(model, PROMPTS, params))
    assert a == [toks(generate(model, [p], params, first_index=i))[0]
                 for i, p in enumerate(PROMPTS)]  # fmt: skip
    assert len({tuple(s) for s in a[0]}) > 1  # the samples of one prompt differ
    other = toks(generate(model, PROMPTS, GenerationParams(**{**params.__dict__, "seed": 8})))
    assert other != a


def test_speculative_greedy_equals_greedy_token_for_token() -> None:
    model, draft = tiny(3), tiny(4, n_layer=1)
    for params in (GenerationParams(max_new_tokens=25, draft_k=4),
                   GenerationParams(max_new_tokens=25, draft_k=2, repetition_penalty=1.3,
                                    no_repeat_ngram_size=3),
                   GenerationParams(max_new_tokens=25, draft_k=5, use_cache=False)):  # fmt: skip
        stops = Stops(25, eos_ids=frozenset({9}))
        plain = toks(generate(model, PROMPTS, params, stops=stops))
        assert toks(generate(model, PROMPTS, params, stops=stops, draft=draft)) == plain
        assert toks(generate(model, PROMPTS, params, stops=stops, draft=model)) == plain


def test_speculative_sampling_rule_reproduces_the_target_distribution() -> None:
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    gen = torch.Generator().manual_seed(0)
    n, counts = 40_000, torch.zeros(4)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    for d in drafts:
        out = accept_or_resample(p, q, d, gen)
        counts[d if out is None else out] += 1
    assert torch.allclose(counts / n, p, atol=0.01)
    # a draft identical to the target is always accepted
    assert all(accept_or_resample(p, p, d, gen) is None for d in range(4) for _ in range(50))


def test_speculative_sampling_runs_and_is_seeded() -> None:
    model, draft = tiny(3), tiny(4, n_layer=1)
    params = GenerationParams(max_new_tokens=20, do_sample=True, top_p=0.9, seed=1, draft_k=3)
    a = toks(generate(model, PROMPTS, params, draft=draft))
    assert a == toks(generate(model, PROMPTS, params, draft=draft))
    assert all(len(r[0]) == 20 for r in a)


# --- stops and streaming ------------------------------------------------------------------------


def letters(ids: list[int]) -> str:
    return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_cut_exactly_before_the_string() -> None:
    model = tiny(5)
    [[free]] = generate(model, [[1, 2]], GenerationParams(max_new_tokens=20),
                        stops=Stops(20, decode=letters))  # fmt: skip
    text = letters(free.tokens)
    stop = text[7:10]
    cut = text.index(stop)
    [[c]] = generate(model, [[1, 2]], GenerationParams(max_new_tokens=20),
                     stops=Stops(20, strings=(stop, "zzzz"), decode=letters))  # fmt: skip
    assert (c.text, c.finish_reason) == (text[:cut], "stop_string")
    assert c.tokens == free.tokens[: len(c.tokens)] and len(c.tokens) == cut + len(stop)
    deltas = list(stream(model, [1, 2], GenerationParams(max_new_tokens=20),
                         stops=Stops(20, strings=(stop,), decode=letters)))  # fmt: skip
    assert "".join(d.text for d in deltas) == text[:cut]


def test_stop_tokens_and_length_set_the_finish_reason() -> None:
    model = tiny(5)
    [[free]] = generate(model, [[1, 2]], GenerationParams(max_new_tokens=20))
    assert free.finish_reason == "length" and len(free.tokens) == 20
    eos, stop = free.tokens[6], free.tokens[3]
    stops = Stops(20, eos_ids=frozenset({eos}), stop_ids=frozenset({stop}), decode=letters)
    [[c]] = generate(model, [[1, 2]], GenerationParams(max_new_tokens=20), stops=stops)
    first = min(free.tokens.index(eos), free.tokens.index(stop))
    assert c.tokens == free.tokens[: first + 1]
    assert c.finish_reason == ("eos" if free.tokens[first] == eos else "stop")
    assert c.text == letters(c.tokens[:-1])  # the stop token is not part of the text


def test_reading_tokens_back_late_changes_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA loop's read-back lag, forced on CPU: the host checks stops `lag` steps after
    the device chose the tokens, yet every completion, finish reason and streamed text is
    what reading each token at once gives, and at most `lag` steps run past the last stop."""
    from llmctl.model import sample

    model = tiny(5)
    [[free]] = generate(model, [[1, 2]], GenerationParams(max_new_tokens=20))
    eos = free.tokens[11]  # a token the rows below reach at different steps
    cases = [
        (GenerationParams(max_new_tokens=20), Stops(20, eos_ids=frozenset({eos}))),
        (GenerationParams(max_new_tokens=20, do_sample=True, top_p=0.9, repetition_penalty=1.3,
                          frequency_penalty=0.2, num_samples=2, seed=3),
         Stops(20, eos_ids=frozenset({eos}))),
        (GenerationParams(max_new_tokens=20),
         Stops(20, strings=("dg", "q"), decode=letters)),
        (GenerationParams(max_new_tokens=20, no_repeat_ngram_size=2),
         Stops(20, eos_ids=frozenset({eos}))),
    ]  # fmt: skip
    fed: list[int] = []
    feed = sample.Runner.feed

    def counting(self: sample.Runner, tokens: torch.Tensor) -> torch.Tensor:
        fed.append(1)
        return feed(self, tokens)

    monkeypatch.setattr(sample.Runner, "feed", counting)
    for params, stops in cases:
        now = generate(model, PROMPTS, params, stops=stops)
        streamed = ["".join(d.text for d in stream(model, p, params, stops=stops, index=i))
                    for i, p in enumerate(PROMPTS)]  # fmt: skip
        fed.clear()
        monkeypatch.setattr(sample, "READBACK_LAG", {"cpu": 3})
        late = generate(model, PROMPTS, params, stops=stops)
        feeds = len(fed)
        assert [[(c.tokens, c.finish_reason, c.text) for c in r] for r in late] == [
            [(c.tokens, c.finish_reason, c.text) for c in r] for r in now
        ]
        assert streamed == ["".join(d.text for d in stream(model, p, params, stops=stops, index=i))
                            for i, p in enumerate(PROMPTS)]  # fmt: skip
        longest = max(len(c.tokens) for r in now for c in r)
        lag = 0 if params.no_repeat_ngram_size else 3  # the n-gram rule reads every token
        assert longest - 1 <= feeds <= min(longest - 1 + lag, 19)
        monkeypatch.setattr(sample, "READBACK_LAG", {})
        # every case has rows that stop at different steps, so late reads really drop tokens
        assert len({len(c.tokens) for r in now for c in r}) > 1, params


def test_visible_text_holds_back_partial_stop_strings_and_characters() -> None:
    stops = Stops(10, strings=("END",), decode=lambda ids: "".join(map(chr, ids)))
    c = Completion(tokens=[ord(ch) for ch in "abcEN"])
    assert stops.visible(c) == "abc"
    c = Completion(tokens=[ord("a"), 0xFFFD])
    assert stops.visible(c) == "a"


# --- masked LM ------------------------------------------------------------------------------


def test_masked_lm_fills_every_mask_most_confident_first() -> None:
    model = tiny(6, causal=False)
    mask_id, ids = 3, [10, 3, 11, 3, 3, 12]
    params = GenerationParams()
    out = fill_masks(model, ids, mask_id, params, banned_ids=[0, 1, 2, 3])
    assert [out[i] for i in (0, 2, 5)] == [10, 11, 12] and 3 not in out
    assert all(out[i] >= 4 for i in (1, 3, 4))
    logits = model(torch.tensor([ids]))[0, [1, 3, 4]]
    logits[:, :4] = INF
    probs = logits.softmax(-1)
    j = int(probs.amax(-1).argmax())
    assert out[[1, 3, 4][j]] == int(probs[j].argmax())  # the first fill is the surest one
    sampled = GenerationParams(do_sample=True, top_k=5)
    a = fill_masks(model, ids, mask_id, sampled, generator=torch.Generator().manual_seed(0))
    b = fill_masks(model, ids, mask_id, sampled, generator=torch.Generator().manual_seed(0))
    assert a == b and mask_id not in a
    with pytest.raises(ValueError, match="masked-LM"):
        generate(model, [[1, 2]], params)
    with pytest.raises(ValueError, match="no mask"):
        fill_masks(model, [10, 11], mask_id, params)


# --- adapters -----------------------------------------------------------------------------------


def write_adapter(dir: Path, model: GPT, digest: str | None, r: int = 2, alpha: float = 8.0,
                  **extra: object) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    torch.manual_seed(1)
    pairs = {}
    for name in ("blocks.0.attn.q_proj", "blocks.1.mlp.down_proj"):
        w = dict(model.named_modules())[name].weight
        pairs[name] = (torch.randn(r, w.shape[1]), torch.randn(w.shape[0], r))
    dir.mkdir(parents=True, exist_ok=True)
    # the tiny preset is Llama-shaped: the file uses Llama's module names
    hf = {"blocks.0.attn.q_proj": "model.layers.0.self_attn.q_proj",
          "blocks.1.mlp.down_proj": "model.layers.1.mlp.down_proj"}  # fmt: skip
    save_file({f"base_model.model.{hf[n]}.lora_{ab}.weight": t
               for n, (a, b) in pairs.items() for ab, t in (("A", a), ("B", b))},
              dir / "adapter_model.safetensors")  # fmt: skip
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
           "target_modules": ["q_proj", "down_proj"], **extra}  # fmt: skip
    if digest is not None:
        cfg["base_checkpoint_digest"] = digest
    (dir / "adapter_config.json").write_text(json.dumps(cfg))
    return pairs


def test_adapter_merge_adds_b_a_times_alpha_over_r(tmp_path: Path) -> None:
    model = tiny(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = write_adapter(tmp_path / "a", model, "abc", r=2, alpha=8.0)
    assert merge_adapter(model, tmp_path / "a", base_digest="abc") == sorted(pairs)
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module in pairs:
            a, b = pairs[module]
            assert torch.allclose(t, before[name] + b @ a * 4.0, atol=1e-5)
        else:
            assert torch.equal(t, before[name])
    rs = tiny(7)
    write_adapter(tmp_path / "rs", rs, "abc", r=4, alpha=8.0, use_rslora=True)
    a, b = write_adapter(tmp_path / "rs", rs, "abc", r=4, alpha=8.0, use_rslora=True)[
        "blocks.0.attn.q_proj"
    ]
    w0 = rs.blocks[0].attn.q_proj.weight.clone()
    merge_adapter(rs, tmp_path / "rs", base_digest="abc")
    assert torch.allclose(rs.blocks[0].attn.q_proj.weight, w0 + b @ a * 8.0 / 2.0, atol=1e-5)


def test_adapter_for_another_base_or_malformed_is_refused(tmp_path: Path) -> None:
    model = tiny(7)
    write_adapter(tmp_path / "a", model, "abc")
    with pytest.raises(ValueError, match="trained on abc, but this checkpoint's digest is xyz"):
        merge_adapter(model, tmp_path / "a", base_digest="xyz")
    write_adapter(tmp_path / "none", model, None)
    with pytest.raises(ValueError, match="records no base checkpoint"):
        merge_adapter(model, tmp_path / "none", base_digest="abc")
    other = tiny(7, d_model=32, d_ff=64)
    with pytest.raises(ValueError, match="do not fit"):
        merge_adapter(other, tmp_path / "a", base_digest="abc")
    write_adapter(tmp_path / "t", model, "abc", target_modules=["k_proj"])
    with pytest.raises(ValueError, match="not in target_modules"):
        merge_adapter(model, tmp_path / "t", base_digest="abc")


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal", "alibi", "relative"])
def test_static_cache_runner_gives_the_plain_runners_logits(pos: str) -> None:
    """The CUDA-graph path's arithmetic, checked on CPU in fp32: a StaticKVCache with slot
    tensors and a full-length key mask gives the logits of the growing KV cache, padding too."""
    from llmctl.model.sample import Runner

    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=97, pos=pos, max_seq_len=40)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
    plain = Runner(model, prompts, 12)
    static = Runner(model, prompts, 12, static=True)
    assert static.static and not plain.static
    with torch.no_grad():
        torch.testing.assert_close(static.prefill(), plain.prefill(), rtol=1e-5, atol=1e-5)
        for step in range(10):
            nxt = torch.tensor([[20 + step], [30 + step], [40 + step]])
            a, b = static.feed(nxt), plain.feed(nxt)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one token per row"):
        static.feed(torch.tensor([[1, 2], [3, 4], [5, 6]]))
