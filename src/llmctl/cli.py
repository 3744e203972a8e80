"""The `llmctl` command line: one short function per subcommand.

Each function turns its options into the command's config dataclass (defaults < `--config`
TOML < typed options < `--set key=value`) and calls `llmctl.commands.<verb>.run`. This is the
only module that imports typer. Exit codes: 0 done, 2 bad input or config, 1 an OS error
(disk full, permission denied; one line naming the path) or an internal error.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmctl import __version__
from llmctl.config import describe, load_config
from llmctl.errors import DistributedFailure, UsageError, WorkerDied
from llmctl.files import printable
from llmctl.runtime import console, set_quiet

app = typer.Typer(
    name="llmctl",
    help="Build a language model end to end: clean → dedup → tokenize → pretrain → generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Options every artifact-writing command shares.
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Artifact directory to write.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file of settings (see --show-config).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one setting, key=value (TOML value); repeatable."),
]
ShowOpt = Annotated[
    bool, typer.Option("--show-config", help="Print the resolved settings with help, then exit.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out artifact.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary output.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-j", help="Worker processes (default: all cores).")
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Fail at the first malformed record (exit 2).")
]
TextFieldOpt = Annotated[
    str | None, typer.Option("--text-field", help="JSON/parquet field holding the text.")
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="Where the per-block work runs: local (process pool) or ray (a Ray cluster; "
        "--set engine.address=...). Same artifact either way.",
    ),
]
InputsArg = Annotated[list[Path] | None, typer.Argument(help="Input files, folders or artifacts.")]

F = TypeVar("F", bound=Callable[..., Any])


def command(fn: F, name: str | None = None) -> F:
    """Register a subcommand that maps UsageError to exit 2 and OSError, DistributedFailure or
    WorkerDied to exit 1, each with one clear line (`name`: the subcommand's name when it is not the
    function's)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        set_quiet(bool(kwargs.get("quiet")))
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            # escape: a path such as data/[abc]/x.jsonl is text, not rich markup
            # printable: one line, whatever bytes a hostile file name or value holds
            console.print(f"[bold red]error:[/] {escape(printable(str(e)))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except (DistributedFailure, WorkerDied) as e:
            console.print(f"[bold red]error:[/] {escape(printable(str(e)))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except BrokenPipeError:
            # `llmctl generate ... | head`: the reader left; stop quietly, as Unix tools do.
            # Point stdout at /dev/null so the interpreter's final flush does not fail again.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives until exit)
            raise typer.Exit(141) from None
        except OSError as e:
            # Disk full, permission denied, I/O error: the environment, not a bug, so one line
            # naming the path and no traceback (a failed build has removed its partial output).
            name = os.fsdecode(e.filename) if e.filename else ""
            msg = f"{name}: {e.strerror or e}" if name else (e.strerror or str(e))
            console.print(f"[bold red]error:[/] {escape(printable(msg))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    app.command(name=name)(wrapper)
    return wrapper  # type: ignore[return-value]


C = TypeVar("C")


def resolve(
    cls: type[C], config: Path | None, sets: list[str] | None, show: bool, **options: Any
) -> C:
    """The command's config; with --show-config, print it and exit 0."""
    cfg = load_config(cls, config, sets, options)
    if show:
        table = Table(title=f"{cls.__name__} (resolved)", title_justify="left")
        table.add_column("key")
        table.add_column("value")
        table.add_column("help")
        for key, value, help_text in describe(cfg):
            table.add_row(key, value, help_text)
        Console().print(table)
        raise typer.Exit(0)
    return cfg


def _method_of(config: Path | None, sets: list[str] | None) -> str | None:
    """`method` as `--set` or the --config file gives it (align picks its settings by it)."""
    from llmctl.config import parse_override

    for item in reversed(sets or []):
        key, value = parse_override(item)
        if key == "method":
            return str(value)
    if config is not None:
        from llmctl.config import load_toml

        value = load_toml(config).get("method")
        return None if value is None else str(value)
    return None


def need_out(out: Path | None) -> Path:
    """`--out` is optional only so that `--show-config` works without it."""
    if out is None:
        raise UsageError("--out is required (the artifact directory to write)")
    return out


def need(value: Any, what: str) -> Any:
    """A positional argument is optional only so that `--show-config` works without it."""
    if not value:
        raise UsageError(f"missing argument: {what}")
    return value


def _version(value: bool) -> None:
    if value:
        print(f"llmctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """llmctl: every stage reads artifacts and writes one new artifact, complete or absent."""


# --- subcommands ---------------------------------------------------------------------------
# (each below: options -> config -> commands.<verb>.run)


def _opt(flag: str, help: str, tp: Any = int) -> Any:
    """A typed option whose None default means 'not given' (resolve ignores it)."""
    return Annotated[tp | None, typer.Option(flag, help=help)]


@command
def clean(
    inputs: InputsArg = None,
    out: OutOpt = None,
    text_field: TextFieldOpt = None,
    workers: WorkersOpt = None,
    engine: EngineOpt = None,
    strict: StrictOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Filter raw text into clean documents (Gopher, C4, FineWeb rules, language id, PII).

    Reads txt, jsonl(.gz/.zst), parquet, HTML, WARC(.gz), folders of them and docs artifacts.
    """
    from llmctl.commands import clean as verb

    cfg = resolve(
        verb.CleanConfig,
        config,
        sets,
        show_config,
        text_field=text_field,
        workers=workers,
        strict=strict or None,
        **{"engine.kind": engine},
    )
    verb.run(need(inputs, "INPUTS..."), need_out(out), cfg, force=force)


@command
def dedup(
    inputs: InputsArg = None,
    out: OutOpt = None,
    decontaminate: Annotated[
        list[Path] | None,
        typer.Option(
            "--decontaminate",
            help="Eval docs (file, folder or docs artifact): drop training docs sharing a "
            "13-gram with them; repeatable.",
        ),
    ] = None,
    text_field: TextFieldOpt = None,
    workers: WorkersOpt = None,
    engine: EngineOpt = None,
    strict: StrictOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Drop exact and near-duplicate documents (MinHash LSH), saying which doc each duplicates."""
    from llmctl.commands import dedup as verb

    cfg = resolve(
        verb.DedupConfig,
        config,
        sets,
        show_config,
        text_field=text_field,
        workers=workers,
        strict=strict or None,
        **{
            "engine.kind": engine,
            "decontam.paths": [str(p) for p in decontaminate] if decontaminate else None,
        },
    )
    verb.run(need(inputs, "INPUTS..."), need_out(out), cfg, force=force)


@command
def tokenize(
    inputs: InputsArg = None,
    out: OutOpt = None,
    vocab_size: Annotated[
        int | None, typer.Option("--vocab-size", help="Vocabulary size to train (default 8192).")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer", help="Reuse this tokenizer.json, tokens artifact or checkpoint."
        ),
    ] = None,
    train_bytes: Annotated[
        int | None, typer.Option("--train-bytes", help="Cap on the text that trains the tokenizer.")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="Share of documents held out (0.01).")
    ] = None,
    shard_tokens: Annotated[
        int | None, typer.Option("--shard-tokens", help="Most tokens per shard file.")
    ] = None,
    text_field: TextFieldOpt = None,
    workers: WorkersOpt = None,
    engine: EngineOpt = None,
    strict: StrictOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer and encode documents into token shards."""
    from llmctl.commands import tokenize as verb

    cfg = resolve(
        verb.TokenizeConfig,
        config,
        sets,
        show_config,
        vocab_size=vocab_size,
        tokenizer=str(tokenizer) if tokenizer else None,
        train_bytes=train_bytes,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        text_field=text_field,
        workers=workers,
        strict=strict or None,
        **{"engine.kind": engine},
    )
    verb.run(need(inputs, "INPUTS..."), need_out(out), cfg, force=force)


# Options every training command shares (pretrain, finetune, lora, align, distill, qat): the
# ones people type often; everything else goes through --set / --config (TrainSettings keys).
StepsOpt = _opt("--steps", "Optimizer steps.")
BatchSizeOpt = _opt("--batch-size", "Sequences per micro-batch (per process).")
SeqLenOpt = _opt("--seq-len", "Tokens per sequence (default: the model's context).")
LrOpt = _opt("--lr", "Peak learning rate.", float)
SeedOpt = _opt("--seed", "Seed of init, data order and every random draw.")
DeviceOpt = _opt("--device", "auto, cpu or cuda.", str)
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
EpochsOpt = _opt("--epochs", "Passes over the training examples (instead of --steps).", float)


def training_options(
    steps: int | None,
    batch_size: int | None,
    seq_len: int | None,
    lr: float | None,
    seed: int | None,
    device: str | None,
    compile: bool,
) -> dict[str, Any]:
    """The shared training options as config keys (None: not given)."""
    return dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                device=device, compile=compile or None)  # fmt: skip


@command
def pretrain(
    tokens: Annotated[
        Path | None, typer.Argument(help="Tokens artifact (from `llmctl tokenize`).")
    ] = None,
    out: OutOpt = None,
    preset: _opt(
        "--preset", "Model preset: tiny, mini, small, gpt2-124m, llama-style.", str
    ) = None,
    objective: _opt("--objective", "causal (next token) or mlm (masked LM).", str) = None,
    steps: StepsOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    init: _opt("--init", "Continue pretraining this checkpoint (same tokenizer).", Path) = None,
    device: DeviceOpt = None,
    compile: CompileOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model from scratch on a tokens artifact; rerun the same command to resume.

    Under `torchrun --nproc-per-node N` it trains data-parallel (DDP, or FSDP2).
    """
    from llmctl.commands import pretrain as verb

    cfg = resolve(
        verb.PretrainConfig, config, sets, show_config, preset=preset, objective=objective,
        init=str(init) if init else None,
        **training_options(steps, batch_size, seq_len, lr, seed, device, compile),
    )  # fmt: skip
    verb.run(need(tokens, "TOKENS"), need_out(out), cfg, force=force)


@command
def finetune(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint artifact to tune (from `llmctl pretrain`).")
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Chat data: JSON/JSONL(.gz) files or folders (messages, "
            "prompt+response, prompt+completion or Alpaca records)."
        ),
    ] = None,
    out: OutOpt = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    compile: CompileOpt = False,
    strict: StrictOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Instruction-tune a checkpoint (loss on assistant turns); rerun the same command to resume.

    Under `torchrun --nproc-per-node N` it trains data-parallel (DDP, or FSDP2).
    """
    from llmctl.commands import finetune as verb

    cfg = resolve(
        verb.FinetuneConfig, config, sets, show_config, epochs=epochs, strict=strict or None,
        **training_options(steps, batch_size, seq_len, lr, seed, device, compile),
    )  # fmt: skip
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    verb.run(need(checkpoint, "CHECKPOINT"), need(data, "DATA..."), need_out(out), cfg,
             force=force)  # fmt: skip


@command
def lora(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint artifact to adapt (stays frozen).")
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Argument(help="A tokens artifact, or instruction files (JSON/JSONL, .gz)."),
    ] = None,
    out: OutOpt = None,
    merge: Annotated[
        Path | None,
        typer.Option(
            "--merge", help="Merge this adapter into CHECKPOINT; --out gets a checkpoint."
        ),
    ] = None,
    rank: _opt("--rank", "LoRA rank r.") = None,
    alpha: _opt("--alpha", "LoRA alpha (the update is scaled by alpha / rank).", float) = None,
    dropout: _opt("--dropout", "Dropout on the LoRA input.", float) = None,
    targets: _opt(
        "--targets", "Layers to adapt, comma-separated: q_proj..lm_head, attn, mlp, all.", str
    ) = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    compile: CompileOpt = False,
    strict: StrictOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train LoRA adapters on a frozen checkpoint (writes an adapter), or --merge one into it.

    The adapter is in PEFT's layout under the base's transformers module names.
    """
    from llmctl.commands import lora as verb

    if merge is not None:
        if data:
            raise UsageError(f"{data[0]}: --merge takes no DATA (only CHECKPOINT and --out)")
        verb.merge(need(checkpoint, "CHECKPOINT"), merge, need_out(out), force=force)
        return
    cfg = resolve(
        verb.LoraConfig, config, sets, show_config,
        rank=rank, alpha=alpha, dropout=dropout, targets=targets.split(",") if targets else None,
        strict=strict or None, epochs=epochs,
        **training_options(steps, batch_size, seq_len, lr, seed, device, compile),
    )  # fmt: skip
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    verb.run(need(checkpoint, "CHECKPOINT"), need(data, "DATA..."), need_out(out), cfg,
             force=force)  # fmt: skip


@command
def align(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint artifact to align (the frozen reference).")
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Preference files: prompt+chosen+rejected, hh-rlhf transcripts, ShareGPT "
            "pairs, or KTO prompt+completion+label (JSON/JSONL, .gz); prompt files "
            "({'prompt'} or {'messages'} a line) for grpo, ppo and rlaif."
        ),
    ] = None,
    out: OutOpt = None,
    method: _opt(
        "--method", "dpo, ipo, simpo, orpo, kto, reward (offline); grpo, ppo, rlaif.", str
    ) = None,
    reward: _opt(
        "--reward",
        "grpo/ppo: a reward-model checkpoint, builtin:length[:N], builtin:keyword:WORD, "
        "builtin:distinct, or judge:LM.",
        str,
    ) = None,
    judge: _opt(
        "--judge", "rlaif: a reward-model checkpoint or judge:LM / judge-yes:LM.", str
    ) = None,
    use_lora: Annotated[
        bool, typer.Option("--lora", help="Train LoRA adapters on the frozen checkpoint.")
    ] = False,
    beta: _opt("--beta", "β (DPO/IPO/KTO KL leash; SimPO reward scale).", float) = None,
    steps: StepsOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    compile: CompileOpt = False,
    strict: StrictOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Align a checkpoint: on preference pairs (DPO, IPO, SimPO, ORPO, KTO), as a reward model
    (--method reward), by online RL against a reward (--method grpo|ppo --reward RM), or on
    pairs an AI judge ranked (--method rlaif --judge J); rerun the same command to resume.

    The reference log-probs are computed once and cached in the in-progress output.
    """
    from llmctl.commands import align as verb

    train = training_options(steps, batch_size, seq_len, lr, seed, device, compile)
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    chosen = method or _method_of(config, sets)
    if chosen in ("grpo", "ppo"):
        from llmctl.train.online import OnlineConfig
        from llmctl.train.online_run import run_online

        if beta is not None or epochs is not None or judge is not None:
            raise UsageError(f"--method {chosen} takes --reward and --steps (and --set "
                             "kl_coef=...), not --beta, --epochs or --judge")  # fmt: skip
        cfg = resolve(OnlineConfig, config, sets, show_config, method=chosen,
                      lora=use_lora or None, strict=strict or None, **train)  # fmt: skip
        run_online(need(checkpoint, "CHECKPOINT"), need(data, "PROMPTS..."), need_out(out),
                   cfg.method, need(reward, "--reward"), cfg, force=force)  # fmt: skip
        return
    if chosen == "rlaif":
        if reward is not None:
            raise UsageError("--method rlaif ranks answers with --judge, not --reward")
        sets = [s for s in (sets or []) if not s.startswith("method=")]
        rcfg = resolve(verb.RlaifConfig, config, sets, show_config, method="dpo",
                       lora=use_lora or None, beta=beta, epochs=epochs, strict=strict or None,
                       **train)  # fmt: skip
        verb.run_rlaif(need(checkpoint, "CHECKPOINT"), need(data, "PROMPTS..."), need_out(out),
                       need(judge, "--judge"), rcfg, force=force)  # fmt: skip
        return
    if reward is not None or judge is not None:
        raise UsageError("--reward is for --method grpo|ppo, --judge for --method rlaif")
    cfg = resolve(
        verb.AlignConfig, config, sets, show_config, method=method, lora=use_lora or None,
        beta=beta, epochs=epochs, strict=strict or None, **train,
    )  # fmt: skip
    verb.run(need(checkpoint, "CHECKPOINT"), need(data, "DATA..."), need_out(out), cfg,
             force=force)  # fmt: skip


@command
def distill(
    data: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Tokens artifact (logit, feature) or prompts JSONL: {'prompt'} or "
            "{'messages'} a line (sequence, api)."
        ),
    ] = None,
    teacher: _opt(
        "--teacher",
        "Teacher checkpoint; for api an http(s)://.../v1 URL; for sequence/api also a JSONL "
        "of {'prompt', 'response'}.",
        str,
    ) = None,
    out: OutOpt = None,
    kind: _opt("--kind", "logit, feature, sequence or api.", str) = None,
    student: _opt("--student", "Student checkpoint to start from.", Path) = None,
    student_preset: _opt(
        "--student-preset", "A fresh student of this preset (e.g. mini).", str
    ) = None,
    tokenizer: _opt(
        "--tokenizer", "Student tokenizer for api with a preset (tokens or checkpoint).", Path
    ) = None,
    steps: StepsOpt = None,
    batch_size: BatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    compile: CompileOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Teach a smaller student from a teacher: logits, hidden features, answers, or an API.

    Rerun the same command to resume (API answers already received are not asked again).
    """
    from llmctl.commands import distill as verb

    cfg = resolve(
        verb.DistillConfig, config, sets, show_config, kind=kind, student_preset=student_preset,
        **training_options(steps, batch_size, seq_len, lr, seed, device, compile),
    )  # fmt: skip
    verb.run(data or [], need_out(out), cfg, teacher=need(teacher, "--teacher"), student=student,
             tokenizer=tokenizer, force=force)  # fmt: skip


@command
def eval(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint artifact directory.")
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Argument(help="Tokens artifact (val split), docs artifact or text files."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write the figures as an eval artifact.")
    ] = None,
    seq_len: _opt("--seq-len", "Context per window (default: the model's).") = None,
    max_tokens: _opt("--max-tokens", "Score at most this many tokens.") = None,
    device: _opt("--device", "auto, cpu or cuda.", str) = None,
    text_field: TextFieldOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Loss, perplexity and bits per byte of a checkpoint on held-out tokens or documents."""
    from llmctl.commands import eval as verb

    cfg = resolve(
        verb.EvalConfig, config, sets, show_config,
        seq_len=seq_len, max_tokens=max_tokens, device=device, text_field=text_field,
    )  # fmt: skip
    verb.run(need(checkpoint, "CHECKPOINT"), need(data, "DATA..."), cfg, as_json=as_json,
             out=out, force=force)  # fmt: skip


@command
def quantize(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint artifact directory (float weights).")
    ] = None,
    out: OutOpt = None,
    method: _opt("--method", "int8, int4, dynamic, static or qat.", str) = None,
    calib: _opt(
        "--calib", "Calibration data: tokens artifact or documents (static; qat: tokens).", Path
    ) = None,
    eval_data: _opt(
        "--eval", "Report data (default: the val split the base was trained on).", Path
    ) = None,
    group_size: _opt("--group-size", "int4: inputs per scale (default 64).") = None,
    bits: _opt("--bits", "qat: 4 or 8.") = None,
    steps: _opt("--steps", "qat: optimizer steps.") = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize a checkpoint (int8/int4 weight-only, dynamic, static, QAT) and report
    file size, val loss, bits per byte and decode speed before and after."""
    from llmctl.commands import quantize as verb

    cfg = resolve(
        verb.QuantizeConfig, config, sets, show_config,
        method=method, group_size=group_size, bits=bits, steps=steps,
    )  # fmt: skip
    verb.run(need(checkpoint, "CHECKPOINT"), need_out(out), cfg, calib, eval_data, force=force)


@command
def generate(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint artifact directory.")
    ] = None,
    prompt: _opt("--prompt", "Prompt text.", str) = None,
    prompts: _opt(
        "--prompts", "JSONL file: {'prompt': ...} or {'messages': [...]} a line.", Path
    ) = None,
    out: OutOpt = None,
    max_new_tokens: _opt("--max-new-tokens", "Most tokens to generate (64).") = None,
    do_sample: Annotated[bool, typer.Option("--do-sample", help="Sample (else greedy).")] = False,
    temperature: _opt("--temperature", "Divide logits by this when sampling.", float) = None,
    top_k: _opt("--top-k", "Sample among the k most likely tokens.") = None,
    top_p: _opt("--top-p", "Nucleus sampling: keep this much probability.", float) = None,
    min_p: _opt("--min-p", "Drop tokens below min_p * p(top token).", float) = None,
    num_beams: _opt("--num-beams", "Beam search with this many beams.") = None,
    length_penalty: _opt("--length-penalty", "Beam score = logprob / len ** this.", float) = None,
    early_stopping: Annotated[
        bool, typer.Option("--early-stopping", help="Beam search ends at num_beams finished.")
    ] = False,
    repetition_penalty: _opt("--repetition-penalty", "HF repetition penalty (>1).", float) = None,
    frequency_penalty: _opt("--frequency-penalty", "OpenAI frequency penalty.", float) = None,
    presence_penalty: _opt("--presence-penalty", "OpenAI presence penalty.", float) = None,
    no_repeat_ngram_size: _opt(
        "--no-repeat-ngram-size", "Never repeat n-grams of this size."
    ) = None,
    num_return_sequences: _opt("--num-return-sequences", "Beams returned (<= beams).") = None,
    num_samples: _opt("--num-samples", "Samples per prompt (with --do-sample).") = None,
    seed: _opt("--seed", "Sampling seed (default random, recorded).") = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop string (repeatable); cut before it.")
    ] = None,
    adapter: _opt("--adapter", "LoRA adapter to merge into the checkpoint.", Path) = None,
    draft: _opt("--draft", "Draft checkpoint for speculative decoding.", Path) = None,
    draft_k: _opt("--draft-k", "Tokens the draft proposes per step (4).") = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Use the chat template; no prompt on a TTY: a REPL.")
    ] = False,
    device: _opt("--device", "cpu, cuda, cuda:N or auto.", str) = None,
    dtype: _opt("--dtype", "auto, float32, bfloat16 or float16.", str) = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="A prompt longer than the context is an error.")
    ] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate text: greedy, sampling, beam search, speculative decoding, chat.

    Sampling filters: temperature, top-k, top-p, min-p; penalties: repetition, frequency,
    presence, no-repeat n-gram; stop strings and tokens. --chat renders the checkpoint's chat
    template, or opens a REPL when no prompt is given on a terminal.
    """
    from llmctl.commands import generate as verb

    cfg = resolve(
        verb.GenerateConfig, config, sets, show_config,
        prompt=prompt, prompts=str(prompts) if prompts else None, max_new_tokens=max_new_tokens,
        do_sample=do_sample or None, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping or None, repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, num_return_sequences=num_return_sequences,
        num_samples=num_samples, seed=seed, stop=stop or None,
        adapter=str(adapter) if adapter else None, draft=str(draft) if draft else None,
        draft_k=draft_k, chat=chat or None, device=device, dtype=dtype, strict=strict or None,
    )  # fmt: skip
    verb.run(need(checkpoint, "CHECKPOINT"), cfg, out, force=force)


@functools.partial(command, name="import")
def import_(
    format: Annotated[
        str | None, typer.Argument(help="hf (transformers folder) or llama2c (MODEL.bin TOK.bin).")
    ] = None,
    paths: Annotated[list[Path] | None, typer.Argument(help="What to import.")] = None,
    out: OutOpt = None,
    license: _opt("--license", "The model's license (SPDX id), kept for exports.", str) = None,
    dtype: _opt("--dtype", "auto (the source's), float32, bfloat16 or float16.", str) = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Import a model made elsewhere as a checkpoint: a transformers folder or llama2.c files."""
    from llmctl.commands import import_ as verb

    cfg = resolve(verb.ImportConfig, config, sets, show_config, license=license, dtype=dtype)
    verb.run(need(format, "FORMAT"), need(paths, "PATH..."), need_out(out), cfg, force=force)


@command
def export(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint artifact directory.")
    ] = None,
    format: _opt("--format", "hf (transformers folder) or gguf (llama.cpp).", str) = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a checkpoint for transformers (hf) or llama.cpp (gguf, --set gguf.type=q8_0)."""
    from llmctl.commands import export as verb

    cfg = resolve(verb.ExportConfig, config, sets, show_config, format=format)
    verb.run(need(checkpoint, "CHECKPOINT"), need_out(out), cfg, force=force)


@command
def lineage(
    artifact: Annotated[Path | None, typer.Argument(help="Artifact directory to trace.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the nodes as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """The chain of artifacts behind ARTIFACT back to the raw files: each stage's command,
    config digest and key figures; a link whose digest no longer matches is flagged."""
    from llmctl.commands import lineage as verb

    verb.run(need(artifact, "ARTIFACT"), as_json=as_json)


@command
def report(
    artifacts: Annotated[
        list[Path] | None, typer.Argument(help="Artifacts whose build to show (and all behind).")
    ] = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    show_config: ShowOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """One self-contained HTML page (+ the figures as JSON) of the build behind ARTIFACTS:
    data funnel, tokenizer, loss curves, evals, preferences, samples."""
    from llmctl.commands import report as verb

    cfg = resolve(verb.ReportConfig, config, sets, show_config)
    verb.run(need(artifacts, "ARTIFACT..."), need_out(out), cfg, force=force)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
