"""`llmctl distill`: teach a smaller student from a teacher; writes a `checkpoint`.

Four kinds, one training loop (`train/loop.py`), the teacher never trained:
- `logit` (DATA: a tokens artifact made with the teacher's tokenizer): the student matches the
  teacher's temperature-softened next-token distributions (forward KL, reverse KL or GKD's
  generalized JSD by `beta`, optional top-k), mixed with the data's cross-entropy by `alpha`.
- `feature`: the logit objective plus, per layer pair, MSE or cosine distance between the
  student's hidden states (through a learned projection when widths differ, dropped at save)
  and the teacher's (`train/distill.py`).
- `sequence` (DATA: JSONL prompts, `{"prompt"}` or `{"messages"}` a line): the teacher
  checkpoint answers through `train.rollout.complete` (the `gen.*` sampling settings; new
  tokens capped by what its context leaves); the student is then tuned on the answers with the
  SFT objective of `finetune` (assistant tokens only).
- `api`: as `sequence`, the answers from an OpenAI-compatible endpoint (`--teacher
  http(s)://.../v1`, `api.*` settings, key from OPENAI_API_KEY, never stored or logged).
  For `sequence` and `api`, `--teacher` may also be a JSONL of `{"prompt", "response"}`.

The student is `--student CHECKPOINT` or a fresh `--student-preset NAME` (e.g. `mini`, about a
quarter of `small`) with the teacher's tokenizer (for `api`: `--tokenizer`). Answers are kept
in the output as `responses.jsonl` and cached in the in-progress directory as they arrive, so a
rerun after a kill asks for none twice; training resumes exactly (the teacher's digest is part
of the run's fingerprint). Prompts without an answer are counted and kept in
`rejected/errors.jsonl`.

Example:
    llmctl distill out/tokens --teacher out/model --student-preset mini --kind logit --out out/d
    llmctl distill prompts.jsonl --teacher https://api.openai.com/v1 --kind api \\
        --tokenizer out/tokens --student-preset mini --set api.model=gpt-4o-mini --out out/d
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.artifacts import is_artifact, open_artifact, partial_dir, sha256_file
from llmctl.config import helpful, nested, to_dict
from llmctl.data.answers import ApiSettings
from llmctl.data.chats import ChatDataConfig
from llmctl.errors import UsageError
from llmctl.model.io import load_model
from llmctl.model.sample import GenerationParams
from llmctl.runtime import info, seed_everything, summary, warn
from llmctl.tokenizer import tokenizer_sha256
from llmctl.train.settings import COSMETIC, TrainSettings

KINDS = ("logit", "feature", "sequence", "api")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class FeatureSettings:
    """How hidden states are matched (kind = feature)."""

    loss: Literal["mse", "cosine"] = helpful(
        "cosine", "distance between hidden states: cosine (scale-free) or mse (raw residuals)"
    )
    weight: float = helpful(1.0, "weight of the summed feature distances beside the logit term")
    layers: list[int] = helpful(
        [],
        "teacher layer (0-based) for each student layer, -1 to skip one; empty = evenly "
        "spaced: round((i + 1) * L_t / L_s) - 1, so last meets last",
    )


@dataclass(frozen=True)
class DistillConfig(TrainSettings, ChatDataConfig):
    """Settings of `llmctl distill`: the shared training keys plus the distillation ones."""

    kind: Literal["logit", "feature", "sequence", "api"] = helpful(
        "logit", "logit | feature (token data) or sequence | api (prompts answered by the teacher)"
    )
    student_preset: str = helpful("", "a fresh student of this preset (e.g. mini), else --student")
    model: dict[str, Any] = helpful(
        {}, "overrides of the student preset's fields (model.n_layer=2)"
    )
    temperature: float = helpful(1.0, "softmax temperature of both distributions (loss × T²)")
    alpha: float = helpful(0.5, "weight of the distillation term; 1 - alpha: the data's CE")
    beta: float = helpful(
        0.0, "0: forward KL(teacher‖student); 1: reverse KL; between: generalized JSD (GKD)"
    )
    top_k: int = helpful(0, "keep the teacher's k most likely tokens, the rest as one (0: all)")
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = helpful(
        "auto", "the teacher's weights: auto = bfloat16 on CUDA, float32 on CPU"
    )
    feature: FeatureSettings = nested(FeatureSettings, "feature distillation")
    gen: GenerationParams = nested(GenerationParams, "how a teacher checkpoint answers (sequence)")
    chat: bool = helpful(False, "sequence: render plain prompts with the teacher's chat template")
    gen_batch: int = helpful(8, "sequence: prompts the teacher answers together")
    api: ApiSettings = nested(ApiSettings, "how the API teacher is asked (kind = api)")

    def __post_init__(self) -> None:
        TrainSettings.__post_init__(self)
        ChatDataConfig.__post_init__(self)
        if self.gen_batch < 1:
            raise UsageError(f"config key 'gen_batch': must be >= 1, got {self.gen_batch}")


@dataclass
class Student:
    """The model to train, where it came from, and its tokenizer files."""

    model: Any
    source: str  # the checkpoint's digest, or "preset:NAME"
    path: Path | None
    tokenizer_dir: Path


def run(
    data: list[Path],
    out: Path,
    cfg: DistillConfig,
    *,
    teacher: str,
    student: Path | None = None,
    tokenizer: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Distill `teacher` into the student on `data`; publish a checkpoint at `out`."""
    if (student is None) == (not cfg.student_preset):
        raise UsageError("give one of --student CHECKPOINT or --student-preset NAME")
    if cfg.kind in ("logit", "feature"):
        if teacher.startswith(("http://", "https://")):
            raise UsageError(f"--kind {cfg.kind}: the teacher must be a checkpoint (an API "
                             "returns no logits or hidden states); use --kind api")  # fmt: skip
        return _run_logits(data, out, cfg, teacher=Path(teacher), student=student, force=force)
    return _run_responses(data, out, cfg, teacher, student, tokenizer, force)


