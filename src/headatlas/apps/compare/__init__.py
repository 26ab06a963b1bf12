"""Two atlases side by side (:mod:`.diff`): rank correlation per score, top-k overlap, role changes."""
