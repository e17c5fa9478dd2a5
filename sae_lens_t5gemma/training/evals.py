"""In-training and final evals (covered positions only), and what each eval record says."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens_t5gemma.outputs import atomic_write
from sae_lens_t5gemma.training.checkpoints import FINISHED, RUN_RECORD, _StopBetweenSteps
from sae_lens_t5gemma.training.config import INPUT_CONVENTION_KEY
from sae_lens_t5gemma.training.plan import TrainingPlan

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens.hook_points import HookedRootModule


@dataclass
class EvalRecorder:
    """The in-training eval: :func:`~sae_lens_t5gemma.analysis.evaluation.evaluate_sae` on the store's tokens.

    Covered positions only, CE-loss and KL scores on the continuation (``prefix_lm``); each
    result is kept in ``history``. SAELens' ``run_evals`` is not used: it ignores
    ``seqpos_slice`` and would average uncovered zero rows into every metric.
    """

    model: HookedRootModule
    activations_store: Any
    n_eval_batches: int
    eval_batch_size_prompts: int | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, sae: SAE[Any], scaler: Any = None) -> dict[str, Any]:
        """One eval of ``sae``: a flat dict of metrics (see ``evaluate_sae``)."""
        from sae_lens_t5gemma.analysis.evaluation import evaluate_sae

        store = self.activations_store
        batches = [store.get_batch_tokens(self.eval_batch_size_prompts) for _ in range(self.n_eval_batches)]
        was_training = sae.training
        sae.eval()
        kwargs = dict(
            exclude_special_tokens=store.exclude_special_tokens is not None, activation_scaler=scaler
        )
        # An encoder-only run lets the encoder read whole rows (prefix_len = n). Reconstruction
        # metrics are measured on that input, the one the SAE trained on; CE/KL need a
        # continuation to score, so they come from a second eval with the default split (n // 2).
        full_row = getattr(self.model, "prefix_len", None) == store.context_size
        try:
            if not full_row:
                return evaluate_sae(self.model, sae, batches, **kwargs)
            recon = evaluate_sae(self.model, sae, batches, compute_downstream=False, **kwargs)
            with self.model.fed(prefix_len=None):
                downstream = evaluate_sae(self.model, sae, batches, **kwargs)
            return {**downstream, **recon}
        finally:
            sae.train(was_training)

    def __call__(self, sae: SAE[Any], data_provider: Any, activation_scaler: Any) -> dict[str, Any]:
        """SAELens' single-SAE ``Evaluator`` signature."""
        with _paused(data_provider):
            metrics = self.evaluate(sae, activation_scaler)
        self.history.append(copy.deepcopy(metrics))
        return metrics


class MultiEvalRecorder(EvalRecorder):
    """:class:`EvalRecorder` for ``MultiSAETrainingRunner``'s evaluator signature.

    Returns keys prefixed by SAE name, as SAELens' ``MultiSAEEvaluator`` does (for wandb);
    ``history`` entries are ``{sae name: metrics}``.
    """

    def __call__(  # type: ignore[override]
        self,
        saes: dict[str, SAE[Any]],
        data_provider: Any,
        activation_scalers: dict[str, Any],
        hook_names: Any = None,
    ) -> dict[str, Any]:
        with _paused(data_provider):
            per_sae = {name: self.evaluate(sae, activation_scalers[name]) for name, sae in saes.items()}
        self.history.append(copy.deepcopy(per_sae))
        return {f"{name}/{k}": v for name, metrics in per_sae.items() for k, v in metrics.items()}


def _paused(data_provider: Any) -> AbstractContextManager[None]:
    from sae_lens.training.prefetch import PrefetchingIterator

    # Evals pull tokens from the same store as a prefetch thread would: pause it.
    inner = data_provider.inner if isinstance(data_provider, _StopBetweenSteps) else data_provider
    return inner.paused() if isinstance(inner, PrefetchingIterator) else nullcontext()


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"model_performance_preservation": {"ce_loss_score": x}}`` -> ``{"model_performance_preservation/ce_loss_score": x}``."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, key + "/"))
        else:
            flat[key] = v
    return flat


def eval_feeds(plan: TrainingPlan) -> dict[str, str]:
    """What the model read for each group of eval metrics (the same for both unless the encoder
    trained on whole rows, when CE/KL need a split that training did not use)."""
    if plan.encoder_only and plan.config.convention == "prefix_lm" and plan.config.encoder_reads_full_row:
        return {
            "reconstruction": "the encoder read whole rows, as in training (EV, MSE, L0, dead/dense)",
            "downstream": "prefix_lm with p = n // 2: the encoder read half the row and CE/KL score the "
            "continuation (training never used this split)",
        }
    words = plan.convention_metadata(plan.sites[0].stack)[INPUT_CONVENTION_KEY] if plan.sites else ""
    return {"reconstruction": words, "downstream": words}


def _final_eval(
    recorder: EvalRecorder, path: Path, plan: TrainingPlan, fingerprint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Eval the SAE as saved (normalisation folded in), and store it next to the weights (last:
    the file marks the folder finished), after :data:`RUN_RECORD` (what ``resume`` compares)."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, device=plan.config.device)
    metrics = recorder.evaluate(sae)
    record = {
        **metrics,
        "model_dtype": plan.model_dtype,
        "sae_dtype": plan.config.dtype,
        "feeds": eval_feeds(plan),
    }
    if fingerprint is not None:
        atomic_write(path / RUN_RECORD, json.dumps({"run_fingerprint": fingerprint}, indent=1))
    atomic_write(path / FINISHED, json.dumps(record, indent=2, default=float))
    return metrics