# --- students and teachers -------------------------------------------------------------------


def _build_student(
    cfg: DistillConfig, student: Path | None, tokenizer_dir: Path, vocab_size: int
) -> Student:
    """The student on the CPU in fp32: a checkpoint, or a fresh preset model made right after
    seeding with `cfg.seed` (as `pretrain` makes it: the same initialization)."""
    from llmctl.model.io import build_model, model_config

    if student is not None:
        if cfg.model:
            raise UsageError("config key 'model': overrides apply to --student-preset only")
        m = open_artifact(student, "checkpoint")
        return Student(load_model(student).float().train(), m.digest, student, student)
    try:
        mcfg = model_config(cfg.student_preset, dict(cfg.model), vocab_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seed_everything(cfg.seed)
    return Student(build_model(mcfg), f"preset:{cfg.student_preset}", None, tokenizer_dir)


def _teacher_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype:
    if cfg.teacher_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.teacher_dtype)


def _save(tokenizer_dir: Path, base_dtype: torch.dtype | None = None) -> Any:
    from llmctl.model.io import save_checkpoint

    files = {n: tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()}

    def save(dir: Path, final: torch.nn.Module) -> None:
        save_checkpoint(dir, final if base_dtype is None else final.to(base_dtype), files)

    return save


# --- logit and feature -----------------------------------------------------------------------


