"""Build prompts.jsonl from the bundled demo data (run from this folder; the output is committed).

- every Self-Instruct seed task's instruction (+ its first input), without the answer;
- "Tell me about X." for each Wikipedia article of wiki_demo (X = the words before " is ");
- the first sentence of the first 100 C4 documents, as "Continue this text: ...".
"""

import json
import re
from pathlib import Path

HERE = Path(__file__).parent
seen, out = set(), []


def add(prompt: str, source: str) -> None:
    if prompt not in seen:
        seen.add(prompt)
        out.append({"prompt": prompt, "source": source})


for line in (HERE.parent / "sft" / "self_instruct_seed.jsonl").read_text().splitlines():
    rec = json.loads(line)
    add(rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else ""), "self_instruct")
for line in (HERE.parent / "wiki" / "wiki_demo.jsonl").read_text().splitlines():
    head = json.loads(line)["text"].split(" is ", 1)[0].split(" (", 1)[0]
    if 0 < len(head.split()) <= 5:
        add(f"Tell me about {head}.", "wiki_demo")
for line in (HERE.parent / "web" / "c4_demo.jsonl").read_text().splitlines()[:100]:
    first = re.split(r"(?<=[.!?])\s", json.loads(line)["text"].strip(), maxsplit=1)[0]
    if 20 <= len(first) <= 200:
        add(f"Continue this text: {first}", "c4_demo")
with open(HERE / "prompts.jsonl", "w", encoding="utf-8") as f:
    for rec in out:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
print(len(out), "prompts")
