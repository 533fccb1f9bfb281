"""Meta-training, evaluation (mean ± 95% CI), checkpoints, plots and configs."""

from allmap.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from allmap.train.config import ConfigError, list_presets, load_config
from allmap.train.evaluate import evaluate, summarize, fixed_tasks
from allmap.train.loop import NonFiniteLossError, resume, train
from allmap.train.runs import RunDir, load

__all__ = [
    "train", "resume", "load", "evaluate", "summarize", "fixed_tasks", "load_config", "list_presets",
    "ConfigError", "CheckpointError", "NonFiniteLossError", "save_checkpoint", "load_checkpoint", "RunDir",
]
