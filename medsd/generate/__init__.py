"""Bulk synthesis: a generation plan rendered by a Ray Data actor pool into a CheXpert-style synthetic dataset.

Modules: ``plan`` (rows, ids, seeds, shards), ``actor`` (GeneratorActor), ``storage`` (the output folder on
any pyarrow filesystem), ``writers`` (parquet shards, train.csv), ``manifest`` (manifest.json and the resume
rule), ``run`` (the whole run).
"""

from medsd.generate.plan import GenerationPlan, Shard, build_plan
from medsd.generate.run import GenerateResult, run_generate

__all__ = ["GenerateResult", "GenerationPlan", "Shard", "build_plan", "run_generate"]
