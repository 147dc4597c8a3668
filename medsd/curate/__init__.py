"""Curation of a synthetic dataset: a classifier trained on the real images (the judge) scores every
synthetic image, and the images whose labels it contradicts are set aside, each with its reason.

Modules: ``judge`` (train, save, load and apply the judge), ``verdicts`` (which images are kept and why the
others are not), ``folder`` (the curated dataset folder), ``run`` (the whole curation).
"""

from medsd.curate.run import CurationResult, run_curation

__all__ = ["CurationResult", "run_curation"]
