"""End-to-end SAE training cost: harvest + SAE step tokens/s, variants, scaling, and peak memory.

Setup: a random-init T5Gemma 2 with the real 270m-270m text dimensions (speed does not depend
on weight values), float32 weights unless stated, CPU, ``--threads`` torch threads, the
package's own runner configs (``training.build_runner_config`` / ``build_multi_runner_config``)
and SAELens' own objects: its ``ActivationsStore`` harvests, its ``SAETrainer.step`` (forward,
backward, gradient clipping, Adam, schedulers) trains. Texts are the embedded stand-in corpus,
packed into rows.

Workers, each in a fresh subprocess (so memory does not leak between them):

- ``one``: one hook (``encoder.5.attn_out``, the encoder reads whole rows), BatchTopK k=40,
  d_sae 16384, SAE batches of 4096 tokens (the ``recommended`` preset). Per repeat, in turn:
  harvest one SAE batch; one step of the same batch with the SAE step in float32, with bf16
  autocast (SAELens' ``autocast``), and, on a TopK SAE of the same width, dense and sparse
  decode (SAELens' ``use_sparse_activations``, both sides without decoder-norm rescaling, which
  the sparse backward cannot run; BatchTopK has no sparse option in 6.54).
- ``all36``: the 36 ``attn_out`` hooks (one runner per stack, as ``train`` runs them), BatchTopK
  k=40, d_sae 4096, SAE batches of 1024 tokens (to keep the run short); per repeat: harvest one
  batch for each stack, then step all 36 SAEs in float32 and with bf16 autocast.
- ``scaling``: cost per SAE batch against tokens per batch, number of hooks, and d_sae (three points each).
- ``mem1`` / ``mem36``: a real ``SAETrainingRunner.run()`` of the ``recommended`` preset (2 SAE
  steps), store sized by the package from ``--max-memory``, run as ``training.train`` runs it
  (allocator setting, lean multi-SAE steps, finished runners collected); peak RSS minus the
  RSS after the model's weights loaded, split into the SAEs' training state (weights,
  gradients and Adam moments: 16 bytes per parameter, computed) and the rest (the activation
  path), against the package's estimate (``StoreSizing.activation_bytes``: the store,
  ``training_plan.store_bytes``, or the filled buffer plus one SAE step, whichever is larger),
  with the peak of each phase (VmHWM reset at every phase boundary). ``mem36`` uses d_sae 4096 so that 36
  SAEs' state (1.4 GiB at 4096; 5.6 GiB at 16384) fits a shared machine; the activation path
  does not depend on d_sae.

End-to-end tokens/s of a variant = SAE-batch tokens / (harvest time + step time), both medians
over ``--repeats`` interleaved repeats after a warm-up. The harvest time is per SAE batch:
the time of the forwards that filled it, times the share of their rows it takes (one forward
of 16 x 512 tokens fills two 4096-token batches, and counts half). The load average is recorded.

Usage:
    python benchmarks/bench_training.py            # all workers (about 8 minutes here)
    python benchmarks/bench_training.py --quick    # small sizes: checks the script
    python benchmarks/bench_training.py --only one,mem36

Writes ``benchmarks/results/bench_training.json`` (``..._quick.json`` with ``--quick``) and prints tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_hooks import _reset_peak, _status_kib  # noqa: E402

from sae_lens_t5gemma.model.dtypes import cpu_has_fast_bf16, cpu_model, dtype_name, resolve_dtype  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORKERS = ("one", "all36", "scaling", "mem1", "mem36")


# --------------------------------------------------------------------------- setup


def _setup(tmp: Path, threads: int, model_dtype: str = "float32", device: str = "cpu"):
    """The real-dimension random model (hooked), a config-only folder for planning, and a dataset file."""
    import torch

    from sae_lens_t5gemma import training
    from sae_lens_t5gemma.model.hooked import HookedT5Gemma2
    from sae_lens_t5gemma.stand_in import synthetic as synthetic

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*(fewer samples|not tokenized|exhausted).*")
    tokenizer = synthetic.build_tokenizer(tmp / "model")
    hf = synthetic.build_t5gemma2(real_dims=True).to(device=device, dtype=getattr(torch, model_dtype))
    hf.config.save_pretrained(tmp / "model")
    model = HookedT5Gemma2(hf, tokenizer, model_name="random T5Gemma 2 (real 270m-270m dims)")
    with torch.no_grad():  # page every weight in, so RSS after this is the model's
        for t in (*hf.parameters(), *hf.buffers()):
            t.sum()
    texts = synthetic.stand_in_texts() * 40
    data = training.write_text_dataset(texts, tmp / "train.jsonl")
    return model, tmp / "model", data


def _config(model_dir: Path, data: Path, out: Path, **overrides: Any):
    from sae_lens_t5gemma import training

    values = dict(
        model=str(model_dir), dataset=str(data), out=str(out), disable_concat_sequences=False,
        eval_every_n_steps=10**6, n_batches_for_norm_estimate=1, model_dtype="float32", overwrite=True,
    )  # fmt: skip
    values.update(overrides)
    return training.TrainConfig.from_preset("recommended", **values)


def _stores_and_saes(model: Any, plan: Any, dataset: Any):
    """Per stack: SAELens' store and its SAEs, built exactly as ``training.train`` builds the runners."""
    from sae_lens import LanguageModelSAETrainingRunner, MultiSAETrainingRunner

    from sae_lens_t5gemma import training

    out = []
    for sp in training.plan.per_stack(plan):
        with training.sae_lens_seams._quiet_runner_setup():
            if len(sp.sites) > 1:
                rcfg = training.build_multi_runner_config(sp)
                runner = MultiSAETrainingRunner(rcfg, override_dataset=dataset, override_model=model)
                training.sae_lens_seams._cast_multi_hook_activations(runner.activations_store)
                saes = {s.hook_name: runner.saes[s.friendly] for s in sp.sites}
            else:
                rcfg = training.build_runner_config(sp, sp.sites[0])
                runner = LanguageModelSAETrainingRunner(rcfg, override_dataset=dataset, override_model=model)
                saes = {sp.sites[0].hook_name: runner.sae}
        out.append((sp, rcfg, runner.activations_store, saes))
    return out


