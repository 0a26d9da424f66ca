"""tapernorm.train: the pre-training loop with tapering (schedule, calibration, scale loss, resume, plots).

May import the core (`tapernorm.*` modules at the package root); never passes, compiler or runtime.

    from tapernorm.train import TrainConfig, train
    result = train(TrainConfig(out_dir="runs/tiny", mode="internal"))

`TrainConfig` (config.py) and the schedule are torch-free; the trainer loads on first use of its names.
"""
from __future__ import annotations

from tapernorm.lazy import lazy_exports

_EXPORTS = {
    "config": ["TrainConfig"],
    "trainer": ["TrainResult", "train", "evaluate", "evaluate_checkpoint"],
    "schedule": ["TaperSchedule", "resolve_schedule", "gate_at", "lr_at", "warmup_steps"],
    "scale_loss": ["ScaleTarget", "scale_loss", "scale_stat"],
    "plot": ["plot_run"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
