# The full build as a chain of artifacts. Each target is an artifact's manifest.json, which
# llmctl writes last and publishes with one rename, so make only ever trusts complete stages and
# an interrupted build continues where it stopped (training commands resume from their
# in-progress state, exactly: the weights come out byte-identical).
#
#   raw text ─clean─▶ clean ─dedup─▶ dedup ─tokenize─▶ tokens ─pretrain─▶ model
#   model ─┬─ eval-model, samples-model
#          ├─ finetune ─▶ sft ─┬─ chat-sft, eval-sft
#          │                   ├─ export ─▶ gguf
#          │                   ├─ align (DPO, pairs) ─▶ dpo ─ chat-dpo, eval-dpo
#          │                   └─ align (reward) ─▶ rm ─┬─ align (GRPO vs rm) ─▶ grpo ─ chat, eval
#          │                                            └─ align (RLAIF, rm judges) ─▶ rlaif ─ ...
#          ├─ lora ─▶ lora ─── lora-chat
#          ├─ distill (a smaller student, logits on tokens) ─▶ distill ─ eval-distill, samples-distill
#          └─ quantize ─▶ q-int8, q-int4, q-static, q-qat ─ eval-q-*, samples-q-*
#   everything ─report─▶ report/report.html
#
#   make -f recipes/build.mk PRESET=small OUT=out LLMCTL=.venv/bin/llmctl all   (make -j2 works)
#
# Settings per stage live in recipes/$(PRESET)/<stage>.toml; editing one reruns that stage and
# what follows it only. Every rule passes --force: make reruns a stage only when an input or
# its TOML is newer than its manifest, and then the old artifact is to be replaced.

LLMCTL ?= llmctl
# Training stages (pretrain, finetune, lora, distill) run through TRAIN: on several GPUs,
# TRAIN="torchrun --nproc-per-node 8 --no-python llmctl" (multi-node: add --nnodes,
# --node-rank, --rdzv-endpoint); rank 0 publishes, so make sees one artifact either way.
TRAIN  ?= $(LLMCTL)
PRESET ?= small
OUT    ?= out
DATA   ?= recipes/data
CORPUS ?= $(DATA)/web $(DATA)/books $(DATA)/wiki
SFT_DATA ?= $(DATA)/sft
CHAT   ?= Who are you?
CFG    := recipes/$(PRESET)
PROMPT ?= The history of

m = $(OUT)/$(1)/manifest.json

CLEAN    := $(call m,clean)
DEDUP    := $(call m,dedup)
TOKENS   := $(call m,tokens)
MODEL    := $(call m,model)
SFT      := $(call m,sft)
LORA     := $(call m,lora)
LCHATS   := $(call m,lora-chat)
DISTILL  := $(call m,distill)
GGUF     := $(call m,gguf)
REPORT   := $(call m,report)

DPO      := $(call m,dpo)
RM       := $(call m,rm)
GRPO     := $(call m,grpo)
RLAIF    := $(call m,rlaif)
PAIRS   ?= $(DATA)/pairs/continuation_shuffle.jsonl
PROMPTS ?= $(DATA)/prompts/prompts.jsonl

# The align stages a preset runs: dpo always; rm + grpo and rlaif when it has their TOMLs.
ALIGNED := dpo $(if $(wildcard $(CFG)/grpo.toml),grpo) $(if $(wildcard $(CFG)/rlaif.toml),rlaif)

# Checkpoints that get an eval artifact (val bits per byte on the tokens' whole val split; the
# quantized ones too, so the report's table compares every model on the same tokens, not on the
# quantize report's capped sample), and the ones sampled with a plain prompt or a chat turn.
# The reward model joins the report as it is (its held-out pairwise accuracy; it does not
# generate).
QUANT       := int8 int4 static qat
CHECKPOINTS := model sft distill $(ALIGNED) $(QUANT:%=q-%)
PLAIN       := model distill $(QUANT:%=q-%)
CHATTERS    := sft $(ALIGNED)

QUANTIZED := $(foreach q,$(QUANT),$(call m,q-$(q)))
EVALS     := $(foreach c,$(CHECKPOINTS),$(call m,eval-$(c)))
SAMPLES   := $(foreach c,$(PLAIN),$(call m,samples-$(c)))
CHATS     := $(foreach c,$(CHATTERS),$(call m,chat-$(c)))
# The GGUF export where the preset has export.toml (rwkv-tiny has none: llama.cpp has no RWKV-4).
LEAVES    := $(EVALS) $(SAMPLES) $(CHATS) $(LCHATS) $(QUANTIZED) \
             $(if $(wildcard $(CFG)/export.toml),$(GGUF)) $(if $(wildcard $(CFG)/rm.toml),$(RM))

.PHONY: all report
# Every manifest is named explicitly above (LEAVES and the stage variables), so none is an
# intermediate file: a deleted artifact is rebuilt. (A bare `.SECONDARY:` would make them all
# intermediate, and make would then skip a missing one whose dependents look up to date.)
# PRECIOUS: an interrupted stage's manifest is never deleted by make (llmctl writes it last).
.PRECIOUS: $(OUT)/%/manifest.json

all: $(REPORT)
	@echo "report: $(OUT)/report/report.html"

