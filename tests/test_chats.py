"""data/chats.py: shapes, exact assistant masks, truncation, packed rows vs one by one, the
all-zero mask error and malformed input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from llmctl.data.chats import (
    ChatDataConfig,
    ChatRows,
    Example,
    TemplateError,
    encode_chat,
    load_chats,
    split_examples,
    truncate,
)
from llmctl.errors import UsageError
from llmctl.model.gpt import GPT, preset
from llmctl.tokenizer import (
    END,
    END_ID,
    PAD_ID,
    decode,
    encode,
    render_chat,
    train_tokenizer,
)
from llmctl.train.batches import as_tensors
from llmctl.train.objectives import EmptyLossMask, NextToken

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
OPTS = ChatDataConfig()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = DATA.read_text(encoding="utf-8")[:100_000]
    return train_tokenizer(text.split("\n\n"), vocab_size=400)


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def targets(ex: Example) -> list[int]:
    return ex.ids[ex.mask == 1].tolist()


MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a sonnet?"},
    {"role": "assistant", "content": "A poem of fourteen lines, é 😀."},
    {"role": "user", "content": "Who wrote many?"},
    {"role": "assistant", "content": "Shakespeare."},
]


def test_multi_turn_mask_is_exactly_the_assistant_turns_and_their_end_tokens(
    tok: Tokenizer,
) -> None:
    ids, mask, answer_start = encode_chat(tok, MULTI, template=None, end_id=END_ID)
    # the ids are those of encoding the whole rendered text
    assert ids.tolist() == encode(tok, render_chat(MULTI))
    # the masked tokens are each assistant content, encoded alone, then <|end|>
    want = [*encode(tok, MULTI[2]["content"]), END_ID, *encode(tok, MULTI[4]["content"]), END_ID]
    assert ids[mask == 1].tolist() == want
    # and they are two contiguous runs: each right after an <|assistant|> token
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    assert len(runs) == 4
    assert decode(tok, ids[runs[0] - 1 : runs[0]]) == "<|assistant|>"
    assert answer_start == runs[2]
    # loss_on=all: every token
    _, everything, _ = encode_chat(tok, MULTI, template=None, end_id=END_ID, loss_on="all")
    assert everything.all()


@pytest.mark.parametrize(
    ("record", "prompt", "answer", "system"),
    [
        ({"prompt": "Say hi", "response": "Hi."}, "Say hi", "Hi.", None),
        ({"prompt": "Say hi", "completion": "Hi!"}, "Say hi", "Hi!", None),
        ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "Add\n\n2 and 3", "5", None),
        ({"instruction": "Greet", "input": "", "output": "Hello"}, "Greet", "Hello", None),
        ({"instruction": "Greet", "output": "Hey", "system": "Be kind."}, "Greet", "Hey",
         "Be kind."),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
         "Q", "A", None),
    ],
)  # fmt: skip
def test_every_shape_masks_exactly_its_answer(
    tok,
    tmp_path: Path,
    record: dict,
    prompt: str,
    answer: str,
    system: str | None,
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    data = load_chats([path], tok, template=None, end_id=END_ID, ctx=65, opts=OPTS)
    assert len(data.examples) == 2 and not data.rejected
    ex = data.examples[0]
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    assert ex.ids.tolist() == encode(tok, render_chat(msgs))
    assert targets(ex) == [*encode(tok, answer), END_ID]
    assert ex.where == f"{path}:1"


def test_json_arrays_gz_and_folders_are_read_with_their_line_numbers(
    tok: Tokenizer, tmp_path: Path
) -> None:
    items = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(3)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(items, indent=2), encoding="utf-8")
    rows = "\n".join(json.dumps({"prompt": "p", "response": "r"}) for _ in range(2))
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    (tmp_path / "d" / ".hidden.jsonl").write_text("not json\n")
    data = load_chats([tmp_path / "d"], tok, template=None, end_id=END_ID, ctx=65, opts=OPTS)
    assert [e.where.rsplit(":", 1)[1] for e in data.examples] == ["2", "7", "12", "1", "2"]
    shapes = {Path(k).name: v["shape"] for k, v in data.stats["files"].items()}
    assert shapes == {"a.json": "alpaca", "b.jsonl.gz": "prompt_response"}


def test_malformed_records_are_skipped_counted_and_kept(tok: Tokenizer, tmp_path: Path) -> None:
    good = {"prompt": "p", "response": "r"}
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"other": 1},  # before the shape is known: judged once it is
        good,
        "{not json",
        {"prompt": "p"},  # wrong shape for this file
        {"prompt": 3, "response": "r"},
        {"prompt": f"a {END} b", "response": "r"},
        [1, 2],
        good,
    ])  # fmt: skip
    data = load_chats([path], tok, template=None, end_id=END_ID, ctx=65, opts=OPTS)
    assert len(data.examples) == 2
    reasons = [(b.line, b.reason) for b in data.rejected]
    assert sorted(reasons) == [(1, "wrong_shape"), (3, "bad_json"), (4, "wrong_shape"),
                               (5, "bad_field"), (6, "special_token_in_text"),
                               (7, "wrong_shape")]  # fmt: skip
    assert data.stats["rejected"] == {"wrong_shape": 3, "bad_json": 1, "bad_field": 1,
                                      "special_token_in_text": 1}  # fmt: skip
    strict = ChatDataConfig(strict=True)
    with pytest.raises(UsageError, match=r"d\.jsonl:1: wrong_shape"):
        load_chats([path], tok, template=None, end_id=END_ID, ctx=65, opts=strict)


def test_files_without_a_shape_or_a_usable_example_are_one_line_errors(
    tok: Tokenizer, tmp_path: Path
) -> None:
    def load(path: Path, ctx: int = 65) -> None:
        load_chats([path], tok, template=None, end_id=END_ID, ctx=ctx, opts=OPTS)

    with pytest.raises(UsageError, match=r"x\.jsonl: no record has a known shape .* keys: text"):
        load(write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"text": "b"}]))
    with pytest.raises(UsageError, match=r"y\.jsonl: no usable example: all 2 records"):
        load(write_jsonl(tmp_path / "y.jsonl", [{"prompt": 1, "response": "r"}] * 2))
    with pytest.raises(UsageError, match=r"z\.json: no readable record \(bad_json\)"):
        (tmp_path / "z.json").write_text('[{"prompt": "a", "response": "b"')
        load(tmp_path / "z.json")
    with pytest.raises(UsageError, match="unsupported data file"):
        load(write_jsonl(tmp_path / "w.txt", ["hello"]))
    with pytest.raises(UsageError, match="no such file"):
        load(tmp_path / "missing.jsonl")
    # a context of 1 token leaves no target at all
    with pytest.raises(UsageError, match=r"all 1 usable examples truncate to no assistant token"):
        load(write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p", "response": "r"}]), ctx=1)


def test_truncation_cuts_the_prompt_left_then_the_answer() -> None:
    ids = np.arange(100)
    mask = (ids >= 70).astype(np.int64)  # prompt 70 tokens, answer 30
    # the answer (30) is under half the context (40): all of it stays, the prompt loses 50
    out, m, p_cut, a_cut = truncate(ids, mask, 70, 80)
    assert out.tolist() == list(range(20, 100)) and p_cut and not a_cut
    # the answer (30) over half the context (40): 20 answer tokens fit, after 20 prompt ones
    out, m, p_cut, a_cut = truncate(ids, mask, 70, 40)
    assert out.tolist() == list(range(50, 90)) and p_cut and a_cut and m.sum() == 20
    # no prompt to cut: the answer is cut at the context
    out, m, p_cut, a_cut = truncate(ids, np.ones(100, dtype=np.int64), 0, 40)
    assert out.tolist() == list(range(40)) and not p_cut and a_cut
    assert truncate(ids, mask, 70, 100)[2:] == (False, False)


def test_a_template_that_does_not_end_turns_with_the_end_token_is_refused(tok: Tokenizer) -> None:
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError):
        encode_chat(tok, MULTI, template=plain, end_id=END_ID)
    shifty = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}" + (
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(TemplateError, match="prefix"):
        encode_chat(tok, MULTI, template=shifty, end_id=END_ID)


def test_split_is_by_content_and_never_empty() -> None:
    exs = [Example(np.array([i, i + 1]), np.array([0, 1]), str(i)) for i in range(200)]
    train, val = split_examples(exs + exs[:5], 0.1)
    assert 5 < len(val) < 40 and len(train) + len(val) == 205
    val_keys = {tuple(e.ids) for e in val}
    assert not val_keys & {tuple(e.ids) for e in train}  # duplicates never straddle
    assert [len(x) for x in split_examples(exs[:2], 0.0001)] == [1, 1]
    assert split_examples(exs, 0.0)[1] == []


def examples(tok: Tokenizer, n: int) -> list[Example]:
    out = []
    for k in range(n):
        msgs = [{"role": "user", "content": "Hi there " * (k % 3 + 1)},
                {"role": "assistant", "content": "Hello " * (k % 4 + 1)}]  # fmt: skip
        ids, mask, _ = encode_chat(tok, msgs, template=None, end_id=END_ID)
        mask[0] = 0
        out.append(Example(ids, mask, str(k)))
    return out


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi", "relative"])
def test_packed_rows_equal_the_examples_run_one_by_one(tok: Tokenizer, pos: str) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=400, pos=pos)).eval()
    exs = examples(tok, 6)
    rows = ChatRows(exs, row_len=65, batch_size=2, pack=True, seed=3, pad_id=PAD_ID)
    plan = rows.epoch_plan(0)
    assert sorted(j for r in plan for j in r) == list(range(6)) and len(plan) < 6
    batch = as_tensors(rows.sample(0))
    assert batch["tokens"].shape == (2, 65)
    with torch.no_grad():
        logits = model(batch["tokens"][:, :-1], position_ids=batch["position_ids"][:, :-1],
                       segment_ids=batch["segment_ids"][:, :-1])  # fmt: skip
        packed = NextToken()(model, batch, torch.Generator())
        total, count = 0.0, 0
        for b, members in enumerate(plan[:2]):
            at = 0
            for j in members:
                ids = torch.from_numpy(exs[j].ids)[None]
                n = ids.shape[1]
                alone = model(ids)
                upto = min(n, 64 - at)  # the row's last token is only a target
                torch.testing.assert_close(
                    logits[b, at : at + upto], alone[0, :upto], rtol=1e-5, atol=1e-5
                )
                one = NextToken()(model, {"tokens": ids,
                                          "loss_mask": torch.from_numpy(exs[j].mask)[None]},
                                  torch.Generator())  # fmt: skip
                total, count = total + one.total.item(), count + int(one.count)
                at += n
    assert int(packed.count) == count
    assert packed.total.item() == pytest.approx(total, rel=1e-5)


def test_rows_are_a_pure_function_of_the_index_and_padding_hides_nothing(tok: Tokenizer) -> None:
    exs = examples(tok, 9)
    a = ChatRows(exs, row_len=65, batch_size=2, pack=True, seed=1, pad_id=PAD_ID)
    b = ChatRows(exs, row_len=65, batch_size=2, pack=True, seed=1, pad_id=PAD_ID)
    late = a.sample(7)  # epochs planned on demand, in any order
    for k, v in b.sample(7).items():
        assert np.array_equal(v, late[k])
    assert a.epoch_plan(0) != a.epoch_plan(1)  # reshuffled per epoch
    # padded rows: one example each, pad never a target, <|end|> always one
    padded = ChatRows(exs, row_len=65, batch_size=3, pack=False, seed=1, pad_id=END_ID)
    batch = padded.sample(0)
    assert set(batch) == {"tokens", "loss_mask"}
    for row, mask in zip(batch["tokens"], batch["loss_mask"], strict=True):
        n = int(np.flatnonzero(mask)[-1]) + 1
        assert row[n - 1] == END_ID and not mask[n:].any()  # even with pad == end of turn
    assert padded.rows_per_epoch() == 9 and a.rows_in_epochs(2.5) > 2 * a.rows_per_epoch()


def test_an_all_zero_loss_mask_is_an_error_not_a_zero_loss(tok: Tokenizer) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=400))
    tokens = torch.randint(0, 400, (2, 9))
    with pytest.raises(EmptyLossMask, match="all zero"):
        NextToken()(model, {"tokens": tokens, "loss_mask": torch.zeros_like(tokens)}, None)
    # only position 0 set: still no target
    mask = torch.zeros_like(tokens)
    mask[:, 0] = 1
    with pytest.raises(EmptyLossMask):
        NextToken()(model, {"tokens": tokens, "loss_mask": mask}, None)
    ex = Example(np.arange(5), np.zeros(5, dtype=np.int64), "x")
    with pytest.raises(UsageError, match="every loss-mask value is zero"):
        ChatRows([ex], row_len=8, batch_size=1, pack=True, seed=0, pad_id=PAD_ID).sample(0)


SURROGATE_TEXT = st.text(max_size=8) | st.sampled_from(["\ud800", "a\udc80b", "<|end|>", ""])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | SURROGATE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SURROGATE_TEXT, inner, max_size=3),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool"]) | JSON_VALUES,
        "content": SURROGATE_TEXT | JSON_VALUES,
    }
)
CHAT_RECORDS = st.dictionaries(
    st.sampled_from(
        [
            "messages",
            "prompt",
            "response",
            "completion",
            "instruction",
            "input",
            "output",
            "system",
            "\ud800",
        ]
    ),
    JSON_VALUES | st.lists(MESSAGE, max_size=4),
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(CHAT_RECORDS | JSON_VALUES, min_size=1, max_size=4))
def test_loading_never_crashes_and_rejects_are_writable(
    tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory, records: list
) -> None:
    path = tmp_path_factory.mktemp("h") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    try:
        data = load_chats([path], tok, template=None, end_id=END_ID, ctx=65, opts=OPTS)
    except UsageError as e:
        str(e).encode("utf-8", "strict")  # the one error line prints
        return
    for bad in data.rejected:
        (json.dumps(bad.to_record(), ensure_ascii=False) + "\n").encode("utf-8")
    for ex in data.examples:
        assert ex.mask[1:].any() and len(ex.ids) <= 65


SHARE = {"human": "user", "gpt": "assistant"}


@pytest.mark.parametrize(
    ("value", "roles", "want"),
    [
        ([{"role": "user", "content": "Hi"}], None, [{"role": "user", "content": "Hi"}]),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], SHARE,
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
        ("Hi", None, "m must be a list of messages"),
        ([["user", "Hi"]], None, "m[0] is not an object"),
        ([{"role": "bot", "content": "Hi"}], None,
         "m[0].role must be one of system, user, assistant, not 'bot'"),
        ([{"from": ["human"], "value": "Hi"}], SHARE,
         "m[0].from must be one of human, gpt, not ['human']"),  # unhashable: no TypeError
        ([{"role": "user", "content": 3}], None, "m[0].content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], None,
         "m[1]: a system message must come first"),
    ],
)  # fmt: skip
def test_parse_messages_gives_the_messages_or_the_reason(
    value: object, roles: dict[str, str] | None, want: object
) -> None:
    """One parser for chat data (finetune, lora) and preference data (align): the messages,
    or a short reason naming the key and the index."""
    from llmctl.data.chats import parse_messages

    assert parse_messages(value, "m", roles) == want
