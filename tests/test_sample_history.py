"""model/sample.py's bookkeeping: the token history the penalties read (each setting alone),
beam reordering of it, the speculative acceptance rule's randomness (only its generator), and
the models generation refuses."""

from __future__ import annotations

import pytest
import torch

from llmctl.model.gpt import GPT, preset
from llmctl.model.sample import GenerationParams, History, Stops, accept_or_resample, generate

V = 12


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(repetition_penalty=1.3),
        GenerationParams(frequency_penalty=0.5),
        GenerationParams(presence_penalty=0.5),
        GenerationParams(no_repeat_ngram_size=2),
    ],
)
def test_history_tracks_generated_tokens_for_each_setting_alone(params: GenerationParams) -> None:
    h = History([[1, 2], [3]], params, V, torch.device("cpu"))
    h.append([4, 5])
    h.append([4, 3])
    assert h.seqs == [[1, 2, 4, 4], [3, 5, 3]]
    if params.repetition_penalty != 1.0:
        assert h.seen[0].nonzero().flatten().tolist() == [1, 2, 4]
        assert h.seen[1].nonzero().flatten().tolist() == [3, 5]
        assert h.counts is None and h.ngrams is None
    if params.frequency_penalty or params.presence_penalty:
        assert h.counts[0].tolist() == [0, 0, 0, 0, 2] + [0] * 7  # generated tokens only
        assert h.counts[1].tolist() == [0, 0, 0, 1, 0, 1] + [0] * 6
        assert h.seen is None
    if params.no_repeat_ngram_size:
        assert h.banned() == [[4], [5]]  # (4 -> 4) seen; (3 -> 5) seen
        assert h.ngrams[0] == {(1,): {2}, (2,): {4}, (4,): {4}}
    # beam reordering copies rows, and the copies are independent
    s = h.select([1, 1, 0])
    assert s.seqs == [[3, 5, 3], [3, 5, 3], [1, 2, 4, 4]]
    s.append([7, 8, 9])
    assert h.seqs == [[1, 2, 4, 4], [3, 5, 3]]
    if params.no_repeat_ngram_size:
        assert s.banned() == [[], [], []] and h.banned() == [[4], [5]]
        assert s.ngrams[0] == {(3,): {5, 7}, (5,): {3}} and h.ngrams[1] == {(3,): {5}, (5,): {3}}
    if s.seen is not None:
        assert s.seen[2].nonzero().flatten().tolist() == [1, 2, 4, 9]
        assert h.seen[0].nonzero().flatten().tolist() == [1, 2, 4]
    if s.counts is not None:
        assert s.counts[0, 7] == 1 and s.counts[1, 8] == 1 and h.counts[:, 7:].sum() == 0


def test_no_history_is_built_without_a_setting_that_needs_it() -> None:
    h = History([[1, 2]], GenerationParams(), V, torch.device("cpu"))
    h.append([3])
    assert h.seqs == [[1, 2, 3]] and h.seen is None and h.counts is None and h.ngrams is None


def test_speculative_acceptance_draws_only_from_its_generator() -> None:
    p = torch.tensor([0.2, 0.3, 0.5])
    q = torch.tensor([0.6, 0.2, 0.2])

    def draws(global_seed: int) -> list[int | None]:
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(7)
        return [accept_or_resample(p, q, 0, gen) for _ in range(40)]

    a = draws(0)
    assert a == draws(1)
    assert None in a and {1, 2} & set(a)  # accepted w.p. 1/3; else resampled from the residual
    assert 0 not in a  # the residual max(0, p - q) has no mass on token 0


def test_a_score_head_or_bidirectional_model_cannot_generate() -> None:
    torch.manual_seed(0)
    reward = GPT(preset("tiny", vocab_size=V, max_seq_len=16, head="score")).eval()
    with pytest.raises(ValueError, match="reward model"):
        generate(reward, [[1, 2]], GenerationParams(max_new_tokens=2))
    mlm = GPT(preset("tiny", vocab_size=V, max_seq_len=16, causal=False)).eval()
    with pytest.raises(ValueError, match="masked-LM"):
        generate(mlm, [[1, 2]], GenerationParams(max_new_tokens=2))


def test_find_string_searches_from_the_start_by_default() -> None:
    stops = Stops(8, strings=("ab", "c"), decode=lambda ids: "")
    assert stops.find_string("abc") == 0
    assert stops.find_string("xabc", 2) == 3
    assert stops.find_string("xyz") == -1


def test_decode_layout_relays_the_weights_and_changes_no_token() -> None:
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=V, max_seq_len=16)).eval()
    params = GenerationParams(max_new_tokens=4)
    plain = generate(m, [[1, 2, 3]], params)
    assert m.blocks[0].attn.q_proj.weight.is_contiguous()
    laid = generate(m, [[1, 2, 3]], params, decode_layout=True)
    assert not m.blocks[0].attn.q_proj.weight.is_contiguous()  # [in, out] in memory for GEMV
    assert [c.tokens for c in laid[0]] == [c.tokens for c in plain[0]]
