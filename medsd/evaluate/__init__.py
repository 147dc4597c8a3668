"""Does the synthetic data help? Classifier AUC real vs synthetic vs mixed, fidelity, diversity, memorization.

Modules: ``images`` (a decoded set), ``synthetic`` (synthetic folders and their variants), ``inputs`` (every
set, checked), ``arms`` (what each classifier trains on; the arm Ray task), ``auc`` (bootstrap intervals),
``features``, ``fidelity``, ``diversity``, ``memorization``, ``quality`` (the metrics Ray task), ``report`` and
``plots`` (outputs), ``run`` (the whole evaluation).
"""

from medsd.evaluate.run import EvaluationResult, run_evaluation

__all__ = ["EvaluationResult", "run_evaluation"]
