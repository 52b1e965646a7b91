"""The per-sample squared-gradient engine behind ``exact``, ``mc`` and ``fisher`` (private).

Given ``K`` vectors per sample in logit space (the estimator's factor of the loss curvature), the engine adds
``Σ_samples Σ_columns (Jᵀ s)²`` for every parameter. It is split along two axes:

* the layer kind, one module each: :mod:`.linear`, :mod:`.conv`, :mod:`.batchnorm`, each a
  :class:`~.base.LayerRule` registered in the one ``{module type: rule}`` map :data:`.registry.RULES` (a rule owns its
  per-sample element count, its checks and its products);
* the machinery common to all kinds: :mod:`.capture` (the forward pass with hooks), :mod:`.planner` (segments, cut
  points, pool links, memory budget), :mod:`.backward` (the backward passes, segment by segment) and
  :mod:`.buffers` (scratch memory).
"""