def _run_logits(
    data: list[Path], out: Path, cfg: DistillConfig, *, teacher: Path, student: Path | None,
    force: bool,
) -> dict[str, Any]:  # fmt: skip
    from llmctl.model.io import build_model
    from llmctl.tokenizer import load_specials
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches, token_streams
    from llmctl.train.distill import FeatureDistill, LogitDistill, layer_map
    from llmctl.train.run import train_and_publish

    if len(data) != 1 or not is_artifact(data[0]):
        raise UsageError(
            f"--kind {cfg.kind}: DATA is one tokens artifact made with the teacher's tokenizer "
            f"(documents: `llmctl tokenize DOCS --tokenizer {teacher}` first)"
        )
    tokens = open_artifact(data[0], "tokens")
    specials = load_specials(tokens.path)  # parses the data's tokenizer files (named if bad)
    t_ckpt = open_artifact(teacher, "checkpoint")
    t_sha = tokenizer_sha256(teacher)
    if student is not None:
        open_artifact(student, "checkpoint")
        s_sha = tokenizer_sha256(student)
        if s_sha != t_sha:
            raise UsageError(
                f"tokenizer mismatch: teacher {teacher} (tokenizer.json {t_sha[:12]}) and "
                f"student {student} ({s_sha[:12]}); {cfg.kind} distillation needs one tokenizer"
            )
    if tokenizer_sha256(tokens.path) != t_sha:
        raise UsageError(
            f"tokenizer mismatch: DATA {tokens.path} was tokenized with a different "
            f"tokenizer.json than teacher {teacher}"
        )
    world = distributed.init(cfg.device)
    t_model = load_model(teacher)
    vocab = t_model.config.vocab_size
    stud = _build_student(cfg, student, teacher, vocab)
    model = stud.model.to(world.device)
    t_model = t_model.to(world.device, _teacher_dtype(cfg, world.device))
    ctx = min(model.config.max_seq_len, t_model.config.max_seq_len)
    seq_len = cfg.seq_len or ctx
    if seq_len > ctx:
        raise UsageError(f"config key 'seq_len': {seq_len} > the context both models have, {ctx}")

    common = dict(temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta, top_k=cfg.top_k)
    pairs: list[tuple[int, int]] = []
    if cfg.kind == "feature":
        L_s, L_t = model.config.n_layer, t_model.config.n_layer
        targets = cfg.feature.layers or layer_map(L_s, L_t)
        if len(targets) != L_s:
            raise UsageError(
                f"config key 'feature.layers': {len(targets)} entries for a student of {L_s} layers"
            )
        pairs = [(s, t) for s, t in enumerate(targets) if t >= 0]
        objective: Any = FeatureDistill(t_model, **common, pairs=pairs, loss=cfg.feature.loss,
                                        weight=cfg.feature.weight)  # fmt: skip
        objective.attach(model)
    else:
        objective = LogitDistill(t_model, **common)

    span = seq_len + objective.extra_tokens - 1

    train_stream, val = token_streams(
        tokens.path, batch_size=cfg.batch_size, span=span, seed=cfg.seed,
        eval_batches=cfg.eval_batches, eos_id=specials.eos, vocab_size=vocab,
        reader="the teacher's vocabulary",
    )  # fmt: skip
    batches = StepBatches(
        train_stream.sample, accum=cfg.grad_accum, rank=world.rank, world=world.size
    )
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    fingerprint = {"config": settings, "tokens": tokens.digest, "teacher": t_ckpt.digest,
                   "student": stud.source}  # fmt: skip

    def rebuild() -> torch.nn.Module:  # FSDP gather: the student with its aux projection
        copy = build_model(model.config)
        if pairs:
            objective.attach(copy)
        return copy

    t_params = t_model.num_params(non_embedding=False)
    s_params = model.num_params(non_embedding=False)
    if world.main:
        info(f"distill ({cfg.kind}): teacher {teacher} ({t_params / 1e6:.2f}M) → student "
             f"{stud.path or cfg.student_preset} ({s_params / 1e6:.2f}M), {cfg.steps:,} steps"
             + (f", layer pairs {pairs}" if pairs else ""))  # fmt: skip
    stats = train_and_publish(
        out, world=world, model=model, batches=batches, objective=objective, cfg=cfg,
        fingerprint=fingerprint, command="distill", config=to_dict(cfg),
        inputs=_inputs(data, teacher, stud), save=_save(stud.tokenizer_dir),
        stats=lambda result: {
            "kind": cfg.kind,
            "teacher_params": t_params,
            "params": s_params,
            "param_ratio": round(s_params / t_params, 4),
            "seq_len": seq_len,
            "layer_pairs": [list(p) for p in pairs],
            "val_ce": result.val_metrics.get("val_ce"),
        },
        val=val, flops_per_token=model.flops_per_token(seq_len), rebuild=rebuild, force=force,
    )  # fmt: skip
    if world.main:
        _summary(out, stats)
    return stats


def _inputs(data: list[Path], teacher: Path | str, stud: Student) -> dict[str, Path]:
    named: dict[str, Path] = {f"input-{i}": p for i, p in enumerate(data)}
    if isinstance(teacher, Path):  # a checkpoint or an answers file (never a URL: no secrets)
        named["teacher"] = teacher
    if stud.path is not None:
        named["student"] = stud.path
    return named


# --- sequence and api ------------------------------------------------------------------------


def _read_all_prompts(data: list[Path]) -> tuple[list[Any], list[str]]:
    """(prompts, `file:line` of each) from the DATA JSONL files."""
    from llmctl.data.prompts import read_prompt_file

    prompts, where = [], []
    for path in data:
        if is_artifact(path):
            raise UsageError(f'{path}: an artifact; sequence and api read prompts JSONL files '
                             '({"prompt": ...} or {"messages": [...]} a line)')  # fmt: skip
        for w, p in read_prompt_file(path):
            prompts.append(p)
            where.append(w)
    return prompts, where