def _harvest(store: Any, multi: bool, n_tokens: int) -> tuple[dict[str, Any], float]:
    """SAELens' harvest (forward, copies, special-token filter) until ``n_tokens`` rows per hook.

    Returns the first ``n_tokens`` rows per hook and the share of the harvested rows they
    are: a forward yields whole rows (16 prompts x 512 tokens can be two SAE batches), so the
    time of one SAE batch is the harvest time times that share, not the time of the forwards.
    """
    import torch

    chunks: list[dict[str, torch.Tensor]] = []
    got = 0
    while got < n_tokens:
        if multi:
            d = store._get_filtered_multi_hook_llm_batch()
        else:
            d = {store.hook_name: store.get_filtered_llm_batch()}
        chunks.append(d)
        got += next(iter(d.values())).shape[0]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return {h: torch.cat([c[h] for c in chunks])[:n_tokens] for h in chunks[0]}, n_tokens / got


def _trainers(rcfg: Any, saes: dict[str, Any], autocast: bool) -> dict[str, Any]:
    from sae_lens.training.sae_trainer import SAETrainer

    tcfg = replace(rcfg.to_sae_trainer_config(), autocast=autocast)
    return {h: SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(())) for h, sae in saes.items()}


def _step_all(trainers: dict[str, Any], batch: dict[str, Any]) -> None:
    for h, tr in trainers.items():
        tr.step(batch[h])


def _t(fn: Any) -> float:
    import torch

    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # CUDA runs asynchronously: time whole kernels
    return time.perf_counter() - t0


