"""train/reference.py: the cached reference log-probs (computed once, reused when the key
matches, recomputed and rewritten when the file is damaged or belongs to another run), the
reference as a frozen copy or as the base under LoRA, and a reward model's starting point."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llmctl.data.preferences import Item
from llmctl.model.gpt import GPT, preset
from llmctl.train import preference
from llmctl.train.reference import (
    cached_reference_logps,
    reference_context,
    reference_fn,
    score_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=50)).eval()


def items(n: int = 5) -> list[Item]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        rows = tuple(rng.integers(1, 50, size=8 + k + j).astype(np.int64) for j in (0, 2))
        masks = tuple(np.r_[np.zeros(4, np.int64), np.ones(len(r) - 4, np.int64)] for r in rows)
        out.append(Item(ids=rows, mask=masks, where=f"item {k}"))  # type: ignore[arg-type]
    return out


def cached(
    model: torch.nn.Module, its: list[Item], path: Path, key: str = "k1"
) -> tuple[torch.Tensor, str, float]:
    return cached_reference_logps(model, its, path, key, batch_size=2, precision="float32",
                                  device=CPU, main=True)  # fmt: skip


def test_computed_once_then_reused_without_running_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, its, path = tiny(), items(), tmp_path / "_state" / "reference.safetensors"
    first, state, seconds = cached(model, its, path)
    assert state == "cached (computed once)" and seconds > 0 and path.is_file()
    assert first.shape == (5, 2) and first.dtype == torch.float32 and (first < 0).all()
    direct = preference.reference_logps(model, _rows(its), len(its), device=CPU)
    assert torch.equal(first, direct)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the reference ran again")

    assert seconds < 60  # the time the pass took, not a clock reading
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"key": "k1", "items": "5"}
    monkeypatch.setattr(preference, "reference_logps", boom)
    again, state, seconds = cached(model, its, path)
    assert state == "cached (reused)" and seconds == 0.0 and torch.equal(again, first)


@pytest.mark.parametrize("damage", ["garbage", "other key", "other items"])
def test_a_damaged_or_foreign_cache_is_recomputed_and_rewritten(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model, its, path = tiny(), items(), tmp_path / "reference.safetensors"
    want, _, _ = cached(model, its, path)
    key = "k1"
    if damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "other key":
        key = "k2"
    else:
        cached(model, items(3), path)  # a cache of 3 items under the same key
    got, state, _ = cached(model, its, path, key)
    assert state == "cached (computed once)" and torch.equal(got, want)
    err = capsys.readouterr().err
    assert ("unreadable reference cache" in err) == (damage == "garbage")
    assert ("does not match this run" in err) == (damage != "garbage")
    assert cached(model, its, path, key)[1] == "cached (reused)"


def test_the_frozen_copy_is_the_starting_model_whatever_training_does() -> None:
    model, its = tiny(), items()
    batch = next(iter(_rows(its)))
    tokens, mask = torch.as_tensor(batch["tokens"]), torch.as_tensor(batch["loss_mask"])
    fn = reference_fn(reference_context(model, lora=False))
    before = fn(tokens, mask)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert torch.equal(fn(tokens, mask), before)
    assert not torch.equal(preference.sequence_logps(model, tokens, mask)[0], before)


def test_under_lora_the_reference_is_the_base_with_adapters_off() -> None:
    from llmctl.model.lora import apply_lora

    model, its = tiny(), items()
    batch = next(iter(_rows(its)))
    tokens, mask = torch.as_tensor(batch["tokens"]), torch.as_tensor(batch["loss_mask"])
    base = preference.sequence_logps(model, tokens, mask)[0].detach()
    apply_lora(model, "attn", 4, 8, 0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)  # adapters that change the output
    assert not torch.allclose(preference.sequence_logps(model, tokens, mask)[0], base)
    assert torch.allclose(reference_fn(reference_context(model, lora=True))(tokens, mask), base)
    assert not torch.allclose(preference.sequence_logps(model, tokens, mask)[0], base)


def test_score_model_keeps_the_body_and_drops_the_lm_head() -> None:
    lm = tiny()
    rm = score_model(lm, seed=3)
    assert rm.config.head == "score" and rm.score.weight.shape == (1, lm.config.d_model)
    body = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    assert all(torch.equal(rm.state_dict()[k], v) for k, v in body.items())
    assert torch.equal(score_model(lm, seed=3).score.weight, rm.score.weight)  # seeded


def _rows(its: list[Item]) -> Iterator[dict[str, Any]]:
    from llmctl.data.preferences import PairRows

    return PairRows(its, list(range(len(its))), batch_size=2, seed=0, pad_id=0,
                    shuffle=False).sequential()  # fmt: skip


def test_the_precision_is_the_one_asked_for(tmp_path: Path) -> None:
    """bf16 on the CPU when asked (the cache key holds the precision): not fp32's numbers."""
    model, its = tiny(), items()
    bf16, _, _ = cached_reference_logps(model, its, tmp_path / "a", "k", batch_size=2,
                                        precision="bfloat16", device=CPU, main=True)  # fmt: skip
    fp32, _, _ = cached_reference_logps(model, its, tmp_path / "b", "k", batch_size=2,
                                        precision="float32", device=CPU, main=True)  # fmt: skip
    direct = preference.reference_logps(model, _rows(its), len(its), device=CPU,
                                        precision="bfloat16")  # fmt: skip
    assert torch.equal(bf16, direct) and not torch.equal(bf16, fp32)


def test_a_broken_checkpoint_is_one_line_and_caches_nothing(tmp_path: Path) -> None:
    from llmctl.errors import UsageError

    model, path = tiny(), tmp_path / "reference.safetensors"
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(UsageError, match=r"^reference log-probs are not finite \(the checkpoint"):
        cached(model, items(), path)
    assert not path.exists()


def test_the_frozen_copy_has_no_trainable_parameters() -> None:
    model = tiny()
    with reference_context(model, lora=False)() as ref:
        assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
