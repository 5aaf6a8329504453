"""The analyses of the paper (SPEC §5), one module each, callable from a notebook.

Each reads caches and trained modules only (never DETR) and writes its results, CSVs and
figures under ``<root>/analysis/<name>/``; ``invcache analyze NAME`` and ``reconstruct``
are thin CLI layers over them. Shared pieces live once: the chains in :mod:`invcache.chain`,
the workspace layout in :mod:`invcache.workspace`.

- :mod:`invcache.analysis.reconstruct`: reconstructions from every stage, per-image MSE,
  grid, next to the mean-training-image baseline.
"""