def _median_table(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {
        k: {"median_s": statistics.median(v[1:]), "warmup_s": v[0], "seconds": v[1:]}
        for k, v in times.items()
    }


# --------------------------------------------------------------------------- workers


def worker_throughput(args: argparse.Namespace, all36: bool) -> dict[str, Any]:
    from sae_lens import TopKTrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_t5gemma import training

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model_dtype = dtype_name(resolve_dtype(args.model_dtype, args.device, "training"))
        model, model_dir, data = _setup(tmp, args.threads, model_dtype, args.device)
        if all36:
            hooks = ["encoder.*.attn_out", "decoder.*.attn_out"]
            over = dict(d_sae=args.d_sae or 4096, train_batch_size_tokens=args.batch_tokens or 1024)
        else:
            hooks = ["encoder.5.attn_out"]
            over = dict(d_sae=args.d_sae or 16384, train_batch_size_tokens=args.batch_tokens or 4096)
        if args.quick:
            over = dict(d_sae=1024, train_batch_size_tokens=256, context_size=128)
        cfg = _config(
            model_dir, data, tmp / "out", hooks=hooks, training_tokens=10**6, model_dtype=model_dtype,
            device=args.device, **over,
        )  # fmt: skip
        plan = training.plan_training(cfg)
        dataset = training.load_training_dataset(plan)
        batch_tokens = cfg.train_batch_size_tokens
        times: dict[str, list[float]] = {}
        with training.runner._fed_as_planned(model, plan):
            parts = _stores_and_saes(model, plan, dataset)
            runs = []
            for sp, rcfg, store, saes in parts:
                runs.append((sp, store, _trainers(rcfg, saes, False), _trainers(rcfg, saes, True), rcfg))
            topk = None
            if not all36:
                sp, rcfg = parts[0][0], parts[0][1]
                tk_cfg = training.build_sae_config(
                    replace(cfg, architecture="topk"),
                    plan.dims.d_in(sp.sites[0]),
                    sp.sites[0],
                    plan.dims.name,
                )
                # SAELens' sparse backward fails with its default decoder-norm rescaling (aten::view on
                # SparseCPU, torch 2.13): both sides run without it, so they compare like for like.
                tk_sae = TopKTrainingSAE(replace(tk_cfg, rescale_acts_by_decoder_norm=False))
                tk_trainer = SAETrainer(cfg=rcfg.to_sae_trainer_config(), sae=tk_sae, data_provider=iter(()))
                topk = (tk_sae, tk_trainer)
            for _ in range(args.repeats + 1):
                batches = []
                t_h = 0.0
                for sp, store, *_ in runs:
                    t0 = time.perf_counter()
                    batch, share = _harvest(store, len(sp.sites) > 1, batch_tokens)
                    t_h += (time.perf_counter() - t0) * share
                    batches.append(batch)
                times.setdefault("harvest", []).append(t_h)
                for key, idx in (("step_fp32", 2), ("step_bf16_autocast", 3)):
                    times.setdefault(key, []).append(
                        sum(
                            _t(lambda r=r, b=b, i=idx: _step_all(r[i], b))
                            for r, b in zip(runs, batches, strict=True)
                        )
                    )
                if topk is not None:
                    h = parts[0][0].sites[0].hook_name
                    for key, sparse in (("topk_dense", False), ("topk_sparse", True)):
                        topk[0].activation_fn.use_sparse_activations = sparse
                        times.setdefault(key, []).append(_t(lambda b=batches[0][h]: topk[1].step(b)))
        med = _median_table(times)
        n_hooks = len(plan.sites)
        for key in [k for k in med if k != "harvest"]:
            total = med["harvest"]["median_s"] + med[key]["median_s"]
            med[key]["end_to_end_tokens_per_s"] = batch_tokens / total
        med["harvest"]["tokens_per_s"] = batch_tokens / med["harvest"]["median_s"]
        sizing = [plan.store_sizing(sp.sites).__dict__ for sp, *_ in parts]
        return {
            "worker": "all36" if all36 else "one",
            "hooks": n_hooks,
            "d_sae": cfg.d_sae,
            "k": cfg.k,
            "architecture": cfg.architecture,
            "batch_tokens": batch_tokens,
            "context_size": cfg.context_size,
            "model_dtype": model_dtype,
            "model_dtype_asked": args.model_dtype,
            "sae_dtype": "float32",
            "store_sizing": sizing,
            "times": med,
            "ratios": {
                "bf16_autocast_vs_fp32_step": med["step_fp32"]["median_s"]
                / med["step_bf16_autocast"]["median_s"],
                **(
                    {
                        "topk_sparse_vs_dense_step": med["topk_dense"]["median_s"]
                        / med["topk_sparse"]["median_s"]
                    }
                    if "topk_dense" in med
                    else {}
                ),
            },
            "note": "ratios > 1 mean the variant is faster; end-to-end = batch tokens / (harvest + step)",
        }


def worker_scaling(args: argparse.Namespace) -> dict[str, Any]:
    from sae_lens_t5gemma import training

    q = args.quick
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model, model_dir, data = _setup(tmp, args.threads)
        points = {
            "tokens": [dict(hooks=["encoder.5.attn_out"], d_sae=4096, train_batch_size_tokens=b) for b in ((128, 256, 512) if q else (1024, 2048, 4096))],
            "hooks": [dict(hooks=[f"encoder.{{{','.join(str(i) for i in range(n))}}}.attn_out" if n > 1 else "encoder.0.attn_out"], d_sae=4096, train_batch_size_tokens=256 if q else 1024) for n in (1, 6, 18)],
            "d_sae": [dict(hooks=["encoder.5.attn_out"], d_sae=d, train_batch_size_tokens=256 if q else 1024) for d in ((512, 1024, 2048) if q else (4096, 8192, 16384))],
        }  # fmt: skip
        out: dict[str, list[dict[str, Any]]] = {}
        for axis, cfgs in points.items():
            for over in cfgs:
                hooks = over.pop("hooks")
                if hooks[0].startswith("encoder.{"):
                    n = int(hooks[0].split(",")[-1].split("}")[0]) + 1
                    hooks = [f"encoder.{i}.attn_out" for i in range(n)]
                cfg = _config(model_dir, data, tmp / "out", hooks=hooks, training_tokens=10**6, **over)
                if q:
                    cfg = replace(cfg, context_size=128)
                plan = training.plan_training(cfg)
                dataset = training.load_training_dataset(plan)
                with training.runner._fed_as_planned(model, plan):
                    ((sp, rcfg, store, saes),) = _stores_and_saes(model, plan, dataset)
                    trainers = _trainers(rcfg, saes, False)
                    th, ts = [], []
                    for _ in range(args.repeats + 1):
                        t0 = time.perf_counter()
                        batch, share = _harvest(store, len(sp.sites) > 1, cfg.train_batch_size_tokens)
                        th.append((time.perf_counter() - t0) * share)
                        ts.append(_t(lambda b=batch, tr=trainers: _step_all(tr, b)))
                med_h, med_s = statistics.median(th[1:]), statistics.median(ts[1:])
                out.setdefault(axis, []).append(
                    {
                        "batch_tokens": cfg.train_batch_size_tokens,
                        "hooks": len(plan.sites),
                        "d_sae": cfg.d_sae,
                        "harvest_s": med_h,
                        "step_s": med_s,
                        "tokens_per_s": cfg.train_batch_size_tokens / (med_h + med_s),
                    }
                )
                del store, saes, trainers
        return {
            "worker": "scaling",
            "architecture": "batchtopk",
            "k": 40,
            "model_dtype": "float32",
            "points": out,
        }


class _PhasePeaks:
    """Peak RSS per phase of a run: VmHWM is read and reset at every phase boundary.

    Phases nest (a harvest inside the mixing buffer's ``next``); a boundary closes the
    segment of the innermost open phase. Exact where ``/proc/self/clear_refs`` can be
    written (``reset_ok``); otherwise every phase reports the peak so far.
    """

    def __init__(self, base: int) -> None:
        self.base, self.stack, self.peaks = base, ["other"], {}
        self.reset_ok = _reset_peak()

    def _close_segment(self) -> None:
        hwm = _status_kib("VmHWM") * 1024 - self.base
        k = self.stack[-1]
        self.peaks[k] = max(self.peaks.get(k, 0), hwm)
        _reset_peak()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._close_segment()
        self.stack.append(name)
        try:
            yield
        finally:
            self._close_segment()
            self.stack.pop()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*a: Any, **k: Any) -> Any:
            with self.phase(name):
                return fn(*a, **k)

        setattr(owner, attr, wrapped)

    def wrap_generator(self, module: Any, attr: str, name: str) -> None:
        gen_fn = getattr(module, attr)
        phase = self.phase

        def wrapped(*a: Any, **k: Any):
            it = gen_fn(*a, **k)
            while True:
                with phase(name):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item

        setattr(module, attr, wrapped)


