"""Reading a study's trials: what every loop and sampler asks for on every trial."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's COMPLETE trials by number. Through nasopt's search loop the study's storage is
    its ledger (nasopt.search.ledger), which reads them incrementally: a sampler may ask on every
    trial at a cost that does not grow with the study. Callers must not modify the trials."""
    read = getattr(getattr(study, "_storage", None), "completed_trials", None)
    if read is not None:
        return read(study._study_id)
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
