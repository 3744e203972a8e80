"""`llmctl distill` end to end on CPU: logit and feature students from a tiny teacher, the
tokenizer check, exact resume after a kill."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact
from llmctl.cli import app
from llmctl.model.io import load_model

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
CPU = ["--batch-size", "4", "--seq-len", "32", "--device", "cpu", "-q"]
# a student of 1 layer, half the teacher's width
SMALL = ["--student-preset", "tiny", "--set", "model.n_layer=1", "--set", "model.d_model=32",
         "--set", "model.n_head=2", "--set", "model.n_kv_head=1",
         "--set", "model.d_ff=64"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    tokens, teacher = root / "tokens", root / "teacher"
    res = runner.invoke(app, ["tokenize", str(DATA), "--out", str(tokens), "--vocab-size", "512",
                              "--val-fraction", "0.1", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["pretrain", str(tokens), "--out", str(teacher), "--preset", "tiny",
                              "--steps", "30", "--set", "warmup=3", *CPU])  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"tokens": tokens, "teacher": teacher, "root": root}


def distill(built: dict[str, Path], out: Path, *args: str) -> object:
    cmd = ["distill", str(built["tokens"]), "--teacher", str(built["teacher"]), "--out", str(out)]
    return runner.invoke(app, [*cmd, *CPU, *args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timings (which differ run to run)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]


def test_logit_distillation_writes_a_student_checkpoint(built: dict, tmp_path: Path) -> None:
    out = tmp_path / "logit"
    res = distill(built, out, "--kind", "logit", *SMALL, "--steps", "12", "--set", "warmup=2",
                  "--set", "eval_every=6", "--set", "log_every=3",
                  "--set", "temperature=2.0")  # fmt: skip
    assert res.exit_code == 0, res.output
    m = open_artifact(out, "checkpoint")
    s = m.stats
    student = load_model(out)
    teacher = load_model(built["teacher"])
    assert student.config.n_layer == 1 and student.config.vocab_size == teacher.config.vocab_size
    assert s["params"] == student.num_params(non_embedding=False)
    assert s["param_ratio"] == round(s["params"] / teacher.num_params(non_embedding=False), 4)
    assert s["kind"] == "logit" and s["steps"] == 12 and s["val_ce"] > 0
    train = [r for r in rows(out) if "loss" in r]
    assert len(train) == 4 and all(r["kl"] > 0 and r["ce"] > 0 for r in train)
    # loss = alpha · T² · kl + (1 - alpha) · ce, per window
    for r in train:
        assert r["loss"] == pytest.approx(0.5 * 4 * r["kl"] + 0.5 * r["ce"], rel=1e-6)
    val = [r for r in rows(out) if "val_loss" in r]
    assert len(val) == 2 and val[-1]["val_kl"] < val[0]["val_kl"]
    assert sha(out / "tokenizer.json") == sha(built["teacher"] / "tokenizer.json")
    assert set(m.data["inputs"]) == {"input-0", "teacher"}


def test_feature_distillation_projects_and_saves_without_it(built: dict, tmp_path: Path) -> None:
    out = tmp_path / "feature"
    res = distill(built, out, "--kind", "feature", *SMALL, "--steps", "6", "--set", "warmup=1",
                  "--set", "feature.loss=cosine", "--set", "log_every=3")  # fmt: skip
    assert res.exit_code == 0, res.output
    s = open_artifact(out, "checkpoint").stats
    assert s["layer_pairs"] == [[0, 1]]  # 1 student layer meets the teacher's last of 2
    assert all(r["feature"] > 0 for r in rows(out) if "loss" in r)
    # the projection (32 → 64) trained with the student, and is not in the checkpoint
    assert len(load_model(out).aux) == 0
    res = distill(built, tmp_path / "bad", "--kind", "feature", *SMALL, "--set",
                  "feature.layers=[0, 1]")  # fmt: skip
    assert res.exit_code == 2 and "feature.layers" in res.output


def test_tokenizer_mismatch_is_one_line_naming_both(built: dict, tmp_path: Path) -> None:
    other_tok, other = tmp_path / "tok300", tmp_path / "other"
    res = runner.invoke(app, ["tokenize", str(DATA), "--out", str(other_tok), "--vocab-size",
                              "300", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["pretrain", str(other_tok), "--out", str(other), "--preset", "tiny",
                              "--steps", "1", "--set", "warmup=0", *CPU])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = distill(built, tmp_path / "x", "--student", str(other))
    assert res.exit_code == 2
    line = " ".join(res.output.split())
    assert "tokenizer mismatch" in line and str(built["teacher"]) in line and str(other) in line
    res = runner.invoke(app, ["distill", str(other_tok), "--teacher", str(built["teacher"]),
                              "--out", str(tmp_path / "y"), *SMALL, *CPU])  # fmt: skip
    assert res.exit_code == 2 and "tokenizer mismatch" in res.output
    res = distill(built, tmp_path / "z")
    assert res.exit_code == 2 and "--student CHECKPOINT or --student-preset" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


# Runs `distill.run` in a fresh process and SIGKILLs itself at the N-th objective call.
KILLER = """
import os, signal, sys
from pathlib import Path
from llmctl.commands import distill
from llmctl.config import load_config
from llmctl.train import distill as objectives
tokens, teacher, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = [0]
call = objectives.LogitDistill.__call__
def counted(self, *a, **k):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return call(self, *a, **k)
objectives.LogitDistill.__call__ = counted
cfg = load_config(distill.DistillConfig, None, sys.argv[5:])
distill.run([Path(tokens)], Path(out), cfg, teacher=teacher)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logit", "feature"])
def test_kill_and_resume_is_exact(built: dict, tmp_path: Path, kind: str) -> None:
    sets = [f"kind={kind}", "student_preset=tiny", "model.n_layer=1", "model.d_model=32",
            "model.n_head=2", "model.n_kv_head=1", "model.d_ff=64", "batch_size=4", "seq_len=32",
            "device=cpu", "steps=10", "warmup=2", "save_every=3", "log_every=1", "eval_every=0",
            "grad_accum=2"]  # fmt: skip
    opts = [x for s in sets for x in ("--set", s)]

    def run(out: Path) -> object:
        cmd = ["distill", str(built["tokens"]), "--teacher", str(built["teacher"])]
        return runner.invoke(app, [*cmd, "--out", str(out), "-q", *opts])

    straight = tmp_path / "straight"
    assert run(straight).exit_code == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILLER, str(built["tokens"]), str(built["teacher"]), str(out),
           "15", *sets]  # fmt: skip
    assert subprocess.run(cmd, capture_output=True, env=ENV).returncode == -signal.SIGKILL
    assert (tmp_path / ".killed.partial" / "_state" / "step-00000006").is_dir()
    res = run(out)
    assert res.exit_code == 0, res.output
    assert open_artifact(out, "checkpoint").stats["start_step"] == 6
    assert sha(out / "model.safetensors") == sha(straight / "model.safetensors")
    assert [r for r in rows(out) if "loss" in r] == [r for r in rows(straight) if "loss" in r]


