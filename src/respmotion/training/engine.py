"""The one training engine used by every model (:class:`Trainer`).

A model plugs in as a :class:`~respmotion.training.task.Task`: it builds the network, computes the loss of a
batch and says what to store beside the weights.  :class:`Trainer` does the rest: AdamW, linear warmup then
cosine decay (``lr_max`` -> ``lr_min``), gradient accumulation, autocast (bf16/fp16 where the
device supports it; fp32 on CPU by default), DDP under ``torchrun`` (gloo on CPU, nccl on GPU),
atomic checkpoints with everything needed to resume exactly, warm start from other weights,
TensorBoard scalars and images, and a clear stop on a non-finite loss.  Micro-batch ``k`` and the
learning rate of step ``k`` are fixed functions of ``k`` (:mod:`respmotion.training.schedule`), so a resumed
run continues exactly where its checkpoint was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..config import save_config
from ..io.checkpoint import MODEL_FILE, checkpoint_name, load_checkpoint, save_checkpoint
from ..io.torchfile import load_state
from . import distributed as D
from .checkpoint import prune_checkpoints, rng_state, set_rng_state
from .schedule import GlobalBatches, WarmupCosine
from .task import Task, unwrap

log = logging.getLogger("respmotion")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every model (defaults: the research code's)."""

    steps: int = 100_000  # optimizer steps
    batch_size: int = 2  # per process and micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    lr_max: float = 1e-4
    lr_min: float = 2e-6
    warmup_steps: int = 500
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max gradient norm, 0 = off
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 2
    log_every: int = 10
    val_every: int = 1000
    val_batches: int = 0  # 0 = the whole validation set
    ckpt_every: int = 1000
    keep_checkpoints: int = 3  # newest training checkpoints kept, 0 = all
    image_every: int = 1000  # TensorBoard images, 0 = never
    seed: int = 42
    deterministic: bool = False  # deterministic algorithms (bitwise-reproducible resume on CPU)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on."""


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns: the run folder, optimizer steps done, the loss history
    (``{"train": [[step, loss], ...], "val": [...]}``), the newest training checkpoint and ``model.pt`` (rank 0)."""

    run_dir: Path
    step: int
    history: dict[str, list[list[float]]]
    last_checkpoint: Path | None
    model_path: Path | None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = fp32, no autocast)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return torch.float16
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    """Runs a :class:`Task` on datasets; see the module docstring.

    Args:
        task: the model's task.
        train_set / val_set: map-style datasets of dict items (``val_set`` may be empty/None).
        cfg: :class:`TrainConfig`.
        run_dir: where checkpoints, TensorBoard files and configs go (same on every rank).
        run_config: the resolved config of the whole run (a dataclass or dict), stored in checkpoints.
        dist_info: from :func:`respmotion.training.distributed.setup`.
    """

    def __init__(
        self,
        task: Task,
        train_set: Dataset,
        val_set: Dataset | None,
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        run_config: Any,
        dist_info: D.DistInfo,
    ) -> None:
        self.task, self.train_set, self.val_set, self.cfg = task, train_set, val_set, cfg
        self.run_dir = Path(run_dir)
        self.run_config = run_config
        self.info = dist_info
        self.device = dist_info.device
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.steps < 1:
            raise ValueError("train.steps, train.batch_size and train.grad_accum must be >= 1")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = task.build_model().to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr_max, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.lr_min / cfg.lr_max))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.history: dict[str, list[list[float]]] = {"train": [], "val": []}
        self.last_checkpoint: Path | None = None
        self._writer = None

    # ------------------------------------------------------------------ state
    def _config_dict(self) -> dict[str, Any]:
        from ..config import to_dict

        return self.run_config if isinstance(self.run_config, dict) else to_dict(self.run_config)

    def state(self, full: bool = True) -> dict[str, Any]:
        model = unwrap(self.model)
        st: dict[str, Any] = {
            "task": self.task.name,
            "step": self.step,
            "model": model.state_dict(),
            "model_config": self.task.model_config(),
            "extra": self.task.extra(model),
            "config": self._config_dict(),
            "history": self.history,
        }
        if full:
            st.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                      scaler=self.scaler.state_dict())
        return st

    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = rng_state()
        if not self.info.enabled:
            return [mine]
        out: list[Any] = [None] * self.info.world_size
        torch.distributed.all_gather_object(out, mine)
        return out

    def save(self) -> Path:
        """Write ``<run_dir>/<step>.pt`` atomically (rank 0) with full training state."""
        rngs = self._gather_rng()  # every rank takes part
        path = self.run_dir / checkpoint_name(self.step)
        if self.info.is_main:
            save_checkpoint({**self.state(), "rng": rngs}, path)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
            log.info("checkpoint %s", path)
        D.barrier(self.info)
        self.last_checkpoint = path
        return path

    def resume(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, scaler, RNG, step and history from a checkpoint."""
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.get("task") != self.task.name:
            raise ValueError(f"{path}: checkpoint of task {ckpt.get('task')!r}, not {self.task.name!r}")
        for key in ("optimizer", "scheduler", "rng"):
            if key not in ckpt:
                raise ValueError(f"{path}: has no {key} state (a weights-only file cannot be resumed; use warm start)")
        load_state(unwrap(self.model), ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:  # torch: "loaded state dict contains a parameter group that doesn't match"
            raise ValueError(f"{path}: optimizer state does not fit this model ({exc})") from exc
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        if len(rngs) != self.info.world_size:
            log.warning("%s: saved by %d processes, resuming with %d: RNG streams will differ",
                        path, len(rngs), self.info.world_size)
        set_rng_state(rngs[self.info.rank % len(rngs)])
        self.step = int(ckpt["step"])
        self.history = {k: [list(x) for x in v] for k, v in ckpt["history"].items()}
        self.last_checkpoint = Path(path)
        log.info("resumed from %s at step %d", path, self.step)

    def warm_start(self, path: str | os.PathLike) -> None:
        """Load only the weights of another run; keep its config as ``prev_config.yaml``."""
        ckpt = load_checkpoint(path, map_location=self.device)
        load_state(unwrap(self.model), ckpt["model"], path)
        if self.info.is_main:
            save_config(ckpt.get("config", {}), self.run_dir / "prev_config.yaml",
                        extra={"warm_start_from": str(Path(path).resolve()), "warm_start_step": int(ckpt["step"])})
        log.info("warm start from %s (step %d)", path, int(ckpt["step"]))

    # ------------------------------------------------------------------ logging
    @property
    def writer(self):
        if self._writer is None and self.info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir), purge_step=self.step or None)
        return self._writer

    def _scalars(self, prefix: str, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, self.step)

    # ------------------------------------------------------------------ loops
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loader(self, start_micro: int) -> DataLoader:
        sampler = GlobalBatches(len(self.train_set), self.cfg.batch_size, self.info.rank, self.info.world_size,
                                self.cfg.seed, start=start_micro)
        # own generator: creating the iterator must not draw from the global RNG (exact resume)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(start_micro))

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean task loss over the validation set (rank 0; model in eval mode)."""
        if not self.val_set or len(self.val_set) == 0:
            return None
        model = unwrap(self.model)
        model.eval()
        loader = DataLoader(self.val_set, batch_size=self.cfg.batch_size, shuffle=False,
                            num_workers=self.cfg.num_workers, generator=torch.Generator().manual_seed(self.step))
        total, n = 0.0, 0
        metrics: dict[str, float] = {}
        first = None
        for i, batch in enumerate(loader):
            if self.cfg.val_batches and i >= self.cfg.val_batches:
                break
            batch = to_device(batch, self.device)
            first = first if first is not None else batch
            with self._autocast(), torch.no_grad():
                out = self.task.loss(model, batch, self.step)
                for k, v in self.task.val_metrics(model, batch).items():
                    metrics[k] = metrics.get(k, 0.0) + float(v)
            total += float(out["loss"])
            n += 1
        if metrics:
            means = {k: v / n for k, v in metrics.items()}
            self._scalars("val", means)
            log.info("step %d  validation %s", self.step, "  ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if self.cfg.image_every and first is not None and self.step % self.cfg.image_every == 0:
            self._images(model, first)
        model.train()
        return total / max(n, 1)

    def _images(self, model: nn.Module, batch: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for name, img in self.task.images(model, batch).items():
            self.writer.add_image(name, img.detach().float().clamp(0, 1).cpu(), self.step)

    def _stop_nonfinite(self, loss: torch.Tensor, batch: dict[str, Any], micro: int) -> None:
        keys = batch.get("key", [])
        raise TrainingDiverged(
            f"training loss became {float(loss.detach())} at step {self.step + 1} (micro-batch {micro}, items {list(keys)}); "
            f"stopped. Last checkpoint: {self.last_checkpoint or 'none'}. Try a lower train.lr_max, "
            "train.precision=fp32 or a smaller train.grad_clip")

    def fit(self, resume: str | os.PathLike | None = None, init: str | os.PathLike | None = None) -> FitResult:
        """Train until ``cfg.steps`` optimizer steps; returns the history and file paths."""
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        if self.cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        try:
            return self._fit(resume, init)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)

    def _fit(self, resume: str | os.PathLike | None, init: str | os.PathLike | None) -> FitResult:
        cfg, info = self.cfg, self.info
        if resume is not None and init is not None:
            raise ValueError("use either resume (continue a run) or init (warm start), not both")
        if resume is not None:
            self.resume(resume)
        else:
            if init is not None:
                self.warm_start(init)
            torch.manual_seed(cfg.seed + info.rank)  # per-rank stream for dropout / sampling
        if info.is_main:
            _ = self.writer  # opened now, so a resumed run purges TensorBoard events after its checkpoint
        self.model.train()
        if info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        micro_done = self.step * cfg.grad_accum
        batches = iter(self._loader(micro_done)) if self.step < cfg.steps else iter(())
        t0, seen = time.perf_counter(), 0
        while self.step < cfg.steps:
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=self.device)
            logs: dict[str, torch.Tensor] = {}
            for a in range(cfg.grad_accum):
                batch = to_device(next(batches), self.device)
                sync = a == cfg.grad_accum - 1 or not info.enabled
                ctx = contextlib.nullcontext() if sync else self.model.no_sync()
                with ctx:
                    with self._autocast():
                        out = self.task.loss(self.model, batch, self.step)
                    loss = out["loss"]
                    if not D.all_finite(loss, info):
                        self._stop_nonfinite(loss, batch, a)
                    self.scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.detach().float() / cfg.grad_accum
                for k, v in out.items():
                    logs[k] = logs.get(k, 0.0) + v.detach().float() / cfg.grad_accum
                seen += len(batch["x"]) * info.world_size if "x" in batch else 0
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.step += 1
            mean_loss = float(D.mean_across(step_loss, info))
            self.history["train"].append([self.step, mean_loss])
            if info.is_main and ((cfg.log_every and self.step % cfg.log_every == 0) or self.step == cfg.steps):
                dt = time.perf_counter() - t0
                vals = {k: float(v) for k, v in logs.items()}
                self._scalars("train", vals)
                self._scalars("train", {"lr": lr, "samples_per_s": seen / dt if dt > 0 else 0.0})
                log.info("step %d  loss %.5f  lr %.2e  %.1f samples/s", self.step, mean_loss, lr, seen / max(dt, 1e-9))
                t0, seen = time.perf_counter(), 0
            if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                if info.is_main:
                    val = self.validate()
                    if val is not None:
                        self.history["val"].append([self.step, val])
                        self._scalars("val", {"loss": val})
                        log.info("step %d  validation loss %.5f", self.step, val)
                self.history["val"] = D.broadcast_object(self.history["val"], info)
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps:
                self.save()
        return self._finish()

    def _finish(self) -> FitResult:
        model = unwrap(self.model)
        model_path = None
        if self.info.is_main:
            model.eval()
            self.task.on_train_end(model, self.train_set, self.device)
            model_path = save_checkpoint(self.state(full=False), self.run_dir / MODEL_FILE)
            if self._writer is not None:
                self._writer.flush()
                self._writer.close()
            model.train()
        D.barrier(self.info)
        return FitResult(self.run_dir, self.step, self.history, self.last_checkpoint, model_path)

