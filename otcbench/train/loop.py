"""The one training loop every defense plugs into.

AdamW (no decay on norms, biases, embeddings' scale), linear warm-up + cosine, learnable temperature
clamped at ``train.max_logit_scale``, bf16 autocast on CUDA, per-step seeding so that a resumed run
replays exactly what an uninterrupted run would have done, atomic checkpoints (per epoch, and every
``checkpoint_every_steps``), ``log.jsonl`` (mirrored to TensorBoard/wandb with ``train.report_to``) and a rich
progress display.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from otcbench.config import RESULT_NEUTRAL_TRAIN_KEYS, TrainConfig, TrainJob, dump_yaml, validate
from otcbench.data.format import load_pair_dataset
from otcbench.defenses import Defense, build_defense
from otcbench.device import autocast_dtype, resolve_device
from otcbench.errors import UserError
from otcbench.models import create_model, get_tokenizer, image_size, load_checkpoint_file, prepare_images
from otcbench.progress import progress_bar, progress_enabled
from otcbench.train import distributed
from otcbench.train.batch import Batch
from otcbench.train.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    atomic_torch_save,
    atomic_write_text,
    environment_info,
    write_json,
)
from otcbench.train.data import LoaderOptions, TrainData, load_for_model
from otcbench.train.losses import clip_loss
from otcbench.train.order import epoch_order, step_seed
from otcbench.train.reporting import make_reporters
from otcbench.train.schedule import cosine_lr, warmup_steps

# re-exported: their historical import path (tests, notebooks)
__all__ = ["CHECKPOINT_DIR", "LAST", "Batch", "Trainer", "autocast_dtype", "epoch_order", "make_optimizer",
           "resolve_device", "step_seed"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, the logit scale and other 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def is_convnet(model: torch.nn.Module) -> bool:
    """Whether a tower has real convolutions (not just a ViT patch embedding): those prefer NHWC."""
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel when this torch build has it for the device (5-10x faster step)."""
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    groups = param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


