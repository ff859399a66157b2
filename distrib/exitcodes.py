"""The process exit codes of ``python -m distrib.train``, for schedulers that decide on retries.

=====  ==================  ================================================================
code   name                meaning and what a scheduler should do
=====  ==================  ================================================================
0      ``OK``              training finished (or had already finished): do not run again
1      ``FAILURE``         an unexpected error (possibly transient): retry within a budget
2      ``PERMANENT``       bad configuration or an unrecoverable checkpoint: do not retry
=====  ==================  ================================================================
"""

OK = 0
FAILURE = 1
PERMANENT = 2
