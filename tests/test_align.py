"""`llmctl align`: every loss against its closed form (and TRL's formulas written out), the
preference data shapes, bad records counted and kept aside, the reference cache reused on
resume (the reference is not run again) with exact resume, `--lora` training only adapter
tensors, a reward model (score head, pairwise accuracy, `eval RM PAIRS`, `generate` refusing
it). Real tiny checkpoints on CPU."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact
from llmctl.cli import app
from llmctl.data.preferences import PreferenceDataConfig, load_preferences, split_hh
from llmctl.model.gpt import GPT, preset
from llmctl.model.io import load_model, save_checkpoint
from llmctl.tokenizer import CHAT_TEMPLATE, load_specials, load_tokenizer
from llmctl.train import preference as P

TEXT = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
HH = Path(__file__).parents[1] / "recipes" / "data" / "pairs" / "hh_rlhf_harmless_300.jsonl.gz"
FAST = ["--batch-size", "4", "--seq-len", "48", "--device", "cpu", "-q"]
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def llmctl(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("align")
    r = llmctl("tokenize", TEXT, "--out", root / "tok", "--vocab-size", 400, "-q")
    assert r.exit_code == 0, r.output
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=load_tokenizer(root / "tok").get_vocab_size()))
    files = {n: root / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json")}
    with building(root / "base", kind="checkpoint", command="test", config={}) as art:
        save_checkpoint(art.dir, model, files)
    return root / "base"


def easy_pairs(n: int = 48) -> list[dict]:
    """Chosen: the count; rejected: a shouted refusal (easy to tell apart)."""
    return [
        {"prompt": f"Count to {k % 6 + 2}, take {k}.",
         "chosen": " ".join(map(str, range(1, k % 6 + 3))),
         "rejected": "NO! I WILL NOT" + "!" * (k % 5)}
        for k in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in easy_pairs()))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --- closed forms ----------------------------------------------------------------------------

PC, PR = torch.tensor([-12.0, -30.5, -7.25]), torch.tensor([-14.0, -29.0, -9.0])
RC, RR = torch.tensor([-13.0, -30.0, -8.0]), torch.tensor([-13.5, -29.5, -8.5])


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_ipo_simpo_orpo_bt_equal_their_closed_forms() -> None:
    beta, eps = 0.1, 0.2
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        h = float(h)
        # DPO with cDPO smoothing, as TRL's `sigmoid` loss
        want = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
        got = P.dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)[i]
        assert got.item() == pytest.approx(want, rel=1e-6)
        # IPO: TRL `losses = (logits - 1 / (2 * self.beta)) ** 2`
        assert P.ipo_loss(PC, PR, RC, RR, beta=beta)[i].item() == pytest.approx(
            (h - 1 / (2 * beta)) ** 2, rel=1e-6
        )
    # hand-worked: h = (−12 + 13) − (−14 + 13.5) = 1.5; β h = 0.15
    assert P.dpo_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.1)[0].item() == pytest.approx(
        math.log(1 + math.exp(-0.15)), rel=1e-6
    )
    # SimPO on mean log-probs: −logσ(β(c − r) − γ), TRL CPO `simpo`: logits − γ/β, times β
    c, r = torch.tensor([-1.2, -0.4]), torch.tensor([-1.5, -0.2])
    for i in range(2):
        z = 2.0 * (float(c[i]) - float(r[i])) - 0.5
        want = -(1 - eps) * math.log(sig(z)) - eps * math.log(sig(-z))
        got = P.simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=eps)[i].item()
        assert got == pytest.approx(want, rel=1e-6)
    # ORPO: NLL − λ logσ(log odds ratio), odds = p / (1 − p) on mean log-probs (TRL)
    nll = -c
    for i in range(2):
        pc, pr = math.exp(c[i]), math.exp(r[i])
        log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        want = float(nll[i]) - 0.1 * math.log(sig(log_odds))
        assert P.orpo_loss(c, r, nll, lam=0.1)[i].item() == pytest.approx(want, rel=1e-6)
    # Bradley–Terry
    sc, sr = torch.tensor([0.3, -1.0]), torch.tensor([-0.2, 0.5])
    assert P.bt_loss(sc, sr).tolist() == pytest.approx(
        [-math.log(sig(0.5)), -math.log(sig(-1.5))], rel=1e-6
    )


def test_kto_equals_its_closed_form_with_the_reference_point() -> None:
    p, r = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-11.0, -18.0, -5.5])
    label = torch.tensor([1, 0, 1])
    p_kl, r_kl = torch.tensor([-30.0, -25.0, -40.0]), torch.tensor([-31.0, -25.5, -39.0])
    z = P.kto_reference_point(p_kl, r_kl)
    assert z.item() == pytest.approx(max(0.0, ((1.0) + (0.5) + (-1.0)) / 3), rel=1e-6)
    assert P.kto_reference_point(p_kl - 10, r_kl).item() == 0.0  # clamped at 0
    beta, wd, wu = 0.1, 1.0, 1.33
    got = P.kto_loss(p, r, label, z, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    zz = z.item()
    want = [
        wd * (1 - sig(beta * (1.0 - zz))),  # desirable, ratio +1
        wu * (1 - sig(beta * (zz - (-2.0)))),  # undesirable, ratio −2
        wd * (1 - sig(beta * (0.5 - zz))),
    ]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_sequence_logps_sum_the_answer_tokens_only() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, 4:7], mask[1, 2:9] = 1, 1
    logp, n = P.sequence_logps(model, tokens, mask)
    lp = F.log_softmax(model(tokens[:, :-1]).float(), -1)
    for b in range(2):
        want = sum(lp[b, t - 1, tokens[b, t]].item() for t in range(9) if mask[b, t])
        assert logp[b].item() == pytest.approx(want, rel=1e-5)
    assert n.tolist() == [3.0, 7.0]


# --- data shapes -----------------------------------------------------------------------------


def test_hh_transcripts_split_at_the_last_assistant_turn() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: Sure: knock knock."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: No."
    msgs, c, r = split_hh(chosen, rejected)
    assert msgs == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "a joke?"}]  # fmt: skip
    assert (c, r) == ("Sure: knock knock.", "No.")
    with pytest.raises(ValueError, match="do not share"):
        split_hh(chosen, "\n\nHuman: other\n\nAssistant: No.")


def test_every_shape_is_detected_and_rendered_with_the_template(base: Path, tmp_path: Path) -> None:
    tok, sp = load_tokenizer(base), load_specials(base)
    user = [{"role": "user", "content": "Say yes."}]
    forms = {
        "pair_str.jsonl": {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
        "pair_msgs.jsonl": {"prompt": user, "chosen": [{"role": "assistant", "content": "yes"}],
                            "rejected": [{"role": "assistant", "content": "no"}]},
        "hh.jsonl": {"chosen": "\n\nHuman: Say yes.\n\nAssistant: yes",
                     "rejected": "\n\nHuman: Say yes.\n\nAssistant: no"},
        "implicit.jsonl": {"chosen": [*user, {"role": "assistant", "content": "yes"}],
                           "rejected": [*user, {"role": "assistant", "content": "no"}]},
        "sharegpt.json": [{"conversations": [{"from": "human", "value": "Say yes."}],
                           "chosen": {"from": "gpt", "value": "yes"},
                           "rejected": {"from": "gpt", "value": "no"}}],
    }  # fmt: skip
    rows = []
    for name, rec in forms.items():
        path = tmp_path / name
        path.write_text(json.dumps(rec) if name.endswith(".json") else json.dumps(rec) + "\n")
        data = load_preferences([path], tok, template=None, end_id=sp.end_of_turn, ctx=64,
                                opts=PreferenceDataConfig())  # fmt: skip
        (item,) = data.items
        rows.append((item.ids[0].tolist(), item.mask[0].tolist(), item.ids[1].tolist()))
    assert all(r == rows[0] for r in rows)  # one rendering, whatever the shape
    ids, mask, _ = rows[0]
    answer = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(answer, skip_special_tokens=False).replace(" ", "").startswith("yes")
    assert answer[-1] == sp.end_of_turn  # the end-of-turn token is part of the answer
    want = tok.encode(
        __import__("llmctl.tokenizer", fromlist=["render_chat"]).render_chat(
            [*user, {"role": "assistant", "content": "yes"}], template=CHAT_TEMPLATE
        ),
        add_special_tokens=False,
    ).ids
    assert ids == want
    # KTO: both forms; with kto=False a KTO file is a one-line error
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "Say yes.", "completion": "yes", "label": True}) + "\n"
                   + json.dumps({"messages": [*user, {"role": "assistant", "content": "no"}],
                                 "label": False}) + "\n")  # fmt: skip
    data = load_preferences([kto], tok, template=None, end_id=sp.end_of_turn, ctx=64,
                            opts=PreferenceDataConfig(), kto=True)  # fmt: skip
    assert [it.label for it in data.items] == [True, False]
    # item k's KL row: its prompt with item k+1's completion
    assert data.items[0].ids[1].tolist() == data.items[1].ids[0].tolist()
    with pytest.raises(Exception, match="use --method kto"):
        load_preferences([kto], tok, template=None, end_id=sp.end_of_turn, ctx=64,
                         opts=PreferenceDataConfig())  # fmt: skip


def test_bad_pairs_are_counted_kept_aside_or_one_line_errors(
    base: Path, pairs: Path, tmp_path: Path
) -> None:
    data = tmp_path / "mixed.jsonl"
    bad = [
        json.dumps({"prompt": "p", "chosen": "", "rejected": "x"}),
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "p", "chosen": 3, "rejected": "x"}),
        "{not json",
    ]
    data.write_text(pairs.read_text() + "\n".join(bad) + "\n")
    out = tmp_path / "out"
    r = llmctl("align", base, data, "--out", out, "--steps", 1, *FAST)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "rejected" / "errors.jsonl").read_text().splitlines()]
    assert [(x["line"], x["reason"]) for x in rows] == [
        (49, "empty_side"),
        (50, "identical_pair"),
        (51, "bad_field"),
        (52, "bad_json"),
    ]
    s = open_artifact(out, "checkpoint").stats
    assert s["preference"]["rejected"] == 4 and s["preference"]["pairs"] == 48
    assert s["rejected_reasons"] == {"empty_side": 1, "identical_pair": 1, "bad_field": 1,
                                     "bad_json": 1}  # fmt: skip
    # --strict: the first one is exit 2 naming file:line; nothing is written
    r = llmctl("align", base, data, "--out", tmp_path / "s", "--steps", 1, "--strict", *FAST)
    assert r.exit_code == 2 and f"{data}:49: empty_side" in r.output
    assert not (tmp_path / "s").exists() and not (tmp_path / ".s.partial").exists()
    # a file of no known shape: one line naming it and its keys
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    r = llmctl("align", base, odd, "--out", tmp_path / "o", "--steps", 1, *FAST)
    assert r.exit_code == 2 and "no record has a known shape" in r.output
    assert "answer, question" in r.output and not (tmp_path / "o").exists()


# --- training -------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_resumes_exactly_and_never_reruns_the_reference(
    base: Path, pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*FAST, "--steps", 6, "--lr", 1e-3, "--set", "save_every=3", "--set", "log_every=1",
            "--set", "eval_every=3", "--set", "val_fraction=0.2"]  # fmt: skip
    straight = tmp_path / "straight"
    assert llmctl("align", base, pairs, "--out", straight, *args).exit_code == 0
    s = open_artifact(straight, "checkpoint").stats
    assert s["reference"] == "cached (computed once)"

    out = tmp_path / "resumed"
    call = P.PairObjective.__call__
    calls = [0]

    def crashing(self: P.PairObjective, *a: object, **k: object) -> object:
        calls[0] += torch.is_grad_enabled()  # training calls only (evaluations: no grad)
        if calls[0] == 5:  # in step 5: the state of step 3 is saved
            raise RuntimeError("power cut")
        return call(self, *a, **k)

    monkeypatch.setattr(P.PairObjective, "__call__", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        runner.invoke(app, ["align", str(base), str(pairs), "--out", str(out),
                            *map(str, args)], catch_exceptions=False)  # fmt: skip
    monkeypatch.setattr(P.PairObjective, "__call__", call)
    cache = list((tmp_path / ".resumed.partial" / "_state").glob("reference-*.safetensors"))
    assert len(cache) == 1 and load_file(cache[0])["logps"].shape == (48, 2)

    def no_reference(*a: object, **k: object) -> None:
        raise AssertionError("the reference model ran again on resume")

    monkeypatch.setattr(P, "reference_logps", no_reference)
    r = llmctl("align", base, pairs, "--out", out, *args)
    assert r.exit_code == 0, r.output
    s2 = open_artifact(out, "checkpoint").stats
    assert s2["start_step"] == 3 and s2["reference"] == "cached (reused)"
    assert sha(out / "model.safetensors") == sha(straight / "model.safetensors")
    timing = ("tokens_per_s", "wall_s", "mfu")
    assert [{k: v for k, v in x.items() if k not in timing} for x in metrics(out)] == [
        {k: v for k, v in x.items() if k not in timing} for x in metrics(straight)
    ]
    assert not any(p.name == "_state" for p in out.iterdir())  # the cache never ships
    # the figures: accuracy at the base, then after; the manifest's preference block
    pref = s2["preference"]
    assert set(pref) >= {"accuracy", "margin", "chosen_logp", "rejected_logp", "kl",
                         "base_accuracy", "pairs", "cut", "rejected"}  # fmt: skip
    assert metrics(out)[0]["step"] == 0 and metrics(out)[0]["val_kl"] == 0.0
    assert pref["margin"] > 0 and pref["kl"] > 0


@pytest.mark.slow
def test_each_method_trains_from_the_cli(base: Path, pairs: Path, tmp_path: Path) -> None:
    for method in ("ipo", "simpo", "orpo", "kto"):
        out = tmp_path / method
        r = llmctl("align", base, pairs, "--out", out, "--method", method, "--steps", 2,
                   "--lr", 1e-3, *FAST)  # fmt: skip
        assert r.exit_code == 0, (method, r.output)
        s = open_artifact(out, "checkpoint").stats
        assert s["preference"]["method"] == method
        want = "none" if method in ("simpo", "orpo") else "cached (computed once)"
        assert s["reference"] == want, method
        assert math.isfinite(s["train_loss"])


@pytest.mark.slow
def test_lora_trains_only_adapter_tensors(base: Path, pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    r = llmctl("align", base, pairs, "--out", out, "--lora", "--steps", 2, "--lr", 1e-2, *FAST)
    assert r.exit_code == 0, r.output
    m = open_artifact(out, "adapter")
    names = load_file(out / "adapter_model.safetensors")
    assert names and all("lora_A" in k or "lora_B" in k for k in names)
    assert any(float(t.abs().sum()) > 0 for k, t in names.items() if "lora_B" in k)
    total = sum(p.numel() for p in load_model(base).parameters())
    assert 0 < m.stats["params_trainable"] < total / 10
    # the merged adapter changes the base; the base on disk did not change
    merged = tmp_path / "merged"
    assert llmctl("lora", base, "--merge", out, "--out", merged, "-q").exit_code == 0
    assert sha(merged / "model.safetensors") != sha(base / "model.safetensors")


@pytest.mark.slow
def test_reward_model_scores_pairs_and_cannot_generate(
    base: Path, pairs: Path, tmp_path: Path
) -> None:
    rm = tmp_path / "rm"
    r = llmctl("align", base, pairs, "--out", rm, "--method", "reward", "--steps", 20,
               "--lr", 3e-3, "--set", "val_fraction=0.25", *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((rm / "config.json").read_text())
    assert config["head"] == "score"
    assert "lm_head.weight" not in load_file(rm / "model.safetensors")
    s = open_artifact(rm, "checkpoint").stats["preference"]
    assert s["accuracy"] == 1.0  # the easy task, held out
    r = runner.invoke(app, ["eval", str(rm), str(pairs), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    figures = json.loads(r.stdout[r.stdout.index("{") :])
    assert figures["pairs"] == 48 and figures["accuracy"] == 1.0
    # items cut to the model's whole context: a reward model reads seq_len tokens, not + 1
    long = tmp_path / "long.jsonl"
    rec = {"prompt": "word " * 200, "chosen": "yes " * 40, "rejected": "no " * 40}
    long.write_text(json.dumps(rec) + "\n" + pairs.read_text())
    r = llmctl("align", base, long, "--out", tmp_path / "rm64", "--method", "reward",
               "--steps", 1, "--batch-size", 2, "--device", "cpu", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert llmctl("eval", tmp_path / "rm64", long, "--device", "cpu").exit_code == 0
    r = llmctl("generate", rm, "--prompt", "hi", "--max-new-tokens", 2, "--device", "cpu")
    assert r.exit_code == 2 and "reward model" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_in_memory_pairs_and_the_hh_subset(base: Path, tmp_path: Path) -> None:
    from llmctl.commands.align import AlignConfig
    from llmctl.train.preference_run import train_preference

    cfg = AlignConfig(steps=1, batch_size=2, seq_len=48, device="cpu", kl_pairs=2)
    s = train_preference(base, easy_pairs(8), tmp_path / "mem", cfg,
                         extra_files={"pairs.jsonl": b"{}\n"})  # fmt: skip
    assert s["preference"]["pairs"] == 8 and (tmp_path / "mem" / "pairs.jsonl").is_file()
    with gzip.open(HH, "rt") as f:
        head = "".join(next(f) for _ in range(12))
    hh = tmp_path / "hh.jsonl"
    hh.write_text(head)
    out = tmp_path / "hh"
    r = llmctl("align", base, hh, "--out", out, "--steps", 1, "--set", "max_prompt_tokens=24",
               *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    p = open_artifact(out, "checkpoint").stats["preference"]
    assert p["pairs"] + p["rejected"] == 12 and p["cut"] > 0


def test_uncached_reference_gives_the_same_run(base: Path, pairs: Path, tmp_path: Path) -> None:
    """reference_cache=false runs a frozen copy every micro-batch: the same figures as the
    cached run (up to float rounding of differently padded batches)."""
    args = [*FAST, "--steps", 2, "--lr", 1e-3, "--set", "val_fraction=0.2", "--set", "log_every=1"]
    a, b = tmp_path / "cached", tmp_path / "uncached"
    assert llmctl("align", base, pairs, "--out", a, *args).exit_code == 0
    r = llmctl("align", base, pairs, "--out", b, *args, "--set", "reference_cache=false")
    assert r.exit_code == 0, r.output
    sa, sb = (open_artifact(x, "checkpoint").stats for x in (a, b))
    assert sb["reference"] == "every step"
    assert sa["train_loss"] == pytest.approx(sb["train_loss"], abs=1e-5)
    assert sa["preference"]["margin"] == pytest.approx(sb["preference"]["margin"], abs=1e-5)


@pytest.mark.slow
def test_grpo_and_rlaif_run_from_the_align_command(base: Path, pairs: Path, tmp_path: Path) -> None:
    """--method grpo with a reward-model checkpoint, --method rlaif with it as judge: the
    pairs are kept in the artifact and are valid DATA for --method dpo."""
    rm = tmp_path / "rm"
    r = llmctl("align", base, pairs, "--out", rm, "--method", "reward", "--steps", 4, *FAST)
    assert r.exit_code == 0, r.output
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n"
                               for p in easy_pairs(8)))  # fmt: skip
    r = llmctl("align", base, prompts, "--out", tmp_path / "grpo", "--method", "grpo",
               "--reward", rm, "--steps", 2, "--batch-size", 2, "--device", "cpu", "-q",
               "--set", "group_size=2", "--set", "max_new_tokens=4",
               "--set", "eval_prompts=2")  # fmt: skip
    assert r.exit_code == 0, r.output
    m = open_artifact(tmp_path / "grpo", "checkpoint")
    assert m.stats["rl"]["method"] == "grpo" and m.stats["rl"]["steps"] == 2
    assert m.data["config"]["method"] == "grpo" and "input-0" in m.data["inputs"]
    r = llmctl("align", base, prompts, "--out", tmp_path / "rlaif", "--method", "rlaif",
               "--judge", rm, "--steps", 2, "--batch-size", 2, "--device", "cpu", "-q",
               "--set", "rlaif.k=3", "--set", "rlaif.max_new_tokens=4")  # fmt: skip
    assert r.exit_code == 0, r.output
    m = open_artifact(tmp_path / "rlaif", "checkpoint")
    records = [json.loads(x) for x in (tmp_path / "rlaif" / "pairs.jsonl").read_text().splitlines()]
    assert m.stats["rlaif"]["pairs"] == len(records) > 0
    assert m.stats["preference"]["pairs"] == len(records)
    assert all(r["chosen_score"] > r["rejected_score"] for r in records)
    r = llmctl("align", base, tmp_path / "rlaif" / "pairs.jsonl", "--out", tmp_path / "dpo",
               "--method", "dpo", "--steps", 1, *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    # the wrong flag for the method is one line
    r = llmctl("align", base, prompts, "--out", tmp_path / "x", "--method", "grpo",
               "--judge", rm)  # fmt: skip
    assert r.exit_code == 2 and "--reward" in r.output and not (tmp_path / "x").exists()
