# The full build as a chain of artifacts: raw text -> clean -> dedup -> tokenize -> pretrain
# -> eval + generate, and pretrain -> finetune (recipes/data/sft) -> generate --chat, and
# pretrain -> lora (the same data) -> generate --adapter --chat. Each target is an artifact's
# manifest.json, which llmctl writes last and publishes with one rename, so make only ever
# trusts complete stages and an interrupted build continues where it stopped (training
# commands resume from their in-progress state).
#
#   make -f recipes/build.mk PRESET=small OUT=out LLMCTL=.venv/bin/llmctl all
#
# Settings per stage live in recipes/$(PRESET)/<stage>.toml.

LLMCTL ?= llmctl
PRESET ?= small
OUT    ?= out
DATA   ?= recipes/data
CORPUS := $(DATA)/web $(DATA)/books $(DATA)/wiki
SFT_DATA ?= $(DATA)/sft
CHAT   ?= Who are you?
CFG    := recipes/$(PRESET)
PROMPT ?= The history of

CLEAN    := $(OUT)/clean/manifest.json
DEDUP    := $(OUT)/dedup/manifest.json
TOKENS   := $(OUT)/tokens/manifest.json
MODEL    := $(OUT)/model/manifest.json
SAMPLES  := $(OUT)/samples/manifest.json
SFT      := $(OUT)/sft/manifest.json
CHATS    := $(OUT)/chat/manifest.json
LORA     := $(OUT)/lora/manifest.json
LCHATS   := $(OUT)/lora-chat/manifest.json
EVAL     := $(OUT)/eval.json

.PHONY: all
all: $(SAMPLES) $(EVAL) $(CHATS) $(LCHATS)
	@echo "built $(OUT): clean -> dedup -> tokens -> model -> samples, eval in $(EVAL); model -> sft -> chat; model -> lora -> lora-chat"

$(CLEAN): $(CFG)/clean.toml $(wildcard $(addsuffix /*,$(CORPUS)))
	$(LLMCTL) clean $(CORPUS) --out $(OUT)/clean --config $(CFG)/clean.toml --force

$(DEDUP): $(CLEAN) $(CFG)/dedup.toml
	$(LLMCTL) dedup $(OUT)/clean --out $(OUT)/dedup --config $(CFG)/dedup.toml --force

$(TOKENS): $(DEDUP) $(CFG)/tokenize.toml
	$(LLMCTL) tokenize $(OUT)/dedup --out $(OUT)/tokens --config $(CFG)/tokenize.toml --force

$(MODEL): $(TOKENS) $(CFG)/pretrain.toml
	$(LLMCTL) pretrain $(OUT)/tokens --out $(OUT)/model --config $(CFG)/pretrain.toml --force

# eval writes plain JSON through a temporary name, so a failed run leaves no eval.json behind.
$(EVAL): $(MODEL) $(TOKENS)
	$(LLMCTL) eval $(OUT)/model $(OUT)/tokens --json > $@.tmp && mv $@.tmp $@

$(SAMPLES): $(MODEL) $(CFG)/generate.toml
	$(LLMCTL) generate $(OUT)/model --prompt "$(PROMPT)" --out $(OUT)/samples \
		--config $(CFG)/generate.toml --force

$(SFT): $(MODEL) $(CFG)/finetune.toml $(wildcard $(SFT_DATA)/*.jsonl)
	$(LLMCTL) finetune $(OUT)/model $(SFT_DATA) --out $(OUT)/sft --config $(CFG)/finetune.toml --force

# greedy, so the answer shows whether the tuned model ends its turn (finish_reason "stop")
$(CHATS): $(SFT)
	$(LLMCTL) generate $(OUT)/sft --chat --prompt "$(CHAT)" --max-new-tokens 48 --out $(OUT)/chat \
		--force

$(LORA): $(MODEL) $(CFG)/lora.toml $(wildcard $(SFT_DATA)/*.jsonl)
	$(LLMCTL) lora $(OUT)/model $(SFT_DATA) --out $(OUT)/lora --config $(CFG)/lora.toml --force

# the adapter applied by generate (the merge `lora --merge` would write), greedy as above
$(LCHATS): $(LORA)
	$(LLMCTL) generate $(OUT)/model --adapter $(OUT)/lora --chat --prompt "$(CHAT)" \
		--max-new-tokens 48 --out $(OUT)/lora-chat --force
