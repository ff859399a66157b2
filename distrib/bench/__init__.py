"""Benchmarks: ``python -m distrib.bench`` measures the costs that matter, side by side.

Every figure is the ratio of two things measured in the same run, interleaved, as the median of
several repetitions (see :mod:`distrib.bench.core`). Figures 1-3 and 8 save in this process
(:mod:`distrib.bench.local`), 4-6 and 9 run real 2-rank jobs under torchrun
(:mod:`distrib.bench.jobs`), 7 uploads to a loopback S3 server (:mod:`distrib.bench.s3`).
"""
