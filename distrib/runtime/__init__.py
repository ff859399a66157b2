"""The runtime layer: the process group and the only collectives (:mod:`.dist`), preemption
notices (:mod:`.preemption`), seeds and RNG state (:mod:`.rng`), how the model is wrapped and
who writes (:mod:`.strategy`), rank-aware logging (:mod:`.logs`). Imports nothing of distrib
above :mod:`distrib.config`."""
