"""How well `llmctl dedup` finds near duplicates: a labelled set made from real web text.

Originals: the C4 and CCNet samples in ../shared/data/web (documents of ≥ 50 words), kept as
distinct documents. Variants are made from them with known edits (the generator is this file,
seeded; no data ships):

- close variants, what web dedup exists to catch, one per edit type per original:
  boilerplate added (a site header, a footer, or both), one paragraph moved, ≤ 2% of words
  substituted, truncated to 85–100% of the text;
- heavier edits: 5%, 10%, 20%, 30% of words substituted, inserted or deleted, and every
  paragraph shuffled.

Scoring is pairwise: a pair of documents is a true duplicate when both come from the same
original; a predicted one when dedup put both in one cluster (kept + removed docs carry
`cluster_id`). Precision, recall and F1 over pairs; "false merges" counts clusters that hold
documents of two or more originals.

Run: .venv/bin/python bench/dedup_quality.py [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

from llmctl.commands.dedup import DedupConfig, run
from llmctl.config import load_config
from llmctl.data.docs import read_docs_artifact
from llmctl.runtime import set_quiet

ROOT = Path(__file__).resolve().parent
WEB = ROOT.parent.parent / "shared" / "data" / "web"
OUT = ROOT / "out" / "dedup_quality"
HEADERS = [
    "Skip to main content\nHome | About Us | Services | Blog | Contact\nSearch this site",
    "Menu\nHome\nShop\nMy Account\nCart (0)\nSign in or Register",
    "You are here: Home » Articles » Latest News",
]
FOOTERS = [
    "Copyright © 2019 All Rights Reserved. Privacy Policy | Terms of Use | Sitemap",
    "Share this:\nFacebook\nTwitter\nPinterest\nEmail\nLike this:\nLike Loading...",
    "Subscribe to our newsletter to get the latest updates delivered to your inbox. "
    "We respect your privacy and you can unsubscribe at any time.",
]


def originals() -> list[str]:
    files = [
        WEB / "c4_demo" / "c4_demo.jsonl",
        *sorted((WEB / "ccnet_head_sample").glob("*.jsonl")),
    ]
    texts = [json.loads(line)["text"] for f in files for line in f.open(encoding="utf-8")]
    return [t for t in texts if len(t.split()) >= 50]


def _words_edit(text: str, rate: float, rng: random.Random, ops: str) -> str:
    """Apply round(rate × words) edits, each a substitution, insertion or deletion (from ops)."""
    lines = [line.split(" ") for line in text.split("\n")]
    slots = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    vocab = [w for line in lines for w in line if w.isalpha()] or ["word"]
    for i, j in sorted(rng.sample(slots, max(1, round(rate * len(slots)))), reverse=True):
        op = rng.choice(ops)
        if op == "s":
            lines[i][j] = rng.choice(vocab)
        elif op == "i":
            lines[i].insert(j, rng.choice(vocab))
        elif len(lines[i]) > 1:
            del lines[i][j]
    return "\n".join(" ".join(line) for line in lines)


def _paragraphs(text: str) -> list[str]:
    """Lines; a one-line text is cut in two at the sentence end nearest its middle."""
    paras = text.split("\n")
    if len(paras) > 1:
        return paras
    ends = [i + 1 for i, c in enumerate(text) if c in ".!?" and text[i + 1 : i + 2] == " "]
    if not ends:
        return [text[: len(text) // 2], text[len(text) // 2 :]]
    cut = min(ends, key=lambda i: abs(i - len(text) // 2))
    return [text[:cut].strip(), text[cut:].strip()]


def close_variant(text: str, kind: str, rng: random.Random) -> str:
    if kind == "boilerplate":  # a header, a footer, or both
        head, foot = rng.choice([(1, 0), (0, 1), (1, 1)])
        parts = [rng.choice(HEADERS)] * head + [text] + [rng.choice(FOOTERS)] * foot
        return "\n".join(parts)
    paras = _paragraphs(text)
    if kind == "reorder":  # one paragraph moved elsewhere
        moved = paras.pop(rng.randrange(len(paras)))
        paras.insert(rng.choice([i for i in range(len(paras) + 1)]), moved)
        return "\n".join(paras)
    if kind == "shuffle":  # every paragraph in a random order (a heavy edit)
        rng.shuffle(paras)
        return "\n".join(paras)
    if kind == "substitute":
        return _words_edit(text, rng.uniform(0.002, 0.02), rng, "s")
    if kind == "truncate":
        return text[: int(len(text) * rng.uniform(0.85, 1.0))]
    raise ValueError(kind)


CLOSE = ("boilerplate", "reorder", "substitute", "truncate")
HEAVY = (0.05, 0.10, 0.20, 0.30)


def build(texts: list[str], groups: str, seed: int = 0) -> list[dict]:
    """Records with `family` (the original's index) and `edit` (what made the variant)."""
    rng = random.Random(seed)
    recs = [
        {"id": f"o{i}", "text": t, "family": i, "edit": "original"} for i, t in enumerate(texts)
    ]
    for i, t in enumerate(texts):
        if groups == "close":
            for kind in CLOSE:
                recs.append({"text": close_variant(t, kind, rng), "edit": kind})
                recs[-1].update(id=f"o{i}-{kind}", family=i)
        else:
            for rate in HEAVY:
                recs.append({"text": _words_edit(t, rate, rng, "sid"), "edit": f"{rate:.0%}"})
                recs[-1].update(id=f"o{i}-{rate}", family=i)
            recs.append({"id": f"o{i}-shuffle", "text": close_variant(t, "shuffle", rng)})
            recs[-1].update(family=i, edit="shuffle")
    rng.shuffle(recs)  # originals are not always first in input order
    return recs


def dedup_clusters(recs: list[dict], sets: list[str], name: str) -> tuple[dict[str, int], float]:
    src = OUT / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    out = OUT / f"{name}-out"
    cfg = load_config(DedupConfig, overrides=[*sets, "workers=1"])
    t0 = time.perf_counter()
    run([src], out, cfg, force=True)
    seconds = time.perf_counter() - t0
    cluster = {r["id"]: r["cluster_id"] for r in read_docs_artifact(out)}
    with gzip.open(out / "rejected" / "dropped-00000.jsonl.gz", "rt", encoding="utf-8") as f:
        cluster |= {r["id"]: r["cluster_id"] for r in map(json.loads, f)}
    return cluster, seconds


def score(recs: list[dict], cluster: dict[str, int]) -> dict:
    family = {r["id"]: r["family"] for r in recs}
    by_cluster: dict[int, list[str]] = defaultdict(list)
    for doc_id, c in cluster.items():
        by_cluster[c].append(doc_id)
    predicted = {
        tuple(sorted(p)) for ids in by_cluster.values() for p in itertools.combinations(ids, 2)
    }
    tp = sum(1 for a, b in predicted if family[a] == family[b])
    sizes = Counter(family.values())
    true_pairs = sum(k * (k - 1) // 2 for k in sizes.values())
    merges = sum(1 for ids in by_cluster.values() if len({family[i] for i in ids}) > 1)
    p = tp / len(predicted) if predicted else 1.0
    r = tp / true_pairs if true_pairs else 1.0
    return {"P": p, "R": r, "F1": 2 * p * r / (p + r) if p + r else 0.0, "false_merges": merges}


def recall_by_edit(recs: list[dict], cluster: dict[str, int]) -> dict[str, float]:
    """Share of variants that ended in their original's cluster, per edit."""
    home = {r["family"]: cluster[r["id"]] for r in recs if r["edit"] == "original"}
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in recs:
        if r["edit"] != "original":
            hits[r["edit"]].append(cluster[r["id"]] == home[r["family"]])
    return {k: sum(v) / len(v) for k, v in hits.items()}


SETTINGS = {
    "default (5-gram, 14×8, t≈0.72, verified)": [],
    "5-gram, t=0.8 (9×12)": ["near.threshold=0.8"],
    "5-gram, t=0.5": ["near.threshold=0.5"],
    "3-gram, t≈0.72 (14×8)": ["near.ngram=3"],
    "3-gram, t=0.5": ["near.ngram=3", "near.threshold=0.5"],
    "5-gram, t≈0.72, no verification": ["near.verify=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 originals, default settings only")
    ap.add_argument("--markdown", action="store_true", help="only print the markdown tables")
    args = ap.parse_args()
    set_quiet(True)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    texts = originals()[: 100 if args.quick else None]
    settings = dict(itertools.islice(SETTINGS.items(), 1 if args.quick else None))
    close, heavy = build(texts, "close"), build(texts, "heavy")
    print(f"\n{len(texts)} originals; close set {len(close)} docs, heavy set {len(heavy)} docs\n")
    print("Close variants (one per edit per original):\n")
    print("| settings | precision | recall | F1 | false merges | "
          + " | ".join(f"recall {k}" for k in CLOSE) + " | s |")  # fmt: skip
    print("|---" * (6 + len(CLOSE)) + "|")
    for name, sets in settings.items():
        cl, secs = dedup_clusters(close, sets, "close")
        s, rec = score(close, cl), recall_by_edit(close, cl)
        row = [f"{s['P']:.4f}", f"{s['R']:.4f}", f"**{s['F1']:.4f}**", str(s["false_merges"])]
        print(
            f"| {name} | " + " | ".join(row + [f"{rec[k]:.3f}" for k in CLOSE]) + f" | {secs:.1f} |"
        )
    print("\nHeavier edits (words substituted, inserted or deleted; recall = variant clustered "
          "with its original):\n")  # fmt: skip
    print("| settings | " + " | ".join(f"recall {r:.0%}" for r in HEAVY)
          + " | recall all paragraphs shuffled | pair precision | false merges |")  # fmt: skip
    print("|---" * (4 + len(HEAVY)) + "|")
    for name, sets in settings.items():
        cl, _ = dedup_clusters(heavy, sets, "heavy")
        s, rec = score(heavy, cl), recall_by_edit(heavy, cl)
        cells = [f"{rec[f'{r:.0%}']:.3f}" for r in HEAVY] + [f"{rec['shuffle']:.3f}"]
        cells += [f"{s['P']:.4f}", str(s["false_merges"])]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if not args.markdown:
        print("\nTarget (close set, default settings): F1 ≥ 0.95 and 0 false merges.")


if __name__ == "__main__":
    main()
