"""Training SAEs on T5Gemma 2 with SAELens' own runners.

The public API in one import (``from sae_lens_t5gemma.training import TrainConfig, train``);
each name lives in the module that does its job:

- ``config``: :class:`TrainConfig`, its presets and the checks of its numbers;
- ``data``: dataset files found and checked, the dataset loaded;
- ``memory``: memory estimates of the activation store, an SAE step and the SAEs' state;
- ``plan``: :func:`plan_training`, the checked :class:`TrainingPlan` (no model loaded);
- ``runner_configs``: SAELens' SAE, runner and cache configs built from a plan;
- ``sae_lens_seams``: every adaptation of SAELens' training internals, each with why;
- ``checkpoints``: interruption (SIGINT/SIGTERM) and ``resume``;
- ``evals``: the in-training and final evals (covered positions only);
- ``records``: the result, the training summary, the release YAML, the printed plan and report;
- ``runner``: :func:`train`, the cached-activation path and :func:`run_training` (the CLI's);
- ``measurements``: activations at hooks for texts, and the reconstruction error.
"""

from sae_lens_t5gemma.training.checkpoints import TrainingInterrupted, checkpoint_folder, latest_checkpoint
from sae_lens_t5gemma.training.config import ARCHITECTURES, INPUT_CONVENTION_KEY, PRESETS, TrainConfig
from sae_lens_t5gemma.training.data import load_training_dataset, resolve_dataset_files, write_text_dataset
from sae_lens_t5gemma.training.evals import EvalRecorder, MultiEvalRecorder, eval_feeds, flatten_metrics
from sae_lens_t5gemma.training.measurements import collect_activations, reconstruction_mse
from sae_lens_t5gemma.training.plan import (
    ModelDims,
    TrainingPlan,
    expand_hooks,
    plan_training,
    read_model_dims,
)
from sae_lens_t5gemma.training.records import (
    TrainingResult,
    describe_plan,
    format_report,
    register_release,
    write_release_yaml,
)
from sae_lens_t5gemma.training.runner import cache_activations, run_training, train, train_from_cache
from sae_lens_t5gemma.training.runner_configs import (
    build_cache_config,
    build_multi_runner_config,
    build_runner_config,
    build_sae_config,
)

__all__ = [
    "ARCHITECTURES",
    "INPUT_CONVENTION_KEY",
    "PRESETS",
    "EvalRecorder",
    "ModelDims",
    "MultiEvalRecorder",
    "TrainConfig",
    "TrainingInterrupted",
    "TrainingPlan",
    "TrainingResult",
    "build_cache_config",
    "build_multi_runner_config",
    "build_runner_config",
    "build_sae_config",
    "cache_activations",
    "checkpoint_folder",
    "collect_activations",
    "describe_plan",
    "eval_feeds",
    "expand_hooks",
    "flatten_metrics",
    "format_report",
    "latest_checkpoint",
    "load_training_dataset",
    "plan_training",
    "read_model_dims",
    "reconstruction_mse",
    "register_release",
    "resolve_dataset_files",
    "run_training",
    "train",
    "train_from_cache",
    "write_release_yaml",
    "write_text_dataset",
]
