"""Meta-training, evaluation (mean ± 95% CI), checkpoints, plots and configs; reports of run folders."""

from allmap.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from allmap.app.config import ConfigError, list_presets, load_config
from allmap.app.runs import RunDir, load
from allmap.app.trainer import DivergedError, Interrupted, NonFiniteLossError, check_config, resume, train
from allmap.engine.evaluate import evaluate, fixed_tasks, summarize

__all__ = [
    "train",
    "resume",
    "load",
    "evaluate",
    "summarize",
    "fixed_tasks",
    "load_config",
    "list_presets",
    "check_config",
    "ConfigError",
    "CheckpointError",
    "NonFiniteLossError",
    "DivergedError",
    "Interrupted",
    "save_checkpoint",
    "load_checkpoint",
    "RunDir",
]
