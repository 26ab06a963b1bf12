"""Applications: each is a package that reads atlases and calls the layers below it; no
application imports another (what several share lives in :mod:`.common`).

``prune`` (importance, redundancy, pruning), ``verify`` (causal confirmation), ``patch``
(activation/attribution/path patching), ``probe`` (per-head probes), ``steer`` (ITI), ``kv``
(head-wise KV caches), ``guard`` (injection detection), ``interop`` (export/import),
``compare`` (two atlases), ``zoo`` (several models). The package root exposes ``ha.patch``,
``ha.probe``, ``ha.steer``, ``ha.kv`` and ``ha.Guard`` lazily; the command line calls the rest.
"""
