"""Scanning: a model's batteries through capture into mergeable statistics, and an atlas.

- :mod:`.config`: :class:`~.config.ScanConfig`, the one way a scan's settings travel.
- :mod:`.scan`: :func:`~.scan.scan`, the whole job.
- :mod:`.stream`: attention batteries batch by batch into :class:`~headatlas.atlas.stats.HeadStats`,
  checkpointed and resumable.
- :mod:`.functional`: the functional batteries, saved one by one, resumable.
- :mod:`.parallel`: Ray workers that hold the model and run shards (the only Ray import).
"""
