"""`make mutate`: mutation testing of the modules in tests/mutate/modules.py with mutmut 3.

Reads: src/llmctl/<module> and the test files the table gives it. Writes, under --out
(build/mutate): one mutmut work folder per module (`<module_slug>/`, kept between runs so
`mutmut show NAME` works there), `report.md` (the score table and every survivor with its
diff) and `report.json`; prints the table and the survivors.

mutmut forks each mutant from a process that has already imported torch and the tests (no
interpreter start per mutant), and per mutant runs only the tests that call the mutated
function. Mutants are sampled, seeded, so a run has a known length and the same sample each
time.

Example:
    .venv/bin/python tests/mutate/run.py                    # every module in the table
    .venv/bin/python tests/mutate/run.py train/loop.py --sample 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from equivalent import EQUIVALENT, KNOWN  # noqa: E402
from modules import MODULES, SAMPLE, SAMPLE_OF, SEED  # noqa: E402

KILLED = {"killed", "timeout", "segfault"}  # a mutant a test run noticed
STRING = re.compile(r"\"[^\"]*\"|'[^']*'")


def message_text(diff: str) -> bool:
    """Whether a mutant only rewrites the letters of one prose string (an error message, a log
    line: "XXtextXX", upper or lower case). Such text is pinned by key words in the tests
    (`match=`), not letter by letter; these survivors are reported apart, never hidden."""
    lines = [x for x in diff.splitlines() if x[:1] in "+-" and x[:3] not in ("+++", "---")]
    if len(lines) != 2 or not (lines[0][0] == "-" and lines[1][0] == "+"):
        return False
    was, now = STRING.findall(lines[0]), STRING.findall(lines[1])
    if len(was) != len(now) or STRING.sub("", lines[0][1:]) != STRING.sub("", lines[1][1:]):
        return False
    changed = [(a, b) for a, b in zip(was, now, strict=True) if a != b]
    if len(changed) != 1:
        return False
    a, b = changed[0][0][1:-1], changed[0][1][1:-1]
    return " " in a.strip() and b in (f"XX{a}XX", a.upper(), a.lower())


def slug(module: str) -> str:
    return module.removesuffix(".py").replace("/", "_")


def prepare(module: str, work: Path) -> None:
    """A work folder whose pyproject.toml is the project's plus this module's [tool.mutmut]."""
    tests = MODULES[module]
    missing = [t for t in tests if not (ROOT / t).exists()]
    if missing or not (ROOT / "src/llmctl" / module).exists():
        sys.exit(f"tests/mutate/modules.py: {module}: missing {missing or module}")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        link = work / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    # Tests read recipe data by path from the repository root, which is mutants/ for them.
    for name in ("recipes",):
        link = work / "mutants" / name
        if (ROOT / name).exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(ROOT / name)
    project = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in project:
        sys.exit("pyproject.toml: [tool.mutmut] is written per module by tests/mutate/run.py")
    settings = {
        "source_paths": ["src"],
        "only_mutate": [f"src/llmctl/{module}"],
        "pytest_add_cli_args_test_selection": tests,
        # no cache writes into the shared tree; xdist stays off (one process per mutant)
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "no:xdist", "-W", "ignore"],
        "use_git_change_detection": False,
    }
    block = "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    tomllib.loads(project + block)  # fail here, not inside mutmut
    (work / "pyproject.toml").write_text(project + block)


def child(module: str, n: int, seed: int, jobs: int) -> None:
    """Inside the work folder: generate the mutants, draw the sample, run it (mutmut's own
    `run`, in this process: it forks the mutants from here)."""
    import mutmut.__main__ as mm
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.trampoline import set_mutant_under_test
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths

    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    mm.create_mutants(jobs)
    data = SourceFileMutationData(path=Path("src/llmctl") / module)
    data.load()
    names = sorted(data.exit_code_by_key)
    # A fresh draw each run: results of a previous sample must not count for this one.
    data.exit_code_by_key = dict.fromkeys(names)
    data.save()
    rng = random.Random(f"{seed}:{module}")
    picked = sorted(rng.sample(names, min(n, len(names))))
    Path("sample.json").write_text(json.dumps({"total": len(names), "sampled": picked}))
    print(f"{module}: {len(picked)} of {len(names)} mutants", flush=True)
    if picked:
        mm._run(picked, jobs)


def collect(module: str, work: Path, seconds: float) -> dict:
    """The module's row and its survivors (with diffs), read from mutmut's meta file."""
    cwd = Path.cwd()
    os.chdir(work)
    try:
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code

        sample = json.loads(Path("sample.json").read_text())
        data = SourceFileMutationData(path=Path("src/llmctl") / module)
        data.load()
        status = {k: status_by_exit_code[data.exit_code_by_key.get(k)] for k in sample["sampled"]}
        survivors = []
        for name, s in sorted(status.items()):
            if s not in KILLED:
                try:
                    diff = get_diff_for_mutant(name, path=Path("src/llmctl") / module)
                except Exception as e:  # a diff is a courtesy; the verdict stands without it
                    diff = f"(no diff: {e})"
                kind = s
                if name in EQUIVALENT:
                    kind = "equivalent"
                elif message_text(diff):
                    kind = "message text"
                survivors.append({"name": name, "status": kind, "diff": diff})
    finally:
        os.chdir(cwd)
    killed = sum(s in KILLED for s in status.values())
    n = len(status)
    text = sum(s["status"] == "message text" for s in survivors)
    same = sum(s["status"] == "equivalent" for s in survivors)
    return {
        "module": module,
        "total": sample["total"],
        "sampled": n,
        "killed": killed,
        "equivalent": same,
        "score": killed / (n - same) if n - same else float("nan"),
        "message_text": text,
        "score_code": killed / (n - same - text) if n - same - text else float("nan"),
        "seconds": round(seconds),
        "survivors": survivors,
    }


def report(rows: list[dict], out: Path, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| module | mutants sampled/total | killed | equivalent | score "
        "| message-text survivors | score without them | time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for key, default in (("equivalent", 0), ("message_text", 0), ("score_code", r["score"])):
            r.setdefault(key, default)  # a row written by an older run.py
        lines.append(
            f"| {r['module']} | {r['sampled']}/{r['total']} | {r['killed']} | "
            f"{r['equivalent']} | {100 * r['score']:.0f} % | {r['message_text']} | "
            f"{100 * r['score_code']:.0f} % | {r['seconds'] // 60}m{r['seconds'] % 60:02d}s |"
        )
    lines += ["", "Survivors:", ""]
    for r in rows:
        for s in r["survivors"]:
            first = next(
                (x[1:].strip() for x in s["diff"].splitlines() if x.startswith("+") and
                 not x.startswith("+++")), "",
            )  # fmt: skip
            reason = EQUIVALENT.get(s["name"]) or KNOWN.get(s["name"])
            if s["status"] == "message text":
                reason = "only the letters of a message change; the tests match its key words"
            why = f" — {reason}" if reason else ""
            lines.append(f"- `{s['name']}` ({s['status']}): `{first}`{why}")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(
        text + "\n## Diffs\n\n" + "\n\n".join(
            f"```diff\n{s['diff']}\n```" for r in rows for s in r["survivors"]
        ) + "\n"
    )  # fmt: skip
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="*", help="paths under src/llmctl/ (default: the table)")
    p.add_argument("--sample", type=int, help=f"mutants per module (default {SAMPLE})")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "build/mutate")
    p.add_argument("--report", action="store_true", help="only re-read the last run's results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.sample, a.seed, a.jobs)
        return
    modules = a.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        sys.exit(f"not in tests/mutate/modules.py: {', '.join(unknown)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    rows = []
    a.out.mkdir(parents=True, exist_ok=True)
    old = a.out / "report.json"
    done = {
        r["module"]: r
        for r in (json.loads(old.read_text()) if old.exists() else [])
        if "equivalent" in r
    }  # rows of an older report.json layout are dropped
    for module in modules:
        work = a.out / slug(module)
        if a.report:
            if (work / "sample.json").exists():
                rows.append(collect(module, work, done.get(module, {}).get("seconds", 0)))
            continue
        prepare(module, work)
        n = a.sample if a.sample is not None else SAMPLE_OF.get(module, SAMPLE)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", module,
               "--sample", str(n), "--seed", str(a.seed), "--jobs", str(a.jobs)]  # fmt: skip
        print(f"== {module} (log: {work / 'mutmut.log'})", flush=True)
        began = time.monotonic()
        with open(work / "mutmut.log", "w") as log:
            rc = subprocess.call(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - began
        if rc != 0:
            sys.exit(f"{module}: mutmut failed (exit {rc}); see {work / 'mutmut.log'}")
        rows.append(collect(module, work, seconds))
        r = rows[-1]
        print(f"   {r['killed']}/{r['sampled']} killed ({100 * r['score']:.0f} %) "
              f"in {seconds:.0f}s", flush=True)  # fmt: skip
    # report.json keeps each module's latest run, so per-module runs add up to one report
    done.update({r["module"]: r for r in rows})
    rows = [done[m] for m in MODULES if m in done]
    command = "python tests/mutate/run.py " + " ".join(sys.argv[1:])
    print(report(rows, a.out, command.strip()))
    print(f"written: {a.out / 'report.md'}")


if __name__ == "__main__":
    main()
