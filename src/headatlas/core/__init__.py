"""The ground floor: what every later layer shares and nothing here imports torch.

- :mod:`.errors`: :class:`~.errors.HeadatlasError` (one-line messages that name parameters) and
  the validators every stage uses.
- :mod:`.storage`: atomic writes of files and directories, the files an atlas directory owns, the
  directory lock, the cache directory.
- :mod:`.outputs`: the one output check every command runs before any work.
- :mod:`.records`: small schemas for the files headatlas reads back.
- :mod:`.heads`: a head's one display name (``L3H1``), every input spelling, the index validator.
- :mod:`.scores`: one :class:`~.scores.ScoreSpec` per score (label, meaning, battery, paper).
- :mod:`.roles`: the role thresholds, in one place.
- :mod:`.jsonl`: the one reader of JSON-lines files.
- :mod:`.progress`: the progress-callback type every long job takes.
- :mod:`.lazy`: the lazy ``__getattr__`` of packages that export names without importing them.
"""
