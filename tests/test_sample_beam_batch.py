"""Beam search over a batch equals beam search one prompt at a time, also when one prompt's
beams are all done (an early eos) while the others still run: the finished row must stop
taking candidates."""

from __future__ import annotations

import pytest
import torch

from llmctl.model.gpt import GPT, preset
from llmctl.model.sample import GenerationParams, Stops, generate


def test_a_finished_row_takes_no_more_candidates_while_others_run() -> None:
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=12, max_seq_len=48)).eval()
    with torch.no_grad():  # sharp distributions: the third prompt meets eos (2) at once
        for p in m.parameters():
            p.mul_(20)
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 4]]
    params = GenerationParams(max_new_tokens=8, num_beams=2, num_return_sequences=2)
    stops = Stops(8, eos_ids=frozenset({2}))
    batched = generate(m, prompts, params, stops=stops)
    for prompt, row in zip(prompts, batched, strict=True):
        alone = generate(m, [prompt], params, stops=stops)[0]
        assert [c.tokens for c in row] == [c.tokens for c in alone]
        for c, d in zip(row, alone, strict=True):
            assert c.score == pytest.approx(d.score, abs=1e-3) and c.score <= 0
    assert [c.tokens for c in batched[2]] == [[4, 4, 2], [4, 4, 11, 2]]