# --- sequence and api ------------------------------------------------------------------------

PROMPTS = ["ROMEO:", "JULIET: O Romeo,", "To be, or not", "My lord,", "KING HENRY:",
           "Good morrow", "What say you", "Alas, poor"]  # fmt: skip
GEN = ["--set", "gen.max_new_tokens=8", "--set", "val_fraction=0.25", "--set", "warmup=1",
       "--set", "log_every=1", "--steps", "4"]  # fmt: skip


def prompts_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def responses(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]


def test_sequence_distillation_trains_on_the_teachers_answers(built: dict, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "seq"
    res = runner.invoke(app, ["distill", str(prompts), "--teacher", str(built["teacher"]),
                              "--kind", "sequence", "--out", str(out), *SMALL, *CPU,
                              *GEN])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = responses(out)
    # the answers are the teacher's greedy completions, as `generate` makes them
    samples = tmp_path / "samples"
    res = runner.invoke(app, ["generate", str(built["teacher"]), "--prompts", str(prompts),
                              "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu",
                              "--out", str(samples), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    want = [json.loads(x) for x in (samples / "samples.jsonl").read_text().splitlines()]
    assert got == [{"prompt": w["prompt"], "response": w["completion"]} for w in want]
    s = open_artifact(out, "checkpoint").stats
    assert s["answers"]["prompts"] == 8 and s["answers"]["failed"] == 0
    assert s["examples_train"] + s["examples_val"] == 8 and s["steps"] == 4
    # the same answers given as a file train the very same student
    again = tmp_path / "from-file"
    res = runner.invoke(app, ["distill", "--teacher", str(out / "responses.jsonl"), "--kind",
                              "sequence", "--tokenizer", str(built["teacher"]), "--out",
                              str(again), *SMALL, *CPU, *GEN])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sha(again / "model.safetensors") == sha(out / "model.safetensors")
    assert responses(again) == got


KEY = "sk-test-do-not-log-0123456789"

# Runs `distill.run` (kind api) in a fresh process; SIGKILLs itself after the N-th cached answer.
API_KILLER = """
import os, signal, sys
from pathlib import Path
from llmctl.commands import distill
from llmctl.config import load_config
from llmctl.data import answers
prompts, url, tok, out, n = sys.argv[1:6]
calls = [0]
add = answers.AnswerCache.add
def counted(self, a):
    add(self, a)
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
answers.AnswerCache.add = counted
cfg = load_config(distill.DistillConfig, None, sys.argv[6:])
distill.run([Path(prompts)], Path(out), cfg, teacher=url, tokenizer=Path(tok))
"""


@pytest.fixture
def api_server() -> object:
    """A chat-completions endpoint: the first call for a 'flaky' prompt gets 503, the first
    for 'slow' answers after the client's timeout, 'broken' always gets 503."""
    import threading
    import time
    from collections import Counter
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: Counter[str] = Counter()
    auth: list[str | None] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            with lock:
                calls[prompt] += 1
                n = calls[prompt]
                auth.append(self.headers.get("Authorization"))
            if prompt == "broken" or (prompt.startswith("flaky") and n == 1):
                return self.reply(503, {"error": {"message": "overloaded"}})
            if prompt == "slow" and n == 1:
                time.sleep(1.0)
            answer = {"role": "assistant", "content": f"Answer to {prompt}, kindly."}
            self.reply(200, {"choices": [{"index": 0, "message": answer}], "model": body["model"]})

        def reply(self, status: int, data: dict) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            # The client may have given up first (the 'slow' call times out): expected; a
            # traceback printed from this thread would land in a later test's captured stderr.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.calls, server.auth = calls, auth  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_api_distillation_retries_caches_resumes_and_never_logs_the_key(
    built: dict, tmp_path: Path, api_server: object
) -> None:
    asked = ["flaky one", "ROMEO:", "slow", "broken", "flaky two", "My lord,", "Good morrow",
             "Alas, poor", "What say you", "To be"]  # fmt: skip
    prompts = prompts_file(tmp_path / "prompts.jsonl", asked)
    url = api_server.url  # type: ignore[attr-defined]
    calls = api_server.calls  # type: ignore[attr-defined]
    sets = ["kind=api", "student_preset=tiny", "model.n_layer=1", "model.d_model=32",
            "model.n_head=2", "model.n_kv_head=1", "model.d_ff=64", "batch_size=4",
            "seq_len=32", "device=cpu", "steps=4", "warmup=1", "log_every=1",
            "val_fraction=0.25", "api.model=teacher-model", "api.timeout=0.3", "api.retries=2",
            "api.backoff=0.01", "api.concurrency=2"]  # fmt: skip
    out = tmp_path / "api"
    env = {**ENV, "OPENAI_API_KEY": KEY}
    cmd = [sys.executable, "-c", API_KILLER, str(prompts), url, str(built["tokens"]), str(out),
           "4", *sets]  # fmt: skip
    killed = subprocess.run(cmd, capture_output=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    cache = tmp_path / ".api.partial" / "_state" / "answers.jsonl"
    cached = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(cached) == 4
    answered = [asked[c["index"]] for c in cached if "response" in c]
    before = dict(calls)

    opts = [x for s in sets for x in ("--set", s)]
    res = runner.invoke(app, ["distill", str(prompts), "--teacher", url, "--tokenizer",
                              str(built["tokens"]), "--out", str(out), *opts],
                        env={"OPENAI_API_KEY": KEY})  # fmt: skip
    assert res.exit_code == 0, res.output
    # nothing answered before the kill was asked again
    assert all(calls[p] == before[p] for p in answered)
    assert calls["flaky one"] == calls["flaky two"] == 2  # one 503, then the answer
    assert calls["slow"] == 2  # one timeout, then the answer
    assert calls["broken"] % 3 == 0  # every attempt (1 + 2 retries) failed, in each run
    got = responses(out)
    assert [r["prompt"] for r in got] == [p for p in asked if p != "broken"]
    assert all(r["response"] == f"Answer to {r['prompt']}, kindly." for r in got)
    (bad,) = [json.loads(x) for x in (out / "rejected" / "errors.jsonl").read_text().splitlines()]
    assert bad["reason"] == "http_503" and bad["line"] == 4
    s = open_artifact(out, "checkpoint").stats
    assert s["answers"]["failed"] == 1 and s["answers"]["cached"] == len(answered)
    assert s["examples_train"] + s["examples_val"] == 9
    # the key went to the server, and nowhere else
    assert f"Bearer {KEY}" in api_server.auth  # type: ignore[attr-defined]
    for f in out.rglob("*"):
        assert not f.is_file() or KEY.encode() not in f.read_bytes(), f
    assert KEY not in res.output and KEY.encode() not in killed.stderr + killed.stdout
    # a second run reuses nothing from a published artifact: it refuses to overwrite
    again = runner.invoke(app, ["distill", str(prompts), "--teacher", url, "--tokenizer",
                                str(built["tokens"]), "--out", str(out), *opts])  # fmt: skip
    assert again.exit_code == 2 and "already exists" in again.output


# Runs `distill.run` (kind sequence) in a fresh process; SIGKILLs itself at the N-th cached
# answer (while the teacher answers) or the N-th training objective call.
SEQ_KILLER = """
import os, signal, sys
from pathlib import Path
from llmctl.commands import distill
from llmctl.config import load_config
from llmctl.data import answers
from llmctl.train import objectives
prompts, teacher, out, where, n = sys.argv[1:6]
calls = [0]
def bump():
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
if where == "answers":
    add = answers.AnswerCache.add
    def counted(self, a):
        add(self, a)
        bump()
    answers.AnswerCache.add = counted
else:
    call = objectives.NextToken.__call__
    def counted(self, *a, **k):
        bump()
        return call(self, *a, **k)
    objectives.NextToken.__call__ = counted
cfg = load_config(distill.DistillConfig, None, sys.argv[6:])
distill.run([Path(prompts)], Path(out), cfg, teacher=teacher)
"""


@pytest.mark.slow
def test_sequence_kill_while_answering_or_training_resumes_exactly(
    built: dict, tmp_path: Path
) -> None:
    prompts = prompts_file(tmp_path / "prompts.jsonl", PROMPTS)
    sets = ["kind=sequence", "student_preset=tiny", "model.n_layer=1", "model.d_model=32",
            "model.n_head=2", "model.n_kv_head=1", "model.d_ff=64", "batch_size=2",
            "seq_len=32", "device=cpu", "steps=6", "warmup=1", "log_every=1", "save_every=2",
            "eval_every=0", "val_fraction=0.25", "gen.max_new_tokens=8", "gen.do_sample=true",
            "gen.top_k=20", "gen_batch=3"]  # fmt: skip
    opts = [x for s in sets for x in ("--set", s)]

    def run(out: Path) -> object:
        cmd = ["distill", str(prompts), "--teacher", str(built["teacher"]), "--out", str(out)]
        return runner.invoke(app, [*cmd, "-q", *opts])

    straight = tmp_path / "straight"
    assert run(straight).exit_code == 0
    for where, n in (("answers", 4), ("train", 3)):
        out = tmp_path / where
        cmd = [sys.executable, "-c", SEQ_KILLER, str(prompts), str(built["teacher"]), str(out),
               where, str(n), *sets]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, env=ENV)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        res = run(out)
        assert res.exit_code == 0, res.output
        s = open_artifact(out, "checkpoint").stats
        # sampled answers are tied to each prompt's index: the cached half and the rest agree
        assert responses(out) == responses(straight)
        assert s["answers"]["cached"] == (4 if where == "answers" else 8)
        assert s["start_step"] == (0 if where == "answers" else 2)
        assert sha(out / "model.safetensors") == sha(straight / "model.safetensors")
        assert [r for r in rows(out) if "loss" in r] == [r for r in rows(straight) if "loss" in r]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(built: dict, tmp_path: Path) -> None:
    tokens, teacher = str(built["tokens"]), str(built["teacher"])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": \n')
    good = prompts_file(tmp_path / "good.jsonl", ["a", "b"])
    no_response = tmp_path / "answers.jsonl"
    no_response.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    cases = [
        ([tokens, "--kind", "logit"], "--teacher"),
        ([tokens, "--teacher", "http://127.0.0.1:9/v1", "--kind", "logit"], "--kind api"),
        ([tokens, "--teacher", str(tmp_path / "nope"), "--kind", "logit"], "no such artifact"),
        ([str(bad_json), "--teacher", teacher, "--kind", "logit"], "one tokens artifact"),
        ([tokens, "--teacher", teacher, "--kind", "sequence"], "prompts JSONL"),
        ([str(bad_json), "--teacher", teacher, "--kind", "sequence"], f"{bad_json}:2"),
        (
            ["--teacher", str(no_response), "--kind", "api", "--tokenizer", tokens],
            f"{no_response}:2",
        ),
        ([str(good), "--teacher", "http://127.0.0.1:9/v1", "--kind", "api"], "--tokenizer"),
        ([str(good), "--teacher", teacher, "--kind", "api"], "http(s)://"),
        ([tokens, "--teacher", teacher, "--kind", "diffuse"], "'kind'"),
        ([tokens, "--teacher", teacher, "--set", "alpha=2"], "alpha"),
    ]
    for i, (args, expect) in enumerate(cases):
        out = tmp_path / f"out{i}"
        extra = [] if "--student" in args else ["--student-preset", "tiny"]
        res = runner.invoke(app, ["distill", *args, "--out", str(out), *extra, *CPU])
        line = " ".join(res.output.split())
        assert res.exit_code == 2 and expect in line, (args, res.output)
        assert res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
        assert not out.exists(), args
