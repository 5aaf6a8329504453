"""The analyses of the paper (SPEC §5), one module each, callable from a notebook.

Each reads caches and trained modules (only the perturbation studies and the trade-off run DETR)
and writes its results, CSVs and figures under ``<root>/analysis/<name>/``; ``invcache analyze
NAME`` and ``invcache report`` are thin CLI layers over them. Shared pieces live once: the
chains in :mod:`invcache.chain`, the workspace layout in :mod:`invcache.workspace`.

- :mod:`~invcache.analysis.stages`: MSE per stage (backbone, encoder, decoder, head) ± 95% CI,
  next to the mean-training-image baseline; bars and a reconstruction grid;
- :mod:`~invcache.analysis.inter_layer`: every encoder and decoder layer through the chains
  (and per-layer modules where trained), MSE curves, grid, linear CKA between all layers
  (:mod:`~invcache.analysis.cka`);
- :mod:`~invcache.analysis.onehot`: head-stage reconstructions, one-hot class input vs softmax scores;
- :mod:`~invcache.analysis.ap`: COCO box AP of DETR from the cached head outputs;
- :mod:`~invcache.analysis.grayscale`, :mod:`~invcache.analysis.color`: the perturbation studies, which
  extract caches of perturbed images once (:mod:`~invcache.analysis.perturbed`);
- :mod:`~invcache.analysis.tradeoff`: DETR and the decoder chain's modules fine-tuned on
  (1 − λ)·L_det + λ·L_rec per λ — it runs DETR on the caches' images, so reads no activations; AP and MSE vs λ;
- :mod:`~invcache.analysis.report`: one self-contained HTML page of a workspace.

Shared pieces: :mod:`~invcache.analysis.common` (evaluation rows, batched whole-shard reads,
modules with the commands that make them, errors with CIs, provenance, the atomic results
writer) and :mod:`~invcache.analysis.figures`.
"""
