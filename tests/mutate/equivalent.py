"""Mutants that no test on this machine can tell from the original, each with its reason.

`make mutate` reports them as "equivalent" and leaves them out of the score (the usual
definition: killed / (mutants - equivalent)). A name is mutmut's (`mutmut show NAME` in the
module's work folder prints the edit); names stay valid while their function is unchanged.
Only edits that no input can detect belong here, or that only a CUDA device could detect
(the suite runs on CPU; the GPU tests cover those paths where a GPU is present). A missing
test is not a reason: write the test.
"""

from __future__ import annotations

CUDA = "CUDA only: the branch or the difference exists only on a CUDA device"

NOOP_CPU = "CUDA only: moving to the device (`.to(dev)`, `device=`) is a no-op on the CPU"
IMPORT = "runs at import, in the warm process, before mutmut picks a mutant: a forking runner "
IMPORT += "cannot reach it"

EQUIVALENT: dict[str, str] = {
    # train/loop.py
    "llmctl.train.loop.x_peak_flops__mutmut_8": CUDA + " (the lookup runs for a CUDA device)",
    "llmctl.train.loop.x_train__mutmut_54": CUDA + " (flops_per_token only feeds MFU, which "
    "needs a GPU's peak FLOPs)",
    "llmctl.train.loop.xǁMetricSumsǁadd__mutmut_16": NOOP_CPU,
    "llmctl.train.loop.xǁ_Runǁ__init____mutmut_112": CUDA + " (deferred checks: CUDA + fused)",
    "llmctl.train.loop.xǁ_Runǁoptimizer_step__mutmut_58": CUDA + " (the deferred branch)",
    "llmctl.train.loop.xǁ_Runǁoptimizer_step__mutmut_59": CUDA + " (the deferred branch)",
    "llmctl.train.loop.xǁ_Runǁoptimizer_step__mutmut_61": CUDA + " (the deferred branch)",
    "llmctl.train.loop.xǁ_Runǁoptimizer_step__mutmut_72": CUDA + " (the deferred branch)",
    "llmctl.train.loop.xǁ_Runǁrecord__mutmut_79": CUDA + " (MFU needs a GPU's peak FLOPs)",
    "llmctl.train.loop.xǁ_Runǁrecord__mutmut_108": CUDA + " (MFU needs a GPU's peak FLOPs)",
    "llmctl.train.loop.xǁ_Runǁrecord__mutmut_26": CUDA + " (on the CPU every step settles, "
    "which zeroes the unclocked tokens: `=` and `+=` add the same)",
    "llmctl.train.loop.xǁ_Runǁfinish__mutmut_11": CUDA + " (MFU needs a GPU's peak FLOPs)",
    "llmctl.train.loop.xǁ_Runǁforward_backward__mutmut_11": NOOP_CPU,
    "llmctl.train.loop.xǁ_Runǁforward_backward__mutmut_31": "no_sync acts only on a DDP/FSDP "
    "module under a process group; in one process it is a null context whatever `last` is",
    "llmctl.train.loop.xǁ_Runǁoptimizer_step__mutmut_63": CUDA + " (the deferred branch)",
    "llmctl.train.loop.xǁ_Runǁsave__mutmut_32": "gather_json returns [obj] without a process "
    "group; its device is read only under one",
    "llmctl.train.loop.xǁ_Runǁsettle__mutmut_43": CUDA + " (settle's norm check fires only when "
    "the check is deferred; the CPU path stops in optimizer_step first)",
    "llmctl.train.loop.xǁWriterǁrewind__mutmut_6": "encoding=None is the locale's, UTF-8 "
    "under every locale Python 3.11 runs in here (C is coerced to C.UTF-8)",
    # train/objectives.py
    "llmctl.train.objectives.xǁMaskedLMǁmask__mutmut_10": NOOP_CPU,
    "llmctl.train.objectives.xǁMaskedLMǁmask__mutmut_16": NOOP_CPU,
    "llmctl.train.objectives.xǁMaskedLMǁmask__mutmut_30": NOOP_CPU,
    # train/state.py
    "llmctl.train.state.x__options__mutmut_1": "strict is read only by set_model_state_dict, "
    "which restore() calls with strict=False explicitly",
    "llmctl.train.state.x_restore__mutmut_49": "AdamW takes betas as a list as well as a tuple; "
    "the state saves them as a JSON list either way",
    "llmctl.train.state.x_restore__mutmut_79": "gather only matters under a process group "
    "(cpu_offload = gather and distributed)",
    "llmctl.train.state.x_rng_state__mutmut_9": CUDA + " (CUDA generators)",
    "llmctl.train.state.x_save_state__mutmut_98": "only differs when deleting a leftover fails, "
    "which root on a local disk cannot provoke",
    "llmctl.train.state.x_set_rng_state__mutmut_24": "numpy's set_state converts the key array "
    "to uint32 itself",
    # model/sample.py
    "llmctl.model.sample.x__beam_search__mutmut_11": "the pad id only fills positions the "
    "attention mask hides (beam prompts are left-padded)",
    "llmctl.model.sample.x__beam_search__mutmut_65": "torch.full infers int64 from the int pad id",
    "llmctl.model.sample.xǁHistoryǁappend__mutmut_38": "strict=True only checks lengths that "
    "are equal by construction (one n-gram table per row)",
    "llmctl.model.sample.xǁRunnerǁ__init____mutmut_105": "sum over dim +1 and -1 of a 2-D mask "
    "is the same sum",
    "llmctl.model.sample.xǁRunnerǁprefill__mutmut_30": "logits_to_keep=1 only saves computing "
    "logits the caller drops ([:, -1] is taken either way)",
    # data/filters.py
    "llmctl.data.filters.x__ngrams__mutmut_1": "strict=None is falsy like strict=False",
    "llmctl.data.filters.x_word_class__mutmut_13": "a letter is a non-symbol character, so bit 1 "
    "is set whenever bit 2 is: 1 | 3 == 1 | 2",
    "llmctl.data.filters.xǁFineWebǁ__call____mutmut_36": "the floor only acts on a text of at "
    "most one character, which has no duplicate line: the ratio is 0 either way",
    "llmctl.data.filters.xǁLanguageǁ__call____mutmut_41": "fastText returns as many scores as "
    "labels: strict=True never fires",
    # data/dedup.py
    "llmctl.data.dedup.x_minhash__mutmut_51": "axis=0 is reduceat's default",
    # artifacts.py
    "llmctl.artifacts.x_input_ref__mutmut_7": "verify=None is falsy like verify=False",
    "llmctl.artifacts.xǁBuilderǁpublish__mutmut_60": "sort_keys=None is falsy like False",
    "llmctl.artifacts.xǁBuilderǁpublish__mutmut_104": "only differs when deleting the replaced "
    "artifact fails, which root on a local disk cannot provoke",
    "llmctl.artifacts.xǁBuilderǁpublish__mutmut_51": "'UTF-8' and 'utf-8' name the same codec",
    "llmctl.artifacts.xǁBuilderǁpublish__mutmut_101": "publish's return value is dropped by "
    "its one caller, building(), which yields the Builder instead",
    # model/quant.py
    "llmctl.model.quant.xǁInt4Linearǁfrom_weight__mutmut_10": "the bias buffer is registered "
    "(as None) either way, and from_weight assigns the bias to it when there is one",
    "llmctl.model.quant.x_int4_codes__mutmut_35": "the nibbles stay float32 (exact integers "
    "0..15) instead of int32: every caller packs them into uint8 with the same values",
    "llmctl.model.quant.x_int4_codes__mutmut_26": "with zero points the lower clamp never "
    "binds: round(g/s) >= round(min/s) = -z for every g of the group (round is odd-symmetric)",
    "llmctl.model.quant.xǁInt8Embeddingǁforward__mutmut_2": "int8 rows times the scale promote "
    "to the scale's dtype: the same values as casting the rows first (int8 is exact there)",
    # model/rwkv.py
    "llmctl.model.rwkv.x_wkv_chunked__mutmut_24": "the extra pass at off == L combines empty "
    "slices (a[:, :-L], a[:, L:]): it changes nothing",
    "llmctl.model.rwkv.x_wkv_chunked__mutmut_79": NOOP_CPU,
    "llmctl.model.rwkv.x_wkv_empty__mutmut_8": NOOP_CPU,
    "llmctl.model.rwkv.xǁRWKVConfigǁ__post_init____mutmut_19": "the annotations are strings "
    "like 'int | None' with single spaces: split() and split(' ') cut them the same",
    "llmctl.model.rwkv.xǁRWKVǁforward__mutmut_73": "checkpointing a block recomputes the same "
    "values in backward: outputs and gradients are bitwise the same, only memory and time differ",
    "llmctl.model.rwkv.xǁRWKVǁforward__mutmut_92": "logits_to_keep = 0 slices hidden[:, -0:], "
    "which is all of it",
    # model/lora.py
    "llmctl.model.lora.x__register__mutmut_1": IMPORT,
    "llmctl.model.lora.x__register__mutmut_3": IMPORT,
    "llmctl.model.lora.x_add_lora__mutmut_30": "bias=None is falsy like bias=False",
    "llmctl.model.lora.x_apply_lora__mutmut_40": "the last part of rsplit('.', 2) is the last "
    "part of rsplit('.', 1)",
    "llmctl.model.lora.xǁLoRALayerǁmerge__mutmut_16": NOOP_CPU,
    "llmctl.model.lora.x_add_lora__mutmut_36": NOOP_CPU,
    "llmctl.model.lora.x_add_lora__mutmut_65": "disabled=None is falsy like False (it is only "
    "read by `if self.disabled`, and adapters_disabled restores what it found)",
    # train/preference.py
    "llmctl.train.preference.x__mean__mutmut_3": NOOP_CPU,
    "llmctl.train.preference.xǁKTOObjectiveǁ__call____mutmut_113": NOOP_CPU,
    "llmctl.train.preference.xǁPairObjectiveǁ__call____mutmut_109": NOOP_CPU,
    # train/online.py
    "llmctl.train.online.x__common_metrics__mutmut_5": NOOP_CPU,
    "llmctl.train.online.x_attach_value_head__mutmut_7": "bias=True is nn.Linear's default",
    "llmctl.train.online.x_grpo_loss__mutmut_18": "mask.to(None) keeps the integer mask: "
    "float * int and float / int promote to the same float values",
    # train/reference.py
    "llmctl.train.reference.x_cached_reference_logps__mutmut_49": "the pad id of right-padded "
    "rows: a causal model never attends forward and padded positions are masked out of the "
    "sums, so no log-prob depends on it",
    "llmctl.train.reference.x_cached_reference_logps__mutmut_76": "the temporary file's "
    "suffix: it is renamed into place either way",
    "llmctl.train.reference.x_score_model__mutmut_23": "an internal check that no model here can "
    "fail: loading an LM's weights without lm_head misses exactly score.weight, unexpects none",
}

