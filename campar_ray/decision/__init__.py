"""The decision: from stage-1 logits to the probabilities and present/absent calls a run makes.

One owner for every step between a network's (or a logits file's) outputs and a prediction,
used by the bundle, fit-cfar's metrics, a search trial, the metrics table, the bench scripts
and, as the reference the torch export is checked against, the export:

- :mod:`.logits`: which logits a run predicts from (``model.predict_from``; specific, else
  shared), which CFAR refines, and logits -> probabilities;
- :mod:`.refine`: stage 2's refinement of stage-1 logits (r -> r_hat -> fc2), given the fitted
  parts;
- :mod:`.thresholds`: the threshold of each protocol, chosen on validation data;
- :mod:`.calibration`: per-attribute logit offsets fitted on validation data, saved with the
  run and the bundle, so that a calibrated model decides at 0.5;
- :mod:`.figures`: every source's figures on a split under a protocol, and how a printed
  figure names its split, source and protocol.

Ray-free and torch-free: it works on NumPy arrays (a torch tensor is converted once, in
:func:`.logits.as_array`), so an ALS actor that reads logits pays for neither.
"""

from campar_ray.decision.calibration import (
    CALIBRATED,
    DECISION_PROTOCOLS,
    Calibration,
    calibrated_probabilities,
    check_decision,
    fit_calibration,
    fit_run_calibration,
    read_calibration,
    run_calibration,
    save_calibration,
)
from campar_ray.decision.figures import (
    SourceFigures,
    figure_line,
    figure_table,
    score_sources,
)
from campar_ray.decision.logits import (
    CFAR_FROM,
    StageOneLogits,
    as_array,
    cfar_logits,
    logits_name,
    prediction_logits,
    probabilities,
)
from campar_ray.decision.refine import Combiner, Reconstructor, Refiner, reconstruction, refine
from campar_ray.decision.sources import (
    CFAR_SOURCE,
    SOURCE_LABELS,
    final_logits,
    final_source,
    source_probabilities,
    stage1_source,
)
from campar_ray.decision.thresholds import (
    CFAR_PROTOCOL,
    FIXED,
    VAL_PROTOCOLS,
    Threshold,
    eval_columns,
    protocol_threshold,
    run_threshold,
    source_thresholds,
    validation_threshold,
)

__all__ = [
    "CALIBRATED",
    "CFAR_FROM",
    "CFAR_PROTOCOL",
    "CFAR_SOURCE",
    "DECISION_PROTOCOLS",
    "FIXED",
    "SOURCE_LABELS",
    "VAL_PROTOCOLS",
    "Calibration",
    "Combiner",
    "Reconstructor",
    "Refiner",
    "SourceFigures",
    "StageOneLogits",
    "Threshold",
    "as_array",
    "calibrated_probabilities",
    "cfar_logits",
    "check_decision",
    "eval_columns",
    "figure_line",
    "figure_table",
    "final_logits",
    "final_source",
    "fit_calibration",
    "fit_run_calibration",
    "logits_name",
    "prediction_logits",
    "probabilities",
    "protocol_threshold",
    "read_calibration",
    "reconstruction",
    "refine",
    "run_calibration",
    "run_threshold",
    "save_calibration",
    "score_sources",
    "source_probabilities",
    "source_thresholds",
    "stage1_source",
    "validation_threshold",
]