def worker_memory(args: argparse.Namespace, all36: bool) -> dict[str, Any]:
    """A real runner.run() of the recommended preset, as ``training.train`` runs it: peak RSS above the weights.

    As in ``train``: glibc returns freed tensors at once, the multi-SAE trainer drops each
    SAE's step tensors after its step, and a finished stack's runner is collected before the
    next one starts. Evals are off (their LM head over 262k tokens is another matter).
    """
    import gc

    from sae_lens import LanguageModelSAETrainingRunner, MultiSAETrainingRunner
    from sae_lens.training import activations_store, mixing_buffer, multi_sae_trainer, sae_trainer

    from sae_lens_t5gemma import training

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model, model_dir, data = _setup(tmp, args.threads)
        hooks = ["encoder.*.attn_out", "decoder.*.attn_out"] if all36 else ["encoder.5.attn_out"]
        over: dict[str, Any] = dict(d_sae=4096) if all36 else {}
        if args.quick:
            over = dict(d_sae=512, train_batch_size_tokens=256, context_size=128)
        batch = over.get("train_batch_size_tokens", 4096)
        cfg = _config(
            model_dir,
            data,
            tmp / "out",
            hooks=hooks,
            training_tokens=2 * batch,
            max_memory=args.max_memory,
            **over,
        )
        plan = training.plan_training(cfg)
        dataset = training.load_training_dataset(plan)
        allocator = training.memory._return_freed_memory_to_the_os()
        gc.collect()
        rss_model = _status_kib("VmRSS") * 1024
        peaks = _PhasePeaks(rss_model)
        store = activations_store.ActivationsStore
        peaks.wrap(store, "get_activations", "model forward (hook cache)")
        peaks.wrap(store, "get_multi_hook_activations", "model forward (hook cache)")
        peaks.wrap(store, "get_filtered_llm_batch", "harvest copies (slice, reshape, mask)")
        peaks.wrap(store, "_get_filtered_multi_hook_llm_batch", "harvest copies (slice, reshape, mask)")
        # The multi-hook path calls mixing_buffer through its module, the single-hook store its own import.
        peaks.wrap_generator(mixing_buffer, "mixing_buffer", "mixing buffer (cat, permute, pack)")
        peaks.wrap_generator(activations_store, "mixing_buffer", "mixing buffer (cat, permute, pack)")
        peaks.wrap(sae_trainer.SAETrainer, "step", "SAE step (one SAE)")
        peaks.wrap(multi_sae_trainer.MultiSAETrainer, "_estimate_scaling_factors", "norm estimate")
        t0 = time.perf_counter()
        runners = []
        with training.sae_lens_seams._wandb_mode(False), training.runner._fed_as_planned(model, plan):
            for sp in training.plan.per_stack(plan):
                with training.sae_lens_seams._quiet_runner_setup():
                    if len(sp.sites) > 1:
                        with peaks.phase("build runner (SAE init)"):
                            runner = MultiSAETrainingRunner(
                                training.build_multi_runner_config(sp),
                                override_dataset=dataset,
                                override_model=model,
                            )
                        training.sae_lens_seams._cast_multi_hook_activations(runner.activations_store)
                        saes = list(runner.saes.values())
                        lean = training.sae_lens_seams._lean_multi_sae_steps()
                    else:
                        with peaks.phase("build runner (SAE init)"):
                            runner = LanguageModelSAETrainingRunner(
                                training.build_runner_config(sp, sp.sites[0]),
                                override_dataset=dataset,
                                override_model=model,
                            )
                        saes = [runner.sae]
                        lean = contextlib.nullcontext()
                    runner.evaluator = None
                    n_params = sum(p.numel() for s in saes for p in s.parameters())
                    with lean:
                        runner.run()
                runners.append((sp, n_params))
                del runner, saes
                with peaks.phase("collect the finished runner"):
                    gc.collect()
        wall = time.perf_counter() - t0
        peaks._close_segment()
        peak = max(peaks.peaks.values()) + rss_model
        # Runners run one after the other: the largest runner's SAE state is what can be resident at once.
        sae_state = max(16 * n for _, n in runners)
        sizing = [plan.store_sizing(sp.sites) for sp, _ in runners]
        big = max(sizing, key=lambda z: z.peak_bytes)
        above = peak - rss_model
        return {
            "worker": "mem36" if all36 else "mem1",
            "hooks": len(plan.sites),
            "d_sae": cfg.d_sae,
            "batch_tokens": cfg.train_batch_size_tokens,
            "context_size": cfg.context_size,
            "training_steps": 2,
            "model_dtype": "float32",
            "allocator_threshold_set": allocator,
            "store_sizing": [{**z.__dict__, "activation_bytes": z.activation_bytes, "peak_bytes": z.peak_bytes} for z in sizing],
            "peak_reset": peaks.reset_ok,
            "rss_after_model_gib": rss_model / 2**30,
            "peak_rss_gib": peak / 2**30,
            "peak_above_model_gib": above / 2**30,
            "sae_training_state_gib": sae_state / 2**30,
            "activation_path_gib": (above - sae_state) / 2**30,
            "activation_path_estimate_gib": big.activation_bytes / 2**30,
            "store_estimate_gib": big.estimate_bytes / 2**30,
            "sae_step_estimate_gib": big.step_bytes / 2**30,
            "peak_above_model_estimate_gib": big.peak_bytes / 2**30,
            "phase_peaks_above_model_gib": {k: v / 2**30 for k, v in peaks.peaks.items()},
            "wall_s": wall,
            "note": "sae state = 16 bytes per SAE parameter (weights, gradients, 2 Adam moments) of the largest "
            "runner; phase peaks include whatever was resident then (SAE state included)",
        }  # fmt: skip