# Survivors that are not equivalent but stay, each with why: they count against the score.
KNOWN: dict[str, str] = {
    "llmctl.train.loop.xǁ_Runǁrecord__mutmut_90": "a progress-bar field's name: the bar is "
    "drawn only on a terminal, and no test reads it",
    "llmctl.model.quant.x__kernel_ok__mutmut_5": "which path runs (CPU integer kernel or "
    "dequantize + F.linear) is a speed matter: both agree to the tests' tolerance",
    "llmctl.model.quant.x__kernel_ok__mutmut_6": "which path runs (CPU integer kernel or "
    "dequantize + F.linear) is a speed matter: both agree to the tests' tolerance",
    "llmctl.model.quant.xǁInt4Linearǁforward__mutmut_6": "which path runs (CPU integer kernel "
    "or dequantize + F.linear) is a speed matter: both agree to the tests' tolerance",
    "llmctl.data.filters.xǁLanguageǁ__call____mutmut_5": "k=-1 (every label) vs the default "
    "k=1 only shows on a text whose second language is kept under a threshold < 0.5; the "
    "tests use the shipped lid model on one-language texts",
    "llmctl.model.sample.x__speculative_steps__mutmut_199": "desyncs the draft's pending "
    "tokens: the draft proposes worse tokens (speed), the target's verification keeps the "
    "output exact, so no output can show it",
}
