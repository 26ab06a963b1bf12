"""The atlas: the table every stage shares (:mod:`.table`: one row per head, saved as Parquet +
JSON), its schema (:mod:`.schema`) and the mergeable statistics scans aggregate into
(:mod:`.stats`, which needs torch and is imported on its own).

Importing this package does not import torch, so ``show``, ``report`` and ``serve DIR --no-live``
stay light.
"""

from .table import Atlas, Example, check_same_model, merge_atlases, open_atlas

__all__ = ["Atlas", "Example", "check_same_model", "merge_atlases", "open_atlas"]
