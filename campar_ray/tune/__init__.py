"""Hyperparameter search over the two-stage pipeline: Ray Tune + Optuna (TPE) + ASHA.

- :mod:`.space`: the search-space YAML, checked up front, as Optuna distributions.
- :mod:`.stage2`: one trial's stage 2, fitted and scored on validation data only.
- :mod:`.trials`: what trials share and reserve; the scope-``cfar`` trial.
- :mod:`.full_trial`: the scope-``full`` trial (Ray Train inside Tune).
- :mod:`.search`: ``run_search`` (Tuner, searcher, scheduler, resume, outputs).
- :mod:`.report`: the trials table, plots and importances (no Ray).

``run_search`` and ``SearchResult`` load on first use: every scope-``cfar`` trial process
imports this package, and should not pay for the stage-1 stack (torchvision, timm, Ray
Train) that :mod:`.search` pulls in.
"""

from typing import Any

from campar_ray.tune.space import SCOPES, SearchSpace, SearchSpaceError, load_search_space

__all__ = [
    "METRICS",
    "SCOPES",
    "SearchResult",
    "SearchSpace",
    "SearchSpaceError",
    "load_search_space",
    "run_search",
]


def __getattr__(name: str) -> Any:
    if name in ("METRICS", "SearchResult", "run_search"):
        from campar_ray.tune import search

        return getattr(search, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