# --------------------------------------------------------------------------- driver


def replace_ns(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _run_worker(args: argparse.Namespace, name: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    if args.quick:
        cmd.append("--quick")
    if args.max_memory:
        cmd += ["--max-memory", args.max_memory]
    cmd += ["--model-dtype", args.model_dtype, "--device", args.device]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["worker_wall_s"] = time.perf_counter() - t0
    return result


def tables(results: dict[str, Any]) -> str:
    lines = []
    for name in [k for k in results if k.split("@")[0] in ("one", "all36")]:
        r = results[name]
        t = r["times"]
        lines.append(
            f"{name}: {r['hooks']} hook(s), {r['architecture']} k={r['k']:g} d_sae={r['d_sae']}, "
            f"batch {r['batch_tokens']} tokens, model {r['model_dtype']}, SAE {r['sae_dtype']}"
        )
        lines.append(f"  {'part':<22}{'median s':>10}{'end-to-end tok/s':>18}")
        lines.append(f"  {'harvest':<22}{t['harvest']['median_s']:>10.3f}{'':>18}")
        for k in [k for k in t if k != "harvest"]:
            lines.append(f"  {k:<22}{t[k]['median_s']:>10.3f}{t[k]['end_to_end_tokens_per_s']:>18.1f}")
        lines.append("  " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))
    s = results.get("scaling")
    if s:
        lines.append("scaling (BatchTopK k=40, model float32): cost per SAE batch")
        lines.append(
            f"  {'axis':<8}{'tokens':>8}{'hooks':>7}{'d_sae':>7}{'harvest s':>11}{'step s':>9}{'tok/s':>9}"
        )
        for axis, pts in s["points"].items():
            for p in pts:
                lines.append(
                    f"  {axis:<8}{p['batch_tokens']:>8}{p['hooks']:>7}{p['d_sae']:>7}{p['harvest_s']:>11.3f}"
                    f"{p['step_s']:>9.3f}{p['tokens_per_s']:>9.1f}"
                )
    for name in ("mem1", "mem36"):
        m = results.get(name)
        if m:
            sz = m["store_sizing"][0]
            lines.append(
                f"{name}: {m['hooks']} hooks d_sae {m['d_sae']}: peak {m['peak_above_model_gib']:.2f} GiB above the model "
                f"(estimate {m['peak_above_model_estimate_gib']:.2f}) = SAE state {m['sae_training_state_gib']:.2f} "
                f"+ activation path {m['activation_path_gib']:.2f} (estimate {m['activation_path_estimate_gib']:.2f}: "
                f"store {m['store_estimate_gib']:.2f}, SAE step {m['sae_step_estimate_gib']:.2f}); "
                f"store {sz['store_batch_size_prompts']} prompts x buffer {sz['n_batches_in_buffer']} rows; "
                f"wall {m['wall_s']:.0f} s"
            )
            for k, v in sorted(m["phase_peaks_above_model_gib"].items(), key=lambda kv: -kv[1]):
                lines.append(f"    peak in {k:<40}{v:>6.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat: checks the script")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats after a warm-up (default 5; quick 1)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(WORKERS), help=f"comma-separated subset of {WORKERS}")
    p.add_argument("--max-memory", default=None, help="TrainConfig.max_memory for the memory workers")
    p.add_argument(
        "--model-dtypes",
        default="float32",
        help="comma-separated model dtypes for the 'one'/'all36' workers, run in turn in this one invocation "
        "(e.g. float32,auto: the default training dtype against float32; auto = bfloat16 where native)",
    )
    p.add_argument("--model-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu or cuda (gpu_check.py): model, SAEs and the store")
    p.add_argument("--d-sae", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-tokens", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.worker:
        fn = {
            "one": lambda: worker_throughput(args, False),
            "all36": lambda: worker_throughput(args, True),
            "scaling": lambda: worker_scaling(args),
            "mem1": lambda: worker_memory(args, False),
            "mem36": lambda: worker_memory(args, True),
        }[args.worker]
        with contextlib.redirect_stdout(sys.stderr):
            result = fn()
        print(json.dumps(result))
        return 0
    import torch

    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in WORKERS]
    if bad:
        p.error(f"unknown worker(s) {bad}; choose from {WORKERS}")
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    dtypes = [d for d in args.model_dtypes.split(",") if d]
    for name in names:
        for i, d in enumerate(dtypes if name in ("one", "all36") else dtypes[:1]):
            key = name if i == 0 else f"{name}@{d}"
            print(f"running {key} (model {d}) ...", flush=True)
            results[key] = _run_worker(replace_ns(args, model_dtype=d), name)
    for name in ("one", "all36"):
        for d in dtypes[1:]:
            base, other = results.get(name), results.get(f"{name}@{d}")
            if base and other:
                key = f"{other['model_dtype']}_vs_{base['model_dtype']}_end_to_end"
                results[name]["ratios"][key] = (
                    other["times"]["step_fp32"]["end_to_end_tokens_per_s"]
                    / base["times"]["step_fp32"]["end_to_end_tokens_per_s"]
                )
    out = args.out or RESULTS / ("bench_training_quick.json" if args.quick else "bench_training.json")
    doc = {
        "benchmark": "bench_training",
        "setup": {
            "model": "random init, T5Gemma 2 270m-270m text dimensions",
            "threads": args.threads,
            "repeats": args.repeats,
            "quick": args.quick,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_native_bf16": cpu_has_fast_bf16(),
            "cpu_model": cpu_model(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d"),
        },
        **results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(tables(results))
    print(f"load average before/after: {load_before} / {doc['setup']['load_average_after']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
