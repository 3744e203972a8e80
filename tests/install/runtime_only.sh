#!/usr/bin/env bash
# The commands as a user who typed `pip install llmctl` meets them: install the package into a
# fresh venv WITHOUT dev extras (torch 2.13.0 first, from the wheel on this machine's disk), then
# run each command once on bundled data. A runtime need that only the dev extras pulled in (as
# lxml_html_clean once was) fails here. Each command that a later stage adds joins this list.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PY=${PY:-python3}

"$PY" -m venv "$work/venv"
# pip's output is kept in a log and shown only when an install fails.
pip() { "$work/venv/bin/pip" install --quiet "$@" >>"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }; }
pip --upgrade pip
pip torch==2.13.0
pip "$root"
llmctl="$work/venv/bin/llmctl"
cd "$work"
step() { echo "runtime-only: $*"; "$llmctl" "$@" --quiet; }

# An HTML page and a WARC go through trafilatura/jusText (which need lxml_html_clean).
cat > page.html <<'HTML'
<html><head><title>Tides</title></head><body><nav>Home | About</nav><article>
<h1>How tides work</h1>
<p>Tides are the regular rise and fall of the sea. They are caused by the gravity of the Moon
and the Sun acting on the oceans, and by the rotation of the Earth. Most coasts see two high
tides and two low tides every day, a little under twenty-five hours apart in total.</p>
<p>When the Sun, the Moon and the Earth line up, their pulls add together and the tides are
larger than usual. These are called spring tides. When they are at right angles, the tides are
smaller, and these are called neap tides. Sailors and fishermen have used tide tables for
centuries to plan when to leave and return to harbour safely.</p>
</article><footer>Copyright</footer></body></html>
HTML
step clean "$root/recipes/data/web/sample-0000.warc.gz" page.html --out clean --set language.keep="['en']"
test -s clean/manifest.json
step tokenize clean "$root/tests/data/tinyshakespeare/input.txt" --out tokens --vocab-size 512
step pretrain tokens --out model --preset tiny --steps 5 --batch-size 2 --seq-len 32 --device cpu
step eval model tokens
step generate model --prompt "ROMEO:" --max-new-tokens 8
step export model --format hf --out model-hf
step export model --format gguf --set gguf.type=q8_0 --out model-gguf
step import hf model-hf --out model-back
step generate model-back --prompt "ROMEO:" --max-new-tokens 8
# A llama2.c model (legacy header) and tokenizer, random weights, written with numpy alone.
"$work/venv/bin/python" - <<'PY'
import struct
import numpy as np
pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + [" ", "a", " a"]
dim, hidden, layers, heads, vocab, seq = 16, 32, 1, 2, len(pieces), 16
n = vocab * dim + layers * (2 * dim + 4 * dim * dim + 3 * hidden * dim) + dim + seq * dim // heads
w = np.random.default_rng(0).normal(0, 0.3, n).astype("<f4")
open("tiny.bin", "wb").write(struct.pack("<7i", dim, hidden, layers, heads, heads, vocab, seq) + w.tobytes())
tok = struct.pack("<i", 8) + b"".join(struct.pack("<fi", -i, len(p.encode())) + p.encode() for i, p in enumerate(pieces))
open("tok.bin", "wb").write(tok)
PY
step import llama2c tiny.bin tok.bin --out tiny --license MIT
step generate tiny --prompt "" --max-new-tokens 8
# Without the [ray] extra, --engine ray is one line naming it (exit 2), and nothing is written.
set +e
msg=$("$llmctl" dedup clean --out dedup-ray --engine ray 2>&1)
code=$?
set -e
test "$code" -eq 2 && test "$msg" = "error: --engine ray needs Ray: pip install 'llmctl[ray]'"
test ! -e dedup-ray
step finetune model "$root/recipes/data/sft/identity.jsonl" --out sft --steps 2 --batch-size 2 --device cpu
step generate sft --chat --prompt "Who are you?" --max-new-tokens 8
# lora: on tokens, on instruction records, merged, and applied by generate
step lora model tokens --out adapter --steps 3 --batch-size 2 --seq-len 32 --device cpu
step lora model "$root/recipes/data/sft/identity.jsonl" --out adapter-chat --steps 2 --batch-size 2 --device cpu
step lora model --merge adapter --out merged
step generate model --adapter adapter --prompt "ROMEO:" --max-new-tokens 8
# distill: each kind; the api kind needs httpx (a core dependency). Its teacher here is a
# closed local port, so every prompt fails after its retries: exit 2, one line, no artifact.
student=(--student-preset tiny --set model.n_layer=1 --steps 2 --batch-size 2 --seq-len 32 --device cpu)
step distill tokens --teacher model --kind logit --out d-logit "${student[@]}"
step distill tokens --teacher model --kind feature --out d-feature "${student[@]}"
printf '{"prompt": "ROMEO:"}\n{"prompt": "JULIET:"}\n' > prompts.jsonl
step distill prompts.jsonl --teacher model --kind sequence --out d-seq "${student[@]}" \
  --set gen.max_new_tokens=8 --set val_fraction=0
test -s d-seq/responses.jsonl
rc=0
"$llmctl" distill prompts.jsonl --teacher http://127.0.0.1:9/v1 --kind api --tokenizer tokens \
  --out d-api "${student[@]}" --set api.retries=0 --set api.timeout=2 --quiet 2>api.err || rc=$?
grep -q "no prompt got an answer" api.err && test "$rc" -eq 2 && test ! -e d-api \
  || { echo "runtime-only: distill --kind api did not fail cleanly (rc $rc)"; cat api.err; exit 1; }
step quantize model --out model-int4 --method int4 --set eval_tokens=1024 --set decode_tokens=4
step quantize model --out model-static --method static --calib tokens --set decode_tokens=4
step generate model-int4 --prompt "ROMEO:" --max-new-tokens 8
step eval model-static tokens
# an eval artifact, the lineage back to the raw files, and the report (matplotlib is core)
step eval model tokens --out model-eval
step lineage model-static --json > lineage.json
step report model-eval model-int4 --out report
test -s report/report.html
# align: DPO (cached reference) on the bundled pairs, a reward model, eval RM PAIRS, and
# generate refusing the reward model in one line
head -n 40 "$root/recipes/data/pairs/continuation.jsonl" > pairs.jsonl
step align model pairs.jsonl --out dpo --method dpo --steps 2 --batch-size 2 --seq-len 48 --device cpu
step align model pairs.jsonl --out rm --method reward --steps 2 --batch-size 2 --seq-len 48 --device cpu
step eval rm pairs.jsonl --seq-len 48
# online RL against the reward model, and RLAIF with it as judge (pairs.jsonl, then DPO)
printf '{"prompt": "ROMEO:"}\n{"prompt": "JULIET:"}\n{"prompt": "Who is there?"}\n' > prompts-rl.jsonl
step align model prompts-rl.jsonl --out grpo --method grpo --reward rm --steps 1 --batch-size 2 \
  --device cpu --set group_size=2 --set max_new_tokens=4 --set eval_prompts=1
step align model prompts-rl.jsonl --out rlaif --method rlaif --judge rm --steps 1 --batch-size 2 \
  --device cpu --set rlaif.k=2 --set rlaif.max_new_tokens=4
test -s rlaif/pairs.jsonl
rc=0
"$llmctl" generate rm --prompt "hi" --max-new-tokens 2 2>gen.err || rc=$?
test "$rc" -eq 2 && grep -q "reward model" gen.err \
  || { echo "runtime-only: generate did not refuse the reward model (rc $rc)"; cat gen.err; exit 1; }
echo "runtime-only: every command ran from a plain install"
