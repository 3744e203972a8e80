"""Build the demo preference task `recipes/data/pairs/continuation.jsonl` from the bundled
corpus, deterministically: each pair's prompt is a passage of a document, `chosen` its true
continuation, `rejected` the same words corrupted.

The corruption is the task's difficulty dial: `--corrupt shuffle` (the continuation's words in
a random order: easy, a language model already prefers the true text), `swap:K` (K random
adjacent word swaps: subtle), `other` (the continuation of another document: fluent text,
only coherence with the passage tells them apart). The default mixes `swap:2` and `other`,
so the base model sits well below 0.8 and the preference must be learnt. Also writes
`hh_rlhf_harmless_300.jsonl.gz`, the first 300 pairs of hh-rlhf's harmless-base test split
(MIT; see SOURCE.md), when the shared copy is present.

Example:
    python recipes/data/make_pairs.py            # rewrites recipes/data/pairs/
    python recipes/data/make_pairs.py --corrupt shuffle --pairs 200 --out /tmp/easy.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = [HERE / "web" / "c4_demo.jsonl", HERE / "wiki" / "wiki_demo.jsonl"]
HH = Path("/work/shared/data/preference/hh_rlhf_harmless_base_test/test.jsonl.gz")


def documents() -> list[list[str]]:
    docs = []
    for path in SOURCES:
        for line in path.read_text(encoding="utf-8").splitlines():
            words = json.loads(line).get("text", "").split()
            if len(words) >= 120:
                docs.append(words)
    books = (HERE / "books" / "botchan.txt").read_text(encoding="utf-8").split()
    docs += [books[i : i + 400] for i in range(2000, len(books) - 400, 400)]
    return docs


def corrupt(words: list[str], how: str, rng: random.Random, other: list[str]) -> list[str]:
    if how == "shuffle":
        out = words[:]
        while out == words:
            rng.shuffle(out)
        return out
    if how.startswith("swap:"):
        out = words[:]
        for _ in range(int(how.split(":")[1])):
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        return out if out != words else corrupt(words, how, rng, other)
    if how == "other":
        return other
    raise SystemExit(f"unknown corruption {how!r}")


def build(n_pairs: int, how: str, seed: int, prompt_words: int, answer_words: int) -> list[dict]:
    rng = random.Random(seed)
    docs = documents()
    pairs = []
    while len(pairs) < n_pairs:
        doc = rng.choice(docs)
        start = rng.randrange(len(doc) - prompt_words - answer_words)
        prompt = doc[start : start + prompt_words]
        answer = doc[start + prompt_words : start + prompt_words + answer_words]
        donor = rng.choice(docs)
        s = rng.randrange(len(donor) - answer_words)
        kind = how if how != "mix" else rng.choice(["swap:2", "other"])
        bad = corrupt(answer, kind, rng, donor[s : s + answer_words])
        pairs.append({"prompt": "Continue: " + " ".join(prompt), "chosen": " ".join(answer),
                      "rejected": " ".join(bad), "corruption": kind})  # fmt: skip
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--corrupt", default="mix", help="mix, shuffle, swap:K or other")
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--answer-words", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "pairs" / "continuation.jsonl")
    args = ap.parse_args()
    pairs = build(args.pairs, args.corrupt, args.seed, args.prompt_words, args.answer_words)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"{args.out}: {len(pairs)} pairs ({args.corrupt})")
    if args.out.parent == HERE / "pairs" and HH.is_file():
        with gzip.open(HH, "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(300)]
        hh = HERE / "pairs" / "hh_rlhf_harmless_300.jsonl.gz"
        with open(hh, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
            g.write("".join(lines).encode("utf-8"))
        print(f"{hh}: 300 pairs from {HH}")


if __name__ == "__main__":
    main()
