"""The modules `make mutate` mutates, each with the test files that cover it.

Adding a module is one line here: its path under src/llmctl/ and the test files whose tests
must kill its mutants (mutmut then runs, per mutant, only those of these tests that call the
mutated function). `SAMPLE` caps the mutants drawn per module (deterministic, seeded) so the
whole run stays under 90 minutes on the project's 2-core machine; a module's own entry in
`SAMPLE_OF` overrides it (docs/testing.md has the measured times behind these numbers).
"""

from __future__ import annotations

MODULES: dict[str, list[str]] = {
    "train/loop.py": ["tests/test_resume_random.py", "tests/test_train_log.py",
                      "tests/test_train_loop.py", "tests/test_train_extensions.py"],
    "train/objectives.py": ["tests/test_objectives_edges.py", "tests/test_resume_random.py",
                            "tests/test_train_loop.py"],
    "train/state.py": ["tests/test_resume_random.py", "tests/test_state_files.py",
                       "tests/test_train_loop.py", "tests/test_train_extensions.py"],
    "model/sample.py": ["tests/test_sample_boundaries.py", "tests/test_sample_history.py",
                        "tests/test_sample_beam_batch.py", "tests/test_sample.py"],
    "data/filters.py": ["tests/test_filters_edges.py", "tests/test_filters.py"],
    "data/dedup.py": ["tests/test_dedup_shuffle.py", "tests/test_dedup.py"],
    "artifacts.py": ["tests/test_artifact_inputs.py", "tests/test_artifact_manifest.py",
                     "tests/test_artifacts.py"],
    "train/distill.py": ["tests/test_distill_edges.py", "tests/test_distill.py"],
    "model/quant.py": ["tests/test_quant_observers.py", "tests/test_quantize.py"],
    "model/rwkv.py": ["tests/test_rwkv_edges.py", "tests/test_rwkv.py"],
    "model/lora.py": ["tests/test_lora_edges.py", "tests/test_lora.py"],
    "train/preference.py": ["tests/test_preference_edges.py", "tests/test_align.py"],
    "train/online.py": ["tests/test_online_edges.py", "tests/test_online.py"],
    "train/reference.py": ["tests/test_reference.py", "tests/test_align.py"],
}  # fmt: skip

# Mutants sampled per module (all of them when a module has fewer).
SAMPLE = 60
SAMPLE_OF: dict[str, int] = {}
SEED = 0
