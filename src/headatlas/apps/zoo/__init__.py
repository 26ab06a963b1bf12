"""Several models scanned alike and compared by role counts and relative depth (:mod:`.scans`)."""