class Trainer:
    """Trains a CLIP model on a pair dataset with a defense; writes a run directory.

    Library use (what ``otcbench train`` does)::

        job = TrainJob(data="data/world", train=TrainConfig(epochs=2))
        Trainer(job, Path("runs/clip")).fit()

    ``defense``: the defense to train with, built by the caller (:func:`otcbench.defenses.build_defense`
    ``(job.defense)``, the default). The trainer only calls its hooks; a defense sees the trainer through
    :class:`otcbench.defenses.protocol.TrainerContext`.
    """

    def __init__(
        self,
        job: TrainJob,
        out: str | Path,
        *,
        defense: Defense | None = None,
        resume: bool = False,
        show_progress: bool = True,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.job = job
        self.out = Path(out)
        self.resume = resume
        self.show_progress = show_progress
        self.on_step = on_step
        self.cfg = job.train
        self.device = resolve_device(self.cfg.device)
        self.dist = distributed.env_dist_info()
        if self.dist.enabled:
            if self.cfg.batch_size % self.dist.world_size:
                raise UserError(f"train.batch_size={self.cfg.batch_size} is not divisible by the "
                                f"{self.dist.world_size} processes; use a multiple of {self.dist.world_size}")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = autocast_dtype(self.cfg.amp, self.device)

        # Everything that can fail on bad input is checked here, before any long work.
        self._check_run_dir()
        # every process checks the sinks' packages (so all fail alike, before the process group forms); only
        # rank 0 ever writes to them (log returns early elsewhere), and nothing is written before the first record
        self.reporter = make_reporters(self.cfg.report_to, self.out, job.model_dump(mode="json"))
        distributed.init_distributed(self.device.type)
        # a class registered by hand (a test's) may lack the registry's `name`: only a known mismatch is an error
        given = getattr(defense, "name", job.defense.name) if defense is not None else job.defense.name
        if given != job.defense.name:
            raise ValueError(f"defense {given!r} given for a job of defense {job.defense.name!r}")
        self.defense: Defense = defense if defense is not None else build_defense(job.defense)
        self.data_info = load_pair_dataset(job.data)

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)
        self.model = create_model(job.model.name, checkpoint=job.model.init, device=self.device)
        self.tokenizer = get_tokenizer(job.model.name)
        side = image_size(self.model)[0]
        loader = LoaderOptions(num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                               max_bad_fraction=self.cfg.max_bad_fraction)
        self.data: TrainData = load_for_model(self.data_info, self.tokenizer, side, self.cfg.data_mode, loader)
        self.data = self.defense.train_data(self, self.data)
        self.current_batch: Batch | None = None  # the micro-batch being trained (raw_images serves its rows)
        self.caption_index = torch.arange(len(self.data))
        if is_convnet(self.model):
            # oneDNN/cuDNN convolutions run faster on NHWC; a no-op for transformer towers.
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.steps_per_epoch = max(1, len(self.data) // self.cfg.batch_size)
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        self.warmup = warmup_steps(self.cfg.warmup, self.total_steps)
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0
        self.global_step = 0
        self.lr = 0.0
        self.epoch_loss_sum = 0.0  # running sums of the current epoch, kept in checkpoints
        self.epoch_loss_n = 0
        if resume and (self.ckpt_dir / LAST).is_file():
            self._load_last()
        elif self.dist.is_main:
            # interrupted before its first checkpoint (or a fresh run): nothing to keep from earlier logs
            (self.out / "log.jsonl").unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------------------
    # run directory

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def _check_run_dir(self) -> None:
        last = self.out / CHECKPOINT_DIR / LAST
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output {self.out} is a file; choose a directory for the run")
        stored = self.out / "config.yaml"
        if self.resume:
            if not last.is_file() and not stored.is_file():
                raise UserError(f"--resume: {self.out} holds no checkpoint ({CHECKPOINT_DIR}/{LAST}); "
                                "start it without --resume")
            if stored.is_file():
                old = validate(TrainJob, yaml.safe_load(stored.read_text()), where=str(stored))
                changed = _config_diff(old, self.job)
                if changed:
                    raise UserError(f"--resume: options differ from the run in {self.out} ({changed}); "
                                    "resume with the same options or use a new output directory")
        elif last.is_file():
            raise UserError(f"{self.out} already holds a training run; pass --resume to continue it "
                            "or choose another output directory")

    def _checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_name": self.job.model.name,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "caption_index": self.caption_index.clone(),
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_n": self.epoch_loss_n,
            "defense": self.defense.state_dict(),
            "config": self.job.model_dump(mode="json"),
        }

    def save(self, epoch_copy: bool) -> None:
        """Write ``last.pt`` (and ``epoch_NNN.pt`` at epoch ends) atomically (rank 0 only)."""
        if not self.dist.is_main:
            return
        state = self._checkpoint()
        atomic_torch_save(state, self.ckpt_dir / LAST)
        if epoch_copy:
            atomic_torch_save(state, self.ckpt_dir / f"epoch_{self.epoch:03d}.pt")

    def _load_last(self) -> None:
        state = load_checkpoint_file(self.ckpt_dir / LAST)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.caption_index = state["caption_index"].clone()
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        self.epoch_loss_n = int(state.get("epoch_loss_n", 0))
        self.defense.load_state_dict(state["defense"])
        if self.dist.is_main:
            self._truncate_log(self.global_step)

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        keep = []
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the interruption
            if rec.get("step", 0) <= step and not (rec.get("type") == "epoch" and rec["epoch"] >= self.epoch):
                keep.append(line)
        atomic_write_text(log, "".join(k + "\n" for k in keep))

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to ``log.jsonl`` (rank 0 only)."""
        if not self.dist.is_main:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.reporter.log(record, self.global_step)  # train.report_to: the same record as scalars

    # ----------------------------------------------------------------------------------------------
    # steps

    @property
    def embed_batch_size(self) -> int:
        """Batch size for no-grad passes over the whole dataset (data-side defense steps)."""
        return max(self.cfg.batch_size, 512)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def make_batch(self, rows: torch.Tensor, raw: torch.Tensor | None = None) -> Batch:
        """The batch of image ``rows`` with their paired captions; ``raw``: their images if already read."""
        cap_rows = self.caption_index[rows]
        if raw is None:
            raw = self.data.image_rows(rows)
        images = prepare_images(self.model, raw.to(self.device, non_blocking=True))
        tokens = self.data.tokens[cap_rows].to(self.device, non_blocking=True)
        self.current_batch = Batch(rows, cap_rows, images, tokens, raw)
        return self.current_batch

    def raw_images(self, rows: torch.Tensor) -> torch.Tensor:
        """Raw uint8 images ``[B,3,H,W]`` (CPU) of ``rows``: what defenses augment.

        The one accessor for a batch's pixels: the current batch's own images when ``rows`` are its rows
        (no second read — a streamed batch was decoded once, by the loader), else read from the data.
        """
        b = self.current_batch
        if b is not None and (rows is b.rows or (rows.shape == b.rows.shape and torch.equal(rows, b.rows))):
            return b.raw
        return self.data.image_rows(rows)

    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features."""
        img = self.model.encode_image(images, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        return img, txt

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This step's per-row tensors of every process, in global-batch order, with gradient.

        The identity in a single process. Contrastive losses call it on their features so that under
        torchrun the negatives are the whole global batch (as in one process).
        """
        return distributed.all_gather_with_grad(x)

    def clip_batch_loss(self, batch: Batch) -> torch.Tensor:
        """The plain CLIP loss of a batch (what the ``none`` defense trains with), over the global batch."""
        img, txt = self.encode(batch.images, batch.tokens)
        return clip_loss(self.gather(img), self.gather(txt), self.logit_scale())

    def micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """This process's micro-batches of a step's ``rows``: its contiguous shard, split ``grad_accum`` ways."""
        if self.dist.enabled:
            lo, hi = distributed.shard(len(rows), self.dist)
            rows = rows[lo:hi]
        return list(rows.chunk(self.cfg.grad_accum))

    def train_step(self, rows: torch.Tensor, raws: list[torch.Tensor] | None = None) -> tuple[float, dict[str, float]]:
        """One optimiser step over ``rows`` (split into ``grad_accum`` micro-batches).

        ``raws``: the raw images of each of :meth:`micro_batches` ``(rows)`` when already read (streaming).
        """
        torch.manual_seed(step_seed(self.cfg.seed, self.global_step))
        self.lr = self.defense.learning_rate(
            self, cosine_lr(self.global_step, self.cfg.lr, self.warmup, self.total_steps))
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        extras: dict[str, float] = {}
        micro = self.micro_batches(rows)
        for part, raw in zip(micro, raws if raws is not None else [None] * len(micro), strict=True):
            batch = self.make_batch(part, raw)
            with self.autocast():
                loss, extra = self.defense.batch_loss(self, batch)
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
            total += loss.detach() / self.cfg.grad_accum
            extras.update(extra)
        self.current_batch = None  # let its device tensors go before the optimiser step and data-side hooks
        if self.dist.enabled:
            distributed.average_gradients(self.model)
            torch.distributed.all_reduce(total)
            total /= self.dist.world_size
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
        self.global_step += 1
        return float(total), extras

    # ----------------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> Path:
        """Train to ``train.epochs``; returns the path of the final checkpoint."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", dump_yaml(self.job))
            info = environment_info(self.device)
            info["world_size"] = self.dist.world_size
            info["data_mode"] = self.data.mode
            info["num_workers"] = self.cfg.num_workers
            write_json(self.out / "env.json", info)
        distributed.barrier()
        try:
            self.defense.on_train_start(self)
            with progress_bar(progress_enabled(self.show_progress and self.dist.is_main), info=True) as progress:
                ep_task = progress.add_task("epochs", total=self.cfg.epochs, completed=self.epoch, info="")
                step_task = progress.add_task("steps", total=self.steps_per_epoch, info="")
                while self.epoch < self.cfg.epochs:
                    self._run_epoch(progress, step_task)
                    progress.update(ep_task, completed=self.epoch)
        finally:
            self.data.close()  # streaming workers end with the run, not at garbage collection
            self.reporter.close()  # flushes the event files / wandb run, also when training fails
        distributed.barrier()
        return self.ckpt_dir / LAST

    def _run_epoch(self, progress: Any, step_task: Any) -> None:
        epoch = self.epoch
        self.defense.on_epoch_start(self, epoch)
        order = self.defense.epoch_indices(self, epoch, epoch_order(len(self.data), self.cfg.seed, epoch))
        bs = min(self.cfg.batch_size, len(order)) or 1
        # an empty order is an epoch that trains nothing (SafeCLIP without a full batch of safe pairs)
        n_steps = max(1, len(order) // bs) if len(order) else 0
        progress.update(step_task, total=n_steps, completed=self.step_in_epoch,
                        description=f"epoch {epoch + 1}/{self.cfg.epochs}")
        if self.step_in_epoch == 0:
            self.epoch_loss_sum, self.epoch_loss_n = 0.0, 0
        steps_here = 0
        t_epoch = time.perf_counter()
        t_log, seen = time.perf_counter(), 0
        # the epoch's remaining steps, read ahead in this order (workers and prefetching when streaming)
        steps = [order[s * bs : (s + 1) * bs] for s in range(self.step_in_epoch, n_steps)]
        micro = [self.micro_batches(rows) for rows in steps]
        raw_iter = self.data.image_batches([m for ms in micro for m in ms], persistent=True)
        for s, rows, parts in zip(range(self.step_in_epoch, n_steps), steps, micro, strict=True):
            loss, extras = self.train_step(rows, [next(raw_iter) for _ in parts])
            self.epoch_loss_sum += loss
            self.epoch_loss_n += 1
            steps_here += 1
            self.step_in_epoch = s + 1
            seen += len(rows)
            if self.global_step % self.cfg.log_every == 0 or s + 1 == n_steps:
                dt = max(time.perf_counter() - t_log, 1e-9)
                rec = {"type": "step", "step": self.global_step, "epoch": epoch, "loss": round(loss, 5),
                       "lr": self.lr, "logit_scale": round(float(self.logit_scale().detach()), 4),
                       "images_per_s": round(seen / dt, 1), **extras}
                self.log(rec)
                t_log, seen = time.perf_counter(), 0
                progress.update(step_task, info=f"loss {loss:.3f}  lr {self.lr:.2e}  "
                                f"{rec['images_per_s']:.0f} img/s")
            progress.update(step_task, completed=s + 1)
            if self.on_step is not None:
                self.on_step(self)
            every = self.cfg.checkpoint_every_steps
            if every and self.global_step % every == 0 and s + 1 < n_steps:
                self.save(epoch_copy=False)
        self.defense.on_epoch_end(self, epoch)
        self.epoch += 1
        self.step_in_epoch = 0
        seconds = time.perf_counter() - t_epoch
        # loss: the whole epoch's mean, also across a resume; seconds/images_per_s: this process's part
        rec = {"type": "epoch", "epoch": epoch, "step": self.global_step,
               "loss": round(self.epoch_loss_sum / max(1, self.epoch_loss_n), 5), "seconds": round(seconds, 2),
               "images_per_s": round(steps_here * bs / max(seconds, 1e-9), 1)}
        if self.data.mode == "stream":
            # distinct rows read so far whose image was missing or unreadable (trained as black images)
            rec["bad_images"] = self.data.n_bad_images
            if self.data.n_bad_images:
                rec["bad_image_examples"] = self.data.bad_image_examples
        self.log(rec)
        self.save(epoch_copy=self.epoch % self.cfg.save_every_epochs == 0 or self.epoch == self.cfg.epochs)


def _config_diff(old: TrainJob, new: TrainJob) -> str:
    """Keys that differ between two jobs, ignoring what may change on resume (epochs, device, …)."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for d in (a, b):
        d["data"] = str(Path(d["data"]).resolve()) if d["data"] else ""
    for d in (a, b):
        for k in ("epochs", *RESULT_NEUTRAL_TRAIN_KEYS):  # a resume may also train for more epochs
            d["train"].pop(k, None)
    diffs = []
    for section in a:
        if isinstance(a[section], dict):
            for k in a[section]:
                if a[section][k] != b.get(section, {}).get(k):
                    diffs.append(f"{section}.{k}")
        elif a[section] != b.get(section):
            diffs.append(section)
    return ", ".join(diffs)
