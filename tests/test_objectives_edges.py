"""The objectives' edges: packed rows reach the model (position and segment ids), the loss
mask, masked-LM settings at their limits, and the model checks through wrappers (DDP's
`.module`, torch.compile's `._orig_mod`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmctl.errors import UsageError
from llmctl.model.gpt import GPT, IGNORE, preset
from llmctl.train.objectives import EmptyLossMask, MaskedLM, NextToken

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=VOCAB, max_seq_len=32, **kw))


def test_packed_rows_pass_position_and_segment_ids_to_the_model() -> None:
    """Two documents packed in one row: the loss equals the model's own with those ids, and
    differs from the unpacked row's (so dropping either key would show)."""
    m = gpt().eval()
    tokens = torch.randint(8, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(7), torch.arange(10)]).repeat(2, 1)
    seg = torch.cat([torch.zeros(7), torch.ones(10)]).long().repeat(2, 1)
    out = NextToken()(m, {"tokens": tokens, "position_ids": pos, "segment_ids": seg}, None)
    want = m(tokens[:, :-1], labels=tokens[:, 1:], position_ids=pos[:, :-1],
             segment_ids=seg[:, :-1])  # fmt: skip
    assert torch.equal(out.total, want[0]) and torch.equal(out.count, want[1])
    assert out.tokens == 2 * 16
    only_pos = NextToken()(m, {"tokens": tokens, "position_ids": pos}, None)
    only_seg = NextToken()(m, {"tokens": tokens, "segment_ids": seg}, None)
    plain = NextToken()(m, {"tokens": tokens}, None)
    totals = {float(x.total.detach()) for x in (out, only_pos, only_seg, plain)}
    assert len(totals) == 4


def test_loss_mask_selects_the_targets_and_an_empty_mask_is_refused() -> None:
    m = gpt().eval()
    tokens = torch.randint(8, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(tokens)
    mask[:, 5:] = 1
    mask[:, 0] = 1  # position 0 is never a target, whatever the mask says
    out = NextToken()(m, {"tokens": tokens, "loss_mask": mask}, None)
    labels = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    want = m(tokens[:, :-1], labels=labels)
    assert torch.equal(out.total, want[0]) and int(out.count) == 2 * 4
    with pytest.raises(EmptyLossMask, match="all zero"):
        NextToken()(m, {"tokens": tokens, "loss_mask": torch.zeros_like(tokens)}, None)
    mask[:, 1:] = 0  # only position 0 set: still no target
    with pytest.raises(EmptyLossMask):
        NextToken()(m, {"tokens": tokens, "loss_mask": mask}, None)


@pytest.mark.parametrize("prob", [0.0, 1.0, -0.1, 1.5])
def test_masked_lm_probability_must_be_strictly_between_0_and_1(prob: float) -> None:
    with pytest.raises(UsageError, match="mask probability"):
        MaskedLM(mask_id=3, vocab_size=VOCAB, special_ids=range(8), prob=prob)
    MaskedLM(mask_id=3, vocab_size=VOCAB, special_ids=range(8), prob=0.01)
    MaskedLM(mask_id=3, vocab_size=VOCAB, special_ids=range(8), prob=0.99)


def test_masked_lm_needs_an_ordinary_token_and_counts_the_mask_id_as_special() -> None:
    with pytest.raises(UsageError, match="no non-special tokens"):
        MaskedLM(mask_id=3, vocab_size=8, special_ids=range(8))
    with pytest.raises(UsageError, match="no non-special tokens"):
        MaskedLM(mask_id=7, vocab_size=8, special_ids=range(7))  # the mask id is special too
    one = MaskedLM(mask_id=7, vocab_size=9, special_ids=range(7))
    assert one.ordinary.tolist() == [8] and one.special.tolist() == list(range(8))
    # special ids past the vocabulary are allowed (never drawn)
    assert MaskedLM(mask_id=3, vocab_size=9, special_ids=[0, 99]).ordinary.tolist() == [
        1, 2, 4, 5, 6, 7, 8
    ]  # fmt: skip


def test_masked_lm_loss_is_the_models_on_the_masked_inputs() -> None:
    m = gpt(causal=False).eval()
    mlm = MaskedLM(mask_id=3, vocab_size=VOCAB, special_ids=range(8), prob=0.5)
    tokens = torch.randint(8, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    out = mlm(m, {"tokens": tokens}, torch.Generator().manual_seed(4))
    inputs, labels = mlm.mask(tokens, torch.Generator().manual_seed(4))
    want = m(inputs, labels=labels)
    assert torch.equal(out.total, want[0]) and torch.equal(out.count, want[1])
    assert out.tokens == 32 and int(out.count) == int((labels != IGNORE).sum()) > 0


class Wrapped(nn.Module):
    """What DDP looks like to an objective: the model as `.module`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def test_checks_see_through_ddp_and_compile_wrappers() -> None:
    bidirectional, causal = gpt(causal=False), gpt()
    with pytest.raises(UsageError, match="causal=false"):
        NextToken().check(Wrapped(bidirectional))
    mlm = MaskedLM(mask_id=3, vocab_size=VOCAB, special_ids=range(8))
    with pytest.raises(UsageError, match="bidirectional"):
        mlm.check(Wrapped(causal))
    compiled = nn.Module()
    compiled._orig_mod = Wrapped(causal)  # torch.compile around DDP
    with pytest.raises(UsageError, match="bidirectional"):
        mlm.check(compiled)
    NextToken().check(compiled)
    mlm.check(Wrapped(bidirectional))
    NextToken().check(nn.Linear(2, 2))  # no config: nothing to check
    plain = nn.Linear(2, 2)
    plain.config = SimpleNamespace(vocab_size=2)  # a config without `causal`: a causal model
    NextToken().check(plain)
    with pytest.raises(UsageError, match="bidirectional"):
        mlm.check(Wrapped(causal))


def test_the_refusals_say_exactly_what_to_change() -> None:
    with pytest.raises(UsageError) as e:
        MaskedLM(mask_id=3, vocab_size=8, special_ids=range(8))
    assert str(e.value) == "masked LM: the vocabulary has no non-special tokens"
    with pytest.raises(UsageError) as e:
        MaskedLM(mask_id=3, vocab_size=VOCAB, special_ids=range(8)).check(gpt())
    assert str(e.value) == (
        "masked-LM training needs a bidirectional model, but this one is causal: "
        "set model.causal=false (or use objective=causal)"
    )
    with pytest.raises(UsageError) as e:
        NextToken().check(gpt(causal=False))
    assert str(e.value) == (
        "next-token training needs a causal model; this one has causal=false "
        "(use objective=mlm, or model.causal=true)"
    )
