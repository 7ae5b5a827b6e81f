"""Stage 2, CFAR: collaborative filtering over attribute sets (METHOD.md, eq. 17-20).

- :mod:`.als`: implicit-feedback ALS kernels and the local solver (NumPy only).
- :mod:`.ray_als`: the same ALS with image rows sharded over Ray actors.
- :mod:`.implicit_als`: the same ALS handed to the ``implicit`` library (the reference).
- :mod:`.solver`: ``fit_als(source, settings, solver=...)``, the one entry that picks among the
  three.
- :mod:`.dictionary`: k-means attribute-set dictionary, fold-in, r -> r_hat.
- :mod:`.head`: fc2 on concat(r_hat, logits).
- :mod:`.model`: ``fit_model`` (the one stage-2 fit: logits -> factors, dictionary, fc2),
  ``save_model`` and ``load_predictor``.
- :mod:`.fit`: ``fit_cfar`` (a run's logits -> artefacts + metrics) and ``load_cfar``.

Nothing is imported here, so that an ALS actor importing :mod:`.als` loads neither torch
nor the rest of stage 2.
"""
