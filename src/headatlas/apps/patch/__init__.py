"""Patching: activation and attribution patching of every head, function vectors
(:mod:`.patching`), and path patching of the IOI circuit (:mod:`.circuit`). Tasks and their metric
are shared with ``verify`` (:mod:`headatlas.apps.common.patch_tasks`)."""
