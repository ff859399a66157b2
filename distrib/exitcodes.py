"""The process exit codes of ``python -m distrib.train`` and ``python -m distrib.launch``, for
schedulers that decide on retries (a Kubernetes ``podFailurePolicy``, a SLURM requeue script).

=====  ===============  =======================================================================
code   name             meaning, and what a scheduler should do
=====  ===============  =======================================================================
0      ``OK``           training finished (or had already finished): done
1      ``FAILURE``      an unexpected error, or checkpoint saves kept failing (possibly
                        transient): retry within a budget
2      ``PERMANENT``    bad configuration, or checkpoints exist and none can be loaded: do not
                        retry, a human must look
75     ``PREEMPTED``    a preemption notice (SIGTERM, SIGUSR1) arrived; an emergency checkpoint
                        was written: retry, and do not count it as a failure
=====  ===============  =======================================================================

``torchrun`` itself exits 1 whenever a worker fails or it is signalled, whatever the workers'
codes; ``python -m distrib.launch`` (a drop-in for ``torchrun``) passes these codes through.
"""

OK = 0
FAILURE = 1
PERMANENT = 2
PREEMPTED = 75  # EX_TEMPFAIL in sysexits.h: "temporary failure, the user is invited to retry"

NAMES = {OK: "ok", FAILURE: "failure", PERMANENT: "permanent", PREEMPTED: "preempted"}