report: $(REPORT)

$(CLEAN): $(CFG)/clean.toml $(wildcard $(addsuffix /*,$(CORPUS)))
	$(LLMCTL) clean $(CORPUS) --out $(OUT)/clean --config $(CFG)/clean.toml --force

$(DEDUP): $(CLEAN) $(CFG)/dedup.toml
	$(LLMCTL) dedup $(OUT)/clean --out $(OUT)/dedup --config $(CFG)/dedup.toml --force

$(TOKENS): $(DEDUP) $(CFG)/tokenize.toml
	$(LLMCTL) tokenize $(OUT)/dedup --out $(OUT)/tokens --config $(CFG)/tokenize.toml --force

$(MODEL): $(TOKENS) $(CFG)/pretrain.toml
	$(TRAIN) pretrain $(OUT)/tokens --out $(OUT)/model --config $(CFG)/pretrain.toml --force

$(SFT): $(MODEL) $(CFG)/finetune.toml $(wildcard $(SFT_DATA)/*.jsonl)
	$(TRAIN) finetune $(OUT)/model $(SFT_DATA) --out $(OUT)/sft --config $(CFG)/finetune.toml --force

$(LORA): $(MODEL) $(CFG)/lora.toml $(wildcard $(SFT_DATA)/*.jsonl)
	$(TRAIN) lora $(OUT)/model $(SFT_DATA) --out $(OUT)/lora --config $(CFG)/lora.toml --force

# the adapter applied by generate (the merge `lora --merge` would write); greedy, so the answer
# shows whether the tuned model ends its turn (finish_reason "stop")
$(LCHATS): $(LORA)
	$(LLMCTL) generate $(OUT)/model --adapter $(OUT)/lora --chat --prompt "$(CHAT)" \
		--max-new-tokens 48 --out $(OUT)/lora-chat --force

# a smaller student (distill.toml: its preset and sizes) matching the pretrained teacher's
# next-token distributions on the pretraining tokens
$(DISTILL): $(MODEL) $(TOKENS) $(CFG)/distill.toml
	$(TRAIN) distill $(OUT)/tokens --teacher $(OUT)/model --out $(OUT)/distill \
		--config $(CFG)/distill.toml --force

# one TOML per method (quantize-int8.toml, ...); the tokens calibrate (static), train (qat)
# and score the before/after report on their val split
$(OUT)/q-%/manifest.json: $(MODEL) $(TOKENS) $(CFG)/quantize-%.toml
	$(LLMCTL) quantize $(OUT)/model --calib $(OUT)/tokens --out $(OUT)/q-$* \
		--config $(CFG)/quantize-$*.toml --force

$(GGUF): $(SFT) $(CFG)/export.toml
	$(LLMCTL) export $(OUT)/sft --format gguf --out $(OUT)/gguf --config $(CFG)/export.toml --force

# --- align: DPO on the bundled pairs; the RLHF route (a reward model, then GRPO against it) and
# RLAIF (the reward model judging sampled answers, then DPO on the pairs) where the preset has
# their TOMLs (tiny does; small keeps to DPO for its time budget)
$(DPO): $(SFT) $(CFG)/dpo.toml $(PAIRS)
	$(TRAIN) align $(OUT)/sft $(PAIRS) --out $(OUT)/dpo --config $(CFG)/dpo.toml --force

$(RM): $(SFT) $(CFG)/rm.toml $(PAIRS)
	$(TRAIN) align $(OUT)/sft $(PAIRS) --out $(OUT)/rm --config $(CFG)/rm.toml --force

$(GRPO): $(SFT) $(RM) $(CFG)/grpo.toml $(PROMPTS)
	$(TRAIN) align $(OUT)/sft $(PROMPTS) --reward $(OUT)/rm --out $(OUT)/grpo \
		--config $(CFG)/grpo.toml --force

$(RLAIF): $(SFT) $(RM) $(CFG)/rlaif.toml $(PROMPTS)
	$(TRAIN) align $(OUT)/sft $(PROMPTS) --method rlaif --judge $(OUT)/rm --out $(OUT)/rlaif \
		--config $(CFG)/rlaif.toml --force

$(OUT)/eval-%/manifest.json: $(OUT)/%/manifest.json $(TOKENS) $(CFG)/eval.toml
	$(LLMCTL) eval $(OUT)/$* $(OUT)/tokens --out $(OUT)/eval-$* --config $(CFG)/eval.toml --force

$(OUT)/samples-%/manifest.json: $(OUT)/%/manifest.json $(CFG)/generate.toml
	$(LLMCTL) generate $(OUT)/$* --prompt "$(PROMPT)" --out $(OUT)/samples-$* \
		--config $(CFG)/generate.toml --force

# greedy chat turns, as for lora-chat
$(OUT)/chat-%/manifest.json: $(OUT)/%/manifest.json
	$(LLMCTL) generate $(OUT)/$* --chat --prompt "$(CHAT)" --max-new-tokens 48 \
		--out $(OUT)/chat-$* --force

$(REPORT): $(LEAVES) $(CFG)/report.toml
	$(LLMCTL) report $(patsubst %/manifest.json,%,$(LEAVES)) --out $(OUT)/report --config $(CFG)/report.toml --force
