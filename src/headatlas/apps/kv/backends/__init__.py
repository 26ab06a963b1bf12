"""The KV app's attention backends, one file each: :mod:`.headwise` (attention over a head-wise
cache whose KV heads hold different token counts) and :mod:`.gate` (DuoAttention's α-gated mix of
full and streaming attention, for ``kv fit``)."""