def _run_responses(
    data: list[Path], out: Path, cfg: DistillConfig, teacher: str, student: Path | None,
    tokenizer: Path | None, force: bool,
) -> dict[str, Any]:  # fmt: skip
    from llmctl.data import answers as ans
    from llmctl.data.chats import prepare_chats
    from llmctl.tokenizer import (
        check_fits,
        load_specials,
        load_tokenizer,
    )
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches
    from llmctl.train.objectives import NextToken
    from llmctl.train.run import train_and_publish

    url = teacher.startswith(("http://", "https://"))
    answers_file = not url and Path(teacher).is_file()
    if cfg.kind == "api" and not (url or answers_file):
        raise UsageError(
            f"--teacher {teacher}: --kind api needs an http(s)://.../v1 URL or a JSONL of "
            '{"prompt", "response"} records'
        )
    if cfg.kind == "sequence" and url:
        raise UsageError("--kind sequence: the teacher is a checkpoint; use --kind api for a URL")
    if not data and not answers_file:
        raise UsageError(f"missing argument: DATA... (prompts JSONL for --kind {cfg.kind})")
    prompts, where = _read_all_prompts(data) if data else ([], [])

    # The student's tokenizer: its checkpoint's, the teacher checkpoint's, or --tokenizer.
    t_ckpt = None
    if student is not None:
        tok_dir = student
    elif tokenizer is not None:
        tok_dir = tokenizer
    elif not url and not answers_file:
        tok_dir = Path(teacher)
    else:
        raise UsageError("--student-preset with an API or file teacher needs --tokenizer "
                         "TOKENS_OR_CHECKPOINT (the student's vocabulary)")  # fmt: skip
    if not url and not answers_file:
        t_ckpt = open_artifact(teacher, "checkpoint")
    if is_artifact(tok_dir):
        open_artifact(tok_dir, ("tokens", "checkpoint"))
    tok = load_tokenizer(tok_dir)
    specials = load_specials(tok_dir)
    world = distributed.init(cfg.device)
    partial = partial_dir(out)
    stats_answers: Any

    # 1. The teacher's answers, each cached as it arrives (a rerun asks for none twice).
    if answers_file:
        prompts, got, stats_answers = ans.file_answers(prompts or None, Path(teacher))
        where = where or [f"{teacher}:{i + 1}" for i in range(len(prompts))]
        teacher_id: dict[str, Any] = {"file": sha256_file(Path(teacher))}
    else:
        if world.size > 1:
            raise UsageError(f"--kind {cfg.kind}: gather the answers in one process first "
                             "(then pass them as --teacher FILE.jsonl under torchrun)")  # fmt: skip
        if url:
            teacher_id = {"url": teacher, "api": _answer_keys(cfg.api)}
        else:
            teacher_id = {"checkpoint": t_ckpt.digest, "gen": to_dict(cfg.gen),  # type: ignore[union-attr]
                          "chat": cfg.chat}  # fmt: skip
        cache = ans.AnswerCache(partial / "_state" / "answers.jsonl", teacher_id)
        from llmctl.train.state import latest

        started = latest(partial / "_state") is not None  # training began: answers are final
        from llmctl.runtime import progress

        with progress("teacher", total=len(prompts), unit="it") as bar:
            if url:
                got, stats_answers = ans.api_answers(
                    prompts, cfg.api, teacher, cache, retry_failed=not started,
                    on_answer=lambda: bar.advance(1),
                )  # fmt: skip
            else:
                from llmctl.train.rollout import checkpoint_answers

                t_model = load_model(Path(teacher), world.device, _teacher_dtype(cfg, world.device))
                seed = cfg.gen.seed if cfg.gen.seed is not None else cfg.seed
                got, stats_answers = checkpoint_answers(
                    t_model, Path(teacher), prompts, dataclasses.replace(cfg.gen, seed=seed),
                    cache, chat=cfg.chat, batch_size=cfg.gen_batch,
                    advance=lambda n: bar.advance(n),
                )  # fmt: skip
    ok = [a for a in got if a.error is None]
    if not ok:
        raise UsageError(f"--teacher {teacher}: no prompt got an answer "
                         f"({stats_answers.reasons})")  # fmt: skip
    if stats_answers.failed and world.main:
        warn(f"{stats_answers.failed:,} prompt(s) got no answer (kept in rejected/errors.jsonl): "
             f"{stats_answers.reasons}")  # fmt: skip
    responses = [{"prompt": a.prompt, "response": a.response} for a in ok]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in responses)
    responses_sha = hashlib.sha256(body.encode("utf-8")).hexdigest()

    # 2. The student, tuned on the answers with the SFT objective (assistant tokens only).
    stud = _build_student(cfg, student, tok_dir, tok.get_vocab_size(with_added_tokens=True))
    model = stud.model
    check_fits(tok, model.config.vocab_size, str(tok_dir))
    seq_len = cfg.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise UsageError(f"config key 'seq_len': {seq_len} > the student's max_seq_len")
    # the answers as chats, read as finetune reads its data (tok_dir's template, or llmctl's)
    with tempfile.TemporaryDirectory() as tmp:
        chats = Path(tmp) / "responses.jsonl"
        with open(chats, "w", encoding="utf-8") as f:
            for r in responses:
                reply = {"role": "assistant", "content": r["response"]}
                msgs = [*ans.api_messages(r["prompt"], ""), reply]
                f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
        sets = prepare_chats(tok_dir, [chats], cfg, tok=tok, specials=specials, seq_len=seq_len,
                             batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip
    loaded = sets.data
    n_train, n_val = len(sets.train.examples), len(sets.val.examples) if sets.val else 0
    val = sets.val_batches(cfg.eval_batches)
    model = model.to(world.device)
    batches = StepBatches(sets.train.sample, accum=cfg.grad_accum, rank=world.rank,
                          world=world.size)  # fmt: skip
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    settings["api"] = _answer_keys(cfg.api)  # timeouts, retries, concurrency may change on resume
    fingerprint = {"config": settings, "teacher": teacher_id, "student": stud.source,
                   "responses": responses_sha}  # fmt: skip
    if world.main:
        info(f"distill ({cfg.kind}): {len(ok):,} answers ({stats_answers.cached:,} cached) "
             f"→ {n_train:,} train / {n_val:,} val examples, "
             f"{cfg.steps:,} steps")  # fmt: skip

    failed = [(where[a.index] if a.index < len(where) else str(a.index), a) for a in got
              if a.error is not None]  # fmt: skip

    def save(dir: Path, final: torch.nn.Module) -> None:
        from llmctl.data.docs import BadRecord, ErrorLog

        _save(stud.tokenizer_dir)(dir, final)
        (dir / "responses.jsonl").write_text(body, encoding="utf-8")
        with ErrorLog(dir / "rejected" / "errors.jsonl") as log:
            for w, a in failed:
                file, _, line = w.rpartition(":")
                reason, _, why = (a.error or "").partition(": ")
                log.add(BadRecord(file, int(line) if line.isdigit() else 0, reason, why[:300]))
            for bad in loaded.rejected:  # read from a temporary copy: name the published file
                log.add(dataclasses.replace(bad, file="responses.jsonl"))

    stats = train_and_publish(
        out, world=world, model=model, batches=batches, objective=NextToken(), cfg=cfg,
        fingerprint=fingerprint, command="distill", config=to_dict(cfg),
        inputs=_inputs(data, Path(teacher) if not url else teacher, stud), save=save,
        stats=lambda result: {
            "kind": cfg.kind,
            "params": model.num_params(non_embedding=False),
            "seq_len": seq_len,
            "answers": dataclasses.asdict(stats_answers),
            "examples_train": n_train,
            "examples_val": n_val,
            "rejected": loaded.stats.get("rejected", {}),  # answers unusable as examples
        },
        val=val, flops_per_token=model.flops_per_token(seq_len), force=force,
    )  # fmt: skip
    if world.main:
        _summary(out, stats)
    return stats


def _answer_keys(api: Any) -> dict[str, Any]:
    """The API settings that decide the answers (not how patiently they are asked for)."""
    return {k: getattr(api, k) for k in ("model", "max_tokens", "temperature", "system")}


def _summary(out: Path, s: dict[str, Any]) -> None:
    def f(x: float | None, fmt: str = ".4f") -> str:
        return "-" if x is None else format(x, fmt)

    rows: list[tuple[str, Any]] = [("kind", s["kind"])]
    if "teacher_params" in s:
        ratio = f"{s['params'] / 1e6:.2f}M student / {s['teacher_params'] / 1e6:.2f}M teacher"
        rows.append(("params", f"{ratio} ({s['param_ratio']:.1%})"))
    if "answers" in s:
        a = s["answers"]
        rows.append(("answers", f"{a['prompts'] - a['failed']:,} of {a['prompts']:,} prompts "
                                f"({a['cached']:,} cached, {a['failed']:,} failed, "
                                f"{a['retries']:,} retries)"))  # fmt: skip
        if s.get("rejected"):
            why = ", ".join(f"{k} {v}" for k, v in s["rejected"].items())
            rows.append(("answers rejected", f"{why} (rejected/errors.jsonl)"))
    rows += [
        ("steps", f"{s['steps']:,}" + (f" from {s['start_step']:,}" if s["start_step"] else "")),
        ("train loss", f(s["train_loss"])),
        ("val loss", f(s["val_loss"])),
    ]
    if s.get("val_ce") is not None:
        rows.append(("val cross-entropy", f(s["val_ce"])))
    for k in ("kl", "ce", "feature"):
        if k in s.get("metrics", {}):
            rows.append((f"train {k}", f(s["metrics"][k])))
    rows.append(("checkpoint", str(out)))
    summary(f"distill → {out}", rows)
