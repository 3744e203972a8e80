"""Rebuild this folder's JSONL files from their upstream copies (stdlib only):

    python3 recipes/data/sft/convert.py /work/shared/data/sft recipes/data/sft

- self_instruct_seed.jsonl: each Self-Instruct seed task's instruction with each of its
  instances as one Alpaca record {"instruction", "input", "output"} (175 tasks, one instance each).
- identity.jsonl: LLaMA-Factory's identity prompts, Alpaca records, with {{name}} -> llmctl
  and {{author}} -> the llmctl authors.
"""

import json
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
with open(dst / "self_instruct_seed.jsonl", "w", encoding="utf-8") as out:
    for line in (src / "self_instruct_seed" / "seed_tasks.jsonl").read_text("utf-8").splitlines():
        task = json.loads(line)
        for inst in task["instances"]:
            rec = {
                "instruction": task["instruction"],
                "input": inst["input"],
                "output": inst["output"],
            }
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
identity = json.loads((src / "identity_template" / "identity.json").read_text("utf-8"))
with open(dst / "identity.jsonl", "w", encoding="utf-8") as out:
    for item in identity:
        rec = {
            k: v.replace("{{name}}", "llmctl").replace("{{author}}", "the llmctl authors")
            for k, v in item.items()
        }
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
