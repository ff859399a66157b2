"""Run records (:mod:`.events`: JSON lines rank 0 writes, anyone reads back) and the report's
picture (:mod:`.plot`)."""
