"""Attention backends of capture, one file each, as transformers' ``integrations/`` has them:
:mod:`.headatlas` (the fast path: exact per-layer views from a log-sum-exp pass) and :mod:`.eager`
(``output_attentions`` for models that cannot swap backends)."""
