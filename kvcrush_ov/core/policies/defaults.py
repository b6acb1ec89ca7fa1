"""The settings every policy (ours and the translation to openvino-genai's) starts from, in one place.

Shared so that comparisons differ only in the method: protected first tokens and a short recent window
are what made SnapKV usable on SmolLM2 (a 4-sink StreamingLLM default lost the needle; measurements in
docs/eval)."""

SINK_TOKENS = 32            # first tokens always kept (attention sinks)
RECENT_TOKENS = 64          # newest tokens always kept
# Observation window: the newest queries whose attention scores the cache. It must reach the question
# itself: a chat prompt ends with an instruction ("Answer with the number only.") and the template's
# tail, which a shorter window sees alone; a much longer one spends the budget on the prompt's end
# (measured on tuning seeds: docs/eval/window.md).
SNAPKV_WINDOW = 12
# Compactions inside a prompt (memory-bounded prefill) also keep this many tokens after a well-scored
# one: the question that will ask for a fact has not been read, and its cue scores better than its
# value (a number lost its last digits without it; tuning seeds, docs/long-prompts.md).
PREFILL_POOL_BACK = 6
POOL_KERNEL = 11            # SnapKV max-pool width: a kept token brings its neighbours (multi-token answers)
ACCUMULATION_WINDOW = 32    # queries scored per eviction by policies without a window of their own (H2O)
