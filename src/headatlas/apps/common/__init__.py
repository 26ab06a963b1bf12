"""Code several applications share; an application imports another only through here.

- :mod:`.evaluation`: held-out text, loss and perplexity, head gates (importance, pruning,
  redundancy).
- :mod:`.logreg`: the one logistic regression (per-head probes, steering, the guard).
- :mod:`.formats`: other tools' head-annotation files (DuoAttention, HeadKV, Attention Tracker, …).
- :mod:`.patch_tasks`: prompt pairs with answers (IOI, function-vector tasks, pair files) and their
  metric (patching, circuits, verify).
- :mod:`.probe_tasks`: labelled items for probes (POS, relations, truth) and their splits
  (probes, steering).
- :mod:`.head_features`: every head's output at an item's positions (probes, steering).
- :mod:`.kv_heads`: the one rule from atlas scores to KV-head scores (KV plans, exports).
"""
