"""Fine-tuning with Ray Train: one loop, three methods (dreambooth, lora, textual_inversion)."""

from medsd.train.run import RunResult, TrainResult, run_training

__all__ = ["RunResult", "TrainResult", "run_training"]
