"""Stage 2, CFAR: collaborative filtering over attribute sets (METHOD.md, eq. 17-20).

- :mod:`.als`: implicit-feedback ALS kernels, the local and ``implicit`` solvers, ``fit_als``.
- :mod:`.ray_als`: the same ALS with image rows sharded over Ray actors.
- :mod:`.dictionary`: k-means attribute-set dictionary, fold-in, r -> r_hat.
- :mod:`.head`: fc2 on concat(r_hat, logits).
- :mod:`.fit`: ``fit_cfar`` (logits -> artefacts + metrics) and ``load_cfar``.

Nothing is imported here, so that an ALS actor importing :mod:`.als` loads neither torch
nor the rest of stage 2.
"""
