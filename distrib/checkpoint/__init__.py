"""The checkpoint layers, each importing only the ones before it:

* :mod:`.storage`: bytes behind a URL (the only fsspec user); :mod:`.preflight` checks locations.
* :mod:`.format`, :mod:`.serialization`, :mod:`.statecheck`: state <-> JSON skeleton + tensor
  bytes, the typed manifest, validation of everything read (never touch storage).
* :mod:`.store`: step directories, the commit protocol, discovery, verification;
  :mod:`.lease`: one writing run per directory.
* :mod:`.checkpointer`: who writes, in the background, what is kept, what is resumed.
* :mod:`.manager`: :class:`~distrib.CheckpointManager`, the public object for any loop.
"""
