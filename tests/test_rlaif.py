"""RLAIF pairs: k sampled answers per prompt ranked by a judge, best vs worst kept, ties counted;
generation on a short context caps new tokens instead of failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.data.prompts import prompt_of
from llmctl.errors import UsageError
from llmctl.train.rewards import DistinctReward, LengthReward
from llmctl.train.rlaif import PairSettings, make_pairs, pairs_jsonl, rank_pairs

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
runner = CliRunner()


def test_rank_pairs_keeps_best_vs_worst_and_drops_ties() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    answers = [["a", "b", "c", "d"], ["e", "f", "g", "h"], ["same", "same", "x", "y"]]
    pairs, ties = rank_pairs(["p1", "p2", "p3"], answers, scores)
    assert ties == 1
    assert pairs[0] == {"prompt": "p1", "chosen": "b", "rejected": "a", "chosen_score": 3.0,
                        "rejected_score": 1.0}  # fmt: skip
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("same", "y")  # last of the tied worst
    assert rank_pairs(["p"], [["a", "b"]], torch.tensor([[1.0, 1.2]]), min_margin=0.5)[1] == 1


def test_settings_need_two_answers() -> None:
    with pytest.raises(UsageError, match="'k'"):
        PairSettings(k=1)


@pytest.fixture(scope="module")
def base(tiny_lm: Path) -> Path:
    return tiny_lm


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    names = ("ROMEO", "JULIET", "KING", "QUEEN", "HAMLET", "LEAR")
    path.write_text("".join(json.dumps({"prompt": f"{n}: I say"}) + "\n" for n in names))
    return path


@pytest.mark.slow
def test_pairs_from_a_builtin_and_an_lm_judge(base: Path, prompts: Path, tmp_path: Path) -> None:
    cfg = PairSettings(k=4, max_new_tokens=12, seed=3, chat="no")
    pairs, stats = make_pairs(base, [prompts], DistinctReward(), cfg)
    assert stats["prompts"] == 6 and stats["pairs"] + stats["ties"] == 6
    assert stats["pairs"] >= 1
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert p["chosen_score"] > p["rejected_score"] and p["chosen"] != p["rejected"]
    again, _ = make_pairs(base, [prompts], DistinctReward(), cfg)
    assert again == pairs  # the answers depend only on the seed and the prompt's index
    out = tmp_path / "pairs.jsonl"
    out.write_bytes(pairs_jsonl(pairs))
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records == pairs and all(prompt_of(r)[0] for r in records)  # usable as DATA again

    judged, s = make_pairs(base, [prompts], f"judge:{base}", cfg)
    assert s["judge"] == f"judge:{base}" and s["pairs"] == len(judged) >= 1


@pytest.mark.slow
def test_answers_are_capped_on_a_short_context(base: Path, prompts: Path) -> None:
    cfg = PairSettings(k=2, max_new_tokens=100, chat="no")  # more than the whole context (64)
    _, stats = make_pairs(base, [prompts], LengthReward(50), cfg)
    assert stats["capped"] == 6 and stats["pairs"] + stats["ties"] == 6
