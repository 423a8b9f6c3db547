"""Calibrating ROME's hyperparameters on a model (``rome-edit calibrate``).

:func:`calibrate` measures a grid of candidates (:class:`CalibrationGrid`: layers around the
causal trace's recommendation × clamp × steps × loss layer) on a sample of edits with the
batched engine and chooses one by a documented rule (:class:`ChoiceRule`);
:func:`write_report` writes the reference-format hparams file, the table and the per-layer
figure.  See docs/calibration.md.
"""

from rome_edit.calibration.choose import Choice, ChoiceRule, choose, counterfact_score
from rome_edit.calibration.grid import CalibrationGrid, Candidate
from rome_edit.calibration.report import write_report
from rome_edit.calibration.run import CalibrationResult, base_hparams, calibrate

__all__ = ["CalibrationGrid", "CalibrationResult", "Candidate", "Choice", "ChoiceRule",
           "base_hparams", "calibrate", "choose", "counterfact_score", "write_report"]
