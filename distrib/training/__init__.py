"""The training loop: :class:`~distrib.Trainer` (:mod:`.trainer`, a user of the checkpoint
manager, with its own state in :mod:`.trainstate`), early stopping, the resumable sampler,
streams (:mod:`.data`) and optimizers."""
