"""Training a character-level language model: the loop behind ``fastformers train``.

One :class:`Trainer` owns the model, optimizer, learning-rate schedule, batch
stream, carried memory, RNG states and history; :meth:`Trainer.save` writes
all of them so that :meth:`Trainer.resume` continues exactly where the run
stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import pickle
import random
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import _backend, distributed, plot
from .data import Corpus, DataError, RankSlice, SequentialBatches, ShuffledBatches, load_corpus
from .models import LanguageModel, ModelConfig, build_model, default_model_config
from .nn import CompressiveMemory
from .recipes import DEFAULT_PRESET, recipe

CHECKPOINT_FORMAT = "fastformers-lm-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
BEST_CHECKPOINT_NAME = "best.pt"
LOSS_CURVE_NAME = "loss.png"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_NAME = ".fastformers-train.lock"
BACKEND_CHOICES = ("fused", "reference")
DEVICE_CHOICES = ("cpu", "cuda")
PRECISION_CHOICES = ("fp32", "bf16")
# What :meth:`Trainer.save` writes and :meth:`Trainer.resume` reads ("world_size", "ranks" and
# "elapsed_s" came later and have defaults).
CHECKPOINT_KEYS = ("train_config", "model_config", "vocab", "model", "optimizer", "scheduler", "data", "memory",
                   "step", "history", "rng")


@dataclasses.dataclass
class TrainConfig:
    """How to train. The field defaults are labml_nn's experiment values (what checkpoints written
    before recipes existed ran with); :func:`default_train_config` applies a recipe's."""

    # the language model: one of MODEL_NAMES
    model: str
    # the recipe (fastformers.recipes.PRESETS) the model's architecture is taken from
    preset: str = "labml"
    # UTF-8 text file to train on (default: Tiny Shakespeare, downloaded once into the cache)
    data: Optional[str] = None
    # output directory: checkpoint.pt, best.pt, loss.png, metrics.jsonl (default: runs/MODEL)
    out: Optional[str] = None
    # optimizer steps to train for
    steps: int = 5000
    time_limit: Optional[float] = None  # stop (validate, save) after this many minutes
    # characters per sequence (per segment for the models that carry memory)
    seq_len: int = 64
    # sequences per step (per process under torchrun)
    batch_size: int = 32
    # noam: Adam with labml's Noam schedule (d_model^-0.5 warm-up then decay, times lr); adamw: AdamW, linear warm-up
    optimizer: str = "noam"
    # peak learning rate (for noam: the multiplier of its schedule)
    lr: float = 1.0
    # optimizer steps of the learning-rate warm-up
    warmup: int = 2000
    # AdamW (noam has its own decay and ignores these): cosine decay of the learning rate from the end
    # of the warm-up down to min_lr_ratio · lr at this step, and that after it; None keeps lr
    decay_steps: Optional[int] = None
    # the learning rate at the end of the cosine decay, as a fraction of lr
    min_lr_ratio: float = 0.0
    # Adam's first-moment decay
    beta1: float = 0.9
    # Adam's second-moment decay
    beta2: float = 0.999
    # decoupled weight decay (AdamW), L2 penalty (noam's Adam)
    weight_decay: float = 0.0
    # largest gradient norm; larger gradients are scaled down to it
    grad_clip: float = 1.0
    # steps between two validations
    eval_interval: int = 100
    # validation batches per evaluation (the same ones every time)
    eval_batches: int = 10
    # steps between two writes of checkpoint.pt
    checkpoint_interval: int = 500
    # consecutive steps with a non-finite loss or gradient norm (each skipped) before the run stops
    max_bad_steps: int = 10
    # seed of the weights, the batch order and dropout
    seed: int = 0
    # fused: the fastest kernels available; reference: every op on its plain-PyTorch path
    backend: str = "fused"
    # cpu or cuda (default: cuda when a GPU is available); the checkpoint records the device used
    device: Optional[str] = None
    # fp32, or bf16: forward and loss under torch.autocast(device, bfloat16), weights and optimizer in float32
    precision: str = "fp32"
    # steps between two records of OUT/metrics.jsonl (and of TensorBoard's scalars)
    log_interval: int = 10
    # also write the metrics as TensorBoard scalars under OUT/tensorboard (needs the tensorboard package)
    tensorboard: bool = False
    # Under torchrun: shard the Switch experts over the ranks instead of replicating them.
    expert_parallel: bool = False
    dist_timeout: float = distributed.DEFAULT_TIMEOUT  # seconds a rank waits for the others in a collective

    def __post_init__(self):
        if self.optimizer not in ("noam", "adamw"):
            raise ValueError(f"optimizer must be 'noam' or 'adamw', got {self.optimizer!r}")
        for name, choices in (("backend", BACKEND_CHOICES), ("device", (None, *DEVICE_CHOICES)),
                              ("precision", PRECISION_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("steps", "seq_len", "batch_size", "eval_interval", "eval_batches", "checkpoint_interval",
                     "warmup", "max_bad_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, low, strict in (("lr", 0.0, True), ("grad_clip", 0.0, True), ("weight_decay", 0.0, False),
                                  ("time_limit", 0.0, True)):
            value = getattr(self, name)
            if value is None and name == "time_limit":
                continue
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup:
            raise ValueError(f"decay_steps must be larger than warmup ({self.warmup}), got {self.decay_steps}")
        if not (math.isfinite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.expert_parallel and self.model != "switch":
            raise ValueError(f"--expert-parallel shards Switch experts; {self.model} has none")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be positive, got {self.dist_timeout}")


def default_train_config(model: str, **overrides) -> TrainConfig:
    """The training settings of ``model``'s recipe under ``preset`` (an override; None: the default
    preset, fastformers.recipes.DEFAULT_PRESET) with ``overrides`` (None values ignored)."""
    preset = overrides.pop("preset", None) or DEFAULT_PRESET
    settings = recipe(model, preset).train
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(model=model, preset=preset, **settings)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not belong to this kind of run."""


class OutputDirError(ValueError):
    """``--out`` cannot hold the run: not a directory, not writable, or in use by another run."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm; the last good checkpoint is kept."""


def prepare_output_dir(out: os.PathLike | str) -> Path:
    """Create ``out`` (and its parents) and check that files can be created in it, so that a bad
    ``--out`` is reported before the first step instead of at the first checkpoint."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise OutputDirError(f"--out {out}: {error.filename} exists and is not a directory") from error
    except NotADirectoryError as error:
        raise OutputDirError(f"--out {out}: a parent of it is a regular file, not a directory") from error
    except OSError as error:
        raise OutputDirError(f"--out {out}: cannot create it ({error.strerror})") from error
    if not out.is_dir():
        raise OutputDirError(f"--out {out}: exists and is not a directory")
    probe = out / f".fastformers-probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"--out {out}: cannot write files in it ({error.strerror})") from error
    return out


class OutputLock:
    """An exclusive lock on ``out`` held while a run writes there, so that two runs never write
    into one directory. ``flock`` locks die with their process, so a crashed run leaves no stale
    lock. Re-entrant within a process (the command line takes it before building the run and
    :meth:`Trainer.run` takes it again)."""

    _held: Dict[Path, list] = {}  # resolved directory -> [file descriptor, depth]

    def __init__(self, out: os.PathLike | str):
        self.path = Path(out).resolve() / LOCK_NAME

    def __enter__(self) -> "OutputLock":
        held = self._held.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirError(f"--out {self.path.parent} is in use by another training run (pid {owner}); "
                                 "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._held[self.path] = [fd, 1]
        return self

    def __exit__(self, *exc_info) -> None:
        held = self._held[self.path]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.path]
            os.close(held[0])  # releases the flock; the file stays (removing it would race a new run)


def backend_context(backend: str):
    """``reference``: every fastformers op on its plain-PyTorch path; ``fused``: the automatic choice."""
    if backend == "reference":
        return _backend.use_backend("reference")
    if backend == "fused":
        return contextlib.nullcontext()
    raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def lr_factor(config: TrainConfig, d_model: int) -> Callable[[int], float]:
    """Multiplier of ``config.lr`` after ``done`` optimizer steps (as labml: its step count starts at 1).

    Noam: ``d_model^-0.5 · min(t^-0.5, t · warmup^-1.5)``; AdamW: linear warm-up to 1, then, with
    ``decay_steps``, cosine decay to ``min_lr_ratio`` at step ``decay_steps``.
    """
    if config.optimizer == "noam":
        return lambda done: d_model ** -0.5 * min((done + 1) ** -0.5, (done + 1) * config.warmup ** -1.5)
    if config.decay_steps is None:
        return lambda done: min(1.0, (done + 1) / config.warmup)
    floor = config.min_lr_ratio

    def warmup_then_cosine(done: int) -> float:
        step = done + 1
        if step <= config.warmup:
            return step / config.warmup
        progress = min(1.0, (step - config.warmup) / (config.decay_steps - config.warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return warmup_then_cosine


def make_optimizer(config: TrainConfig, model: torch.nn.Module, d_model: int):
    """Noam: Adam with L2 ``weight_decay`` (labml's); AdamW: decoupled ``weight_decay`` on the tensors
    of two or more dimensions only (:func:`weight_decay_groups`); both with ``lr_factor``'s schedule."""
    betas = (config.beta1, config.beta2)
    if config.optimizer == "noam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas, eps=1e-8,
                                     weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(weight_decay_groups(model, config.weight_decay), lr=config.lr, betas=betas,
                                      eps=1e-8)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, d_model))


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """AdamW's parameter groups: ``weight_decay`` for the tensors of two or more dimensions (weight
    matrices, embeddings, positional tables), none for biases and norm gains (nanoGPT's rule: decaying
    them only pulls a layer's scale and offset towards 0). No decay: one group, as before the rule
    existed, so that optimizer states saved then still load."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": parameters, "weight_decay": 0.0}]
    return [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood in nats: ``logits`` ``[T, B, V]``, ``targets`` ``[T, B]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _memory_to_save(memory):
    if isinstance(memory, CompressiveMemory):
        return memory.state_dict()
    return memory


def _memory_from_saved(saved, model: LanguageModel, device):
    if isinstance(saved, dict):
        memory = model.new_memory()
        memory.load_state_dict({name: [t.to(device) for t in tensors] for name, tensors in saved.items()})
        return memory
    if saved is None:
        return None
    return [m.to(device) for m in saved]


def atomic_write(path: Path, write: Callable) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``:
    a crash at any moment leaves either the old file or the new one, never half of one. The file
    and then its directory are fsynced, so after a power loss the rename is not lost either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_save(payload: dict, path: Path) -> None:
    """``torch.save(payload)`` to ``path`` with :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def nonfinite_parameters(model: torch.nn.Module) -> List[str]:
    """Names of the parameters of ``model`` holding a NaN or an infinity."""
    return [name for name, parameter in model.named_parameters()
            if not bool(torch.isfinite(parameter.detach()).all())]


def load_checkpoint(path: os.PathLike | str) -> dict:
    """The payload of a checkpoint written by :meth:`Trainer.save`; :class:`CheckpointError` if it
    is missing, truncated, corrupt or not a fastformers language-model checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        # torch.save writes a zip archive; anything else would reach torch.load's
        # legacy unpickler, which fails on random bytes with arbitrary exceptions.
        if not zipfile.is_zipfile(path):
            raise zipfile.BadZipFile("not a zip archive")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError, IndexError,
            KeyError) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be loaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Use an earlier checkpoint or start a new run."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fastformers language-model checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')}, "
                              f"this fastformers reads version {CHECKPOINT_VERSION}")
    for key in CHECKPOINT_KEYS:
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks the key {key!r}: it is damaged or was not written "
                                  "by fastformers train. Use an earlier checkpoint or start a new run.")
    for key in ("train_config", "model_config", "model", "history", "rng"):
        if not isinstance(payload[key], dict):
            raise CheckpointError(f"checkpoint {path}: {key!r} is a {type(payload[key]).__name__}, not a dict")
    payload["path"] = str(path)
    return payload


def model_from_checkpoint(payload: dict, device: str | torch.device = "cpu") -> LanguageModel:
    """The language model saved in ``payload`` (from :func:`load_checkpoint`) on ``device``."""
    where = payload.get("path", "the checkpoint")
    try:
        model = build_model(ModelConfig(**payload["model_config"])).to(device)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {where}: invalid model_config ({error})") from error
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {where}: its weights do not fit its model_config "
                              f"({str(error).splitlines()[0]})") from error
    return model


class Trainer:
    """A training run; build with :meth:`start` (new) or :meth:`resume` (from a checkpoint).

    Under ``torchrun`` (a default process group initialised, see
    :func:`fastformers.distributed.init_process_group`) it is data-parallel: every rank builds
    the same model, trains it wrapped in ``DistributedDataParallel`` on its own ``batch_size``
    columns of a ``W · batch_size`` batch, and only rank 0 reports and writes checkpoints
    (:meth:`save` and evaluation are collective: every rank calls them). With
    ``expert_parallel`` the Switch experts are sharded over the ranks instead of replicated.
    """

    def __init__(self, config: TrainConfig, model_config: ModelConfig, corpus: Corpus,
                 log: Callable[[str], None] = print):
        self.config = config
        self.model_config = model_config
        self.corpus = corpus
        self.distributed = dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.log = log if self.rank == 0 else (lambda line: None)
        if config.expert_parallel and not self.distributed:
            raise ValueError("--expert-parallel needs several processes: launch with "
                             f"torchrun --nproc_per_node N -m fastformers.cli train {config.model} --expert-parallel")
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device cuda: no CUDA GPU is available to torch {torch.__version__} here")
        # the checkpoint records the device chosen, so that a resumed run keeps it
        self.config = config = dataclasses.replace(config, device=self.device.type)
        self.out = Path(config.out or f"runs/{config.model}")
        if self.rank == 0:
            prepare_output_dir(self.out)
        self.model = build_model(model_config).to(self.device)
        self.expert_group, self.expert_names = None, []
        # the module that trains: the model itself, or its DistributedDataParallel wrapper
        self.train_model = self._distribute() if self.distributed else self.model
        self.optimizer, self.scheduler = make_optimizer(config, self.model, model_config.d_model)
        batches = SequentialBatches if self.model.carries_memory else ShuffledBatches
        extra = {} if self.model.carries_memory else {"seed": config.seed}
        self.batches = batches(corpus.train, config.batch_size * self.world_size, config.seq_len, **extra)
        if self.distributed:
            self.batches = RankSlice(self.batches, self.rank, config.batch_size)
            # the same weights everywhere, but each rank its own dropout and token-dropping draws
            torch.manual_seed(config.seed * 1_000_003 + self.rank)
        # Raises now, rather than at the first evaluation, if the validation text is too short.
        SequentialBatches(corpus.valid, config.batch_size, config.seq_len)
        self.memory = None
        self.step = 0
        # "train": each step's loss (NaN for a skipped step); "valid": (step, loss) pairs;
        # "skipped": the steps whose update was skipped for a non-finite loss or gradient norm
        self.history: Dict[str, List] = {"train": [], "valid": [], "skipped": []}
        self.consecutive_bad_steps = 0
        # wall seconds of the run's earlier processes (resumed runs) and the start of this one's
        self.elapsed_before = 0.0
        self.running_since: Optional[float] = None

    def _distribute(self) -> DistributedDataParallel:
        """Check that every rank runs the same configuration, shard the experts (expert
        parallel) and wrap the model in DistributedDataParallel."""
        config = self.config
        distributed.check_same_across_ranks(
            {**dataclasses.asdict(config), **dataclasses.asdict(self.model_config),
             "vocabulary": "".join(self.corpus.vocab.chars)}, what="training configuration")
        if config.expert_parallel:
            # its own group: the exchanges run inside backward, interleaved with DDP's all-reduces
            self.expert_group = dist.new_group(timeout=datetime.timedelta(seconds=config.dist_timeout))
            distributed.to_expert_parallel(self.model, self.expert_group)
            self.expert_names = distributed.expert_parameter_names(self.model)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, self.expert_names)
        return DistributedDataParallel(
            self.model, device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None,
            # the compression only gets gradients in the steps that compress
            find_unused_parameters=config.model == "compressive")

    @classmethod
    def start(cls, config: TrainConfig, log: Callable[[str], None] = print, **model_overrides) -> "Trainer":
        """A new run: seeds every RNG with ``config.seed`` before building the model."""
        corpus = load_corpus(config.data)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        # the preset's architecture, explicit overrides winning
        model_settings = {**recipe(config.model, config.preset).model,
                          **{k: v for k, v in model_overrides.items() if v is not None}}
        model_config = default_model_config(config.model, len(corpus.vocab), **model_settings)
        return cls(config, model_config, corpus, log)

    @classmethod
    def resume(cls, path: os.PathLike | str, log: Callable[[str], None] = print, **train_overrides) -> "Trainer":
        """The run saved at ``path``, continuing exactly; ``train_overrides`` may change
        only how long it runs and how it reports (steps, time_limit, intervals, out)."""
        payload = load_checkpoint(path)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        saved_world_size = payload.get("world_size", 1)
        if saved_world_size != world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by a run of {saved_world_size} process(es); resume it with as "
                f"many (torchrun --nproc_per_node {saved_world_size}), not {world_size}")
        allowed = {"steps", "time_limit", "eval_interval", "checkpoint_interval", "out", "backend", "dist_timeout",
                   "log_interval", "tensorboard"}
        saved = payload["train_config"]
        changed = {k: v for k, v in train_overrides.items() if v is not None and v != saved.get(k)}
        if set(changed) - allowed:
            raise ValueError(f"--resume continues the saved run; cannot change {sorted(set(changed) - allowed)}")
        config = TrainConfig(**{**saved, **changed})
        corpus = load_corpus(config.data)
        if corpus.vocab.chars != payload["vocab"]:
            raise DataError(f"the text {config.data or 'Tiny Shakespeare'} does not have the vocabulary "
                            "the checkpoint was trained with")
        trainer = cls(config, ModelConfig(**payload["model_config"]), corpus, log)
        # what differs between ranks (RNG states, carried memory, expert optimizer state)
        rank_state = payload["ranks"][trainer.rank] if trainer.distributed else payload
        model_state = payload["model"]
        if trainer.expert_names:
            model_state = distributed.shard_expert_state_dict(model_state, trainer.rank, trainer.world_size)
        trainer.model.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(rank_state.get("optimizer", payload["optimizer"]))
        trainer.scheduler.load_state_dict(payload["scheduler"])
        trainer.batches.load_state_dict(payload["data"])
        trainer.memory = _memory_from_saved(rank_state["memory"], trainer.model, trainer.device)
        trainer.step = payload["step"]
        trainer.elapsed_before = payload.get("elapsed_s", 0.0)
        trainer.history = {"skipped": [], **payload["history"]}
        torch.set_rng_state(rank_state["rng"]["torch"])
        random.setstate(rank_state["rng"]["python"])
        if rank_state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank_state["rng"]["cuda"])
        return trainer

    @property
    def best_valid(self) -> float:
        """The lowest finite validation loss so far (inf before any), the one ``best.pt`` holds."""
        return min((loss for _, loss in self.history["valid"] if math.isfinite(loss)), default=math.inf)

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns its cross-entropy (nats), averaged over
        the ranks when distributed.

        A step whose loss or gradient norm is not finite changes nothing (no update, no
        schedule step, the carried memory dropped): it is recorded in ``history["skipped"]``,
        and after ``max_bad_steps`` such steps in a row :class:`TrainingDiverged` is raised."""
        self.model.train()
        epoch = self.batches.epoch
        inputs, targets = next(self.batches)
        if self.batches.epoch != epoch:
            # The stream restarted from the top: the carried memory belongs to the end of the text.
            self.memory = None
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with backend_context(self.config.backend):
            with self.autocast():
                output = self.train_model(inputs, self.memory)
                loss = cross_entropy(output.logits, targets)
                total = loss if output.aux_loss is None else loss + output.aux_loss
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        if self.expert_names:
            # DDP averaged the replicated gradients over the ranks; an expert's is a sum over them
            experts = set(self.expert_names)
            for name, parameter in self.model.named_parameters():
                if name in experts and parameter.grad is not None:
                    parameter.grad.div_(self.world_size)
            grad_norm = distributed.clip_grad_norm_(self.model, self.config.grad_clip, self.expert_names,
                                                    self.expert_group)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.config.grad_clip)
        # Both are equal on every rank (the loss is averaged, the gradients all-reduced), so every
        # rank takes the same decision.
        mean_loss = self._sum_over_ranks(loss.item()) / self.world_size if self.distributed else loss.item()
        self.step += 1
        if not (math.isfinite(mean_loss) and math.isfinite(float(grad_norm))):
            self._skip_bad_step(mean_loss, float(grad_norm))
            return mean_loss
        self.consecutive_bad_steps = 0
        self.optimizer.step()
        self.scheduler.step()
        self.memory = output.memory
        return mean_loss

    def autocast(self):
        """The precision context of the forward pass and the loss: bf16 autocast, or nothing (fp32)."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _skip_bad_step(self, loss: float, grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # the memory came from the same forward: it may hold the non-finite values too
        self.memory = None
        self.history["skipped"].append(self.step)
        self.consecutive_bad_steps += 1
        self.log(f"step {self.step}: loss {loss}, gradient norm {grad_norm}: not finite, update skipped "
                 f"({self.consecutive_bad_steps} in a row, {len(self.history['skipped'])} in all)")
        if self.consecutive_bad_steps >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"{self.consecutive_bad_steps} consecutive steps (up to step {self.step}) had a non-finite loss or "
                f"gradient norm; stopped. The last good checkpoint is {self.out / CHECKPOINT_NAME} (best by "
                f"validation: {self.out / BEST_CHECKPOINT_NAME}). Lower --lr, raise --warmup or lower --grad-clip, "
                "or allow more with --max-bad-steps.")

    def _sum_over_ranks(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        distributed.run_collective("summing over the ranks", None, lambda: dist.all_reduce(total))
        return total.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy (nats) over the first ``eval_batches`` validation batches
        (the same ones every time, so the curve compares like with like); distributed:
        collective, the mean over the ranks."""
        self.model.eval()
        batches = SequentialBatches(self.corpus.valid, self.config.batch_size, self.config.seq_len)
        memory, losses = None, []
        # Some models draw random numbers in evaluation too (Switch token dropping): keep
        # them off the training stream so evaluating never changes the training run.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with backend_context(self.config.backend), self.autocast():
                for _ in range(min(self.config.eval_batches, len(batches))):
                    inputs, targets = next(batches)
                    output = self.model(inputs.to(self.device), memory)
                    memory = output.memory
                    losses.append(cross_entropy(output.logits, targets.to(self.device)).item())
        mean = sum(losses) / len(losses)
        # every rank evaluates the same batches, but Switch's token dropping draws differ
        return self._sum_over_ranks(mean) / self.world_size if self.distributed else mean

    def _rng_state(self) -> dict:
        return {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self, path: Optional[Path] = None) -> Optional[Path]:
        """Write the run to ``path`` atomically. Distributed: collective, rank 0 writes one file
        holding the model in the single-process layout (experts gathered) and each rank's
        RNG states, carried memory and, expert parallel, optimizer state.

        Never writes non-finite weights: then nothing is written (the previous file stays),
        the reason is logged and None is returned."""
        path = path or self.out / CHECKPOINT_NAME
        bad = nonfinite_parameters(self.model)
        if self.distributed:
            # expert shards differ between ranks: refuse everywhere when any rank has a bad one
            bad = bad if self._sum_over_ranks(float(bool(bad))) == 0 else bad or ["(another rank's experts)"]
        if bad:
            self.log(f"step {self.step}: not writing {path}: non-finite values in {', '.join(bad[:3])}"
                     f"{' ...' if len(bad) > 3 else ''}; the previous file is kept")
            return None
        model_state = self.model.state_dict()
        rank_state = {"rng": self._rng_state(), "memory": _memory_to_save(self.memory)}
        ranks = None
        if self.distributed:
            if self.expert_names:
                model_state = distributed.gather_expert_state_dict(model_state, self.expert_group)
                rank_state["optimizer"] = self.optimizer.state_dict()
            ranks = distributed.gather_objects(rank_state)
            if self.rank != 0:
                return path
        atomic_save({
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "train_config": dataclasses.asdict(self.config),
            "model_config": dataclasses.asdict(self.model_config),
            "vocab": self.corpus.vocab.chars,
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "memory": rank_state["memory"],
            "step": self.step,
            "history": self.history,
            "rng": rank_state["rng"],
            "world_size": self.world_size,
            "ranks": ranks,
            "elapsed_s": self.elapsed_s(),
        }, path)
        return path

    def elapsed_s(self) -> float:
        """Wall seconds this run has trained, over every process that continued it."""
        running = time.monotonic() - self.running_since if self.running_since is not None else 0.0
        return self.elapsed_before + running

    def _out_of_time(self, deadline: float) -> bool:
        """Past ``deadline`` on any rank (so that all ranks stop at the same step)."""
        out_of_time = time.monotonic() >= deadline
        if self.distributed and deadline != math.inf:
            return self._sum_over_ranks(float(out_of_time)) > 0
        return out_of_time

    def write_loss_curve(self, path: Optional[Path] = None) -> Optional[Path]:
        """PNG of train (mean over each evaluation interval) and validation bits per character by step."""
        if not self.history["valid"]:
            return None
        path = path or self.out / LOSS_CURVE_NAME
        per_bit = 1 / math.log(2)
        interval = self.config.eval_interval
        train = self.history["train"]
        train_points = []
        for start in range(0, len(train), interval):
            finite = [loss for loss in train[start:start + interval] if math.isfinite(loss)]
            if finite:  # an interval of skipped steps only has no mean to draw
                train_points.append((min(start + interval, len(train)), per_bit * sum(finite) / len(finite)))
        valid_points = [(step, per_bit * nats) for step, nats in self.history["valid"] if math.isfinite(nats)]
        if not train_points and not valid_points:
            return None
        if not plot.available():
            self.log(f"no loss curve: matplotlib is not installed ({plot.INSTALL_HINT})")
            return None
        png = plot.line_chart_png({"train": train_points, "valid": valid_points}, "step", "bits/char")
        atomic_write(path, lambda handle: handle.write(png))
        return path

    def run(self, progress: bool = True) -> Dict[str, List]:
        """Train until ``steps`` (or ``time_limit``), validating, checkpointing (``checkpoint.pt``,
        and ``best.pt`` whenever the validation loss improves) and drawing the loss curve; returns
        the history. Holds the lock of ``out`` throughout (rank 0)."""
        with OutputLock(self.out) if self.rank == 0 else contextlib.nullcontext():
            try:
                return self._run(progress)
            finally:
                self.elapsed_before, self.running_since = self.elapsed_s(), None

    def _run(self, progress: bool) -> Dict[str, List]:
        config = self.config
        self.running_since = time.monotonic()
        deadline = self.running_since + 60 * config.time_limit if config.time_limit else math.inf
        if self.step == 0:
            ranks = ""
            if self.distributed:
                ranks = f", {self.world_size} processes" + (" (experts sharded)" if config.expert_parallel else "")
            self.log(f"{config.model}: {sum(p.numel() for p in self.model.parameters()):,} parameters"
                     f"{' on rank 0' if config.expert_parallel else ''}, vocabulary {self.model_config.n_tokens}, "
                     f"{self.corpus.train.numel():,} training characters, backend {config.backend} on "
                     f"{self.device} in {config.precision}{ranks}")
        with RunReport(self, progress, deadline) as report:
            while self.step < config.steps:
                loss = self.train_step()
                self.history["train"].append(loss)
                report.step_done(loss)
                last = self.step == config.steps or self._out_of_time(deadline)
                evaluate = self.step % config.eval_interval == 0 or last
                if evaluate or self.step % config.log_interval == 0:
                    # measured before evaluating: the throughput of training alone
                    tokens_per_second = report.tokens_per_second()
                    valid = None
                    if evaluate:
                        best = self.best_valid
                        valid = self.evaluate()
                        self.history["valid"].append((self.step, valid))
                        if valid < best:
                            self.save(self.out / BEST_CHECKPOINT_NAME)
                        self.log(f"step {self.step}: train loss {loss:.4f}, valid loss {valid:.4f} nats = "
                                 f"{valid / math.log(2):.4f} bits/char, {tokens_per_second:,.0f} tokens/s")
                    report.record(tokens_per_second, valid)
                if self.step % config.checkpoint_interval == 0 or last:
                    self.save()
                if last:
                    # decided once per step, so every rank leaves the loop at the same step
                    break
        curve = self.write_loss_curve() if self.rank == 0 else None
        if curve is not None:
            self.log(f"checkpoint {self.out / CHECKPOINT_NAME}, loss curve {curve}")
        return self.history


def require_tensorboard() -> None:
    """Raise ValueError naming the missing package when ``torch.utils.tensorboard`` cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


class RunReport:
    """What a run reports besides its log lines, written by rank 0 only (a no-op on the others):

    - ``OUT/metrics.jsonl``: every ``log_interval`` steps and at every evaluation, one JSON object
      per line (step, tokens, mean train loss since the last record, valid loss when evaluated,
      learning rate, training tokens/s, elapsed seconds), flushed at once. A new run starts the
      file afresh; a resumed one first drops the records past its checkpoint's step (those steps
      are trained again), then appends.
    - TensorBoard scalars under ``OUT/tensorboard`` when ``config.tensorboard``.
    - a tqdm progress bar on stderr (loss, tokens/s, time left) when ``progress`` and stderr is a
      terminal; the run's log lines are printed above it meanwhile.
    """

    def __init__(self, trainer: "Trainer", progress: bool, deadline: float):
        self.trainer, self.deadline = trainer, deadline
        config = trainer.config
        self.tokens_per_step = config.seq_len * config.batch_size * trainer.world_size
        self.first_step = trainer.step
        self.window_losses: List[float] = []
        self.window_start = time.perf_counter()
        self.metrics = self.tensorboard = self.bar = None
        self.trainer_log = trainer.log
        if trainer.rank != 0:
            return
        if config.tensorboard:
            require_tensorboard()
        self.metrics = _open_metrics(trainer.out / METRICS_NAME, trainer.step)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run overwrites what the interrupted one logged past its checkpoint
            self.tensorboard = SummaryWriter(str(trainer.out / TENSORBOARD_DIR),
                                             purge_step=trainer.step + 1 if trainer.step else None)
        if progress and sys.stderr.isatty():
            self.bar = self._progress_bar()

    def _progress_bar(self):
        try:
            from tqdm import tqdm
        except ImportError:
            self.trainer_log(f"no progress bar: tqdm is not installed ({plot.INSTALL_HINT})")
            return None
        return tqdm(total=self.trainer.config.steps, initial=self.trainer.step, unit="step", file=sys.stderr,
                    dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def __enter__(self) -> "RunReport":
        if self.bar is not None:
            # every log line of the run (steps skipped, checkpoints refused, ...) goes above the bar
            def above_the_bar(line: str, log=self.trainer.log, bar=self.bar):
                with bar.external_write_mode():
                    log(line)

            self.trainer.log = above_the_bar
        return self

    def __exit__(self, *exc_info) -> None:
        self.trainer.log = self.trainer_log
        for resource in (self.bar, self.tensorboard, self.metrics):
            if resource is not None:
                resource.close()

    def tokens_per_second(self) -> float:
        """Training throughput since the last record (evaluations excluded)."""
        return len(self.window_losses) * self.tokens_per_step / (time.perf_counter() - self.window_start)

    def step_done(self, loss: float) -> None:
        self.window_losses.append(loss)
        if self.bar is None:
            return
        trainer = self.trainer
        # the time left: the remaining steps at this process's pace, or the time limit if sooner
        pace = (time.monotonic() - trainer.running_since) / (trainer.step - self.first_step)
        left = min((trainer.config.steps - trainer.step) * pace, self.deadline - time.monotonic())
        self.bar.set_postfix_str(f"loss {loss:.3f}, {self.tokens_per_second():,.0f} tok/s, "
                                 f"left {self.bar.format_interval(max(left, 0))}", refresh=False)
        self.bar.update(1)

    def record(self, tokens_per_second: float, valid: Optional[float]) -> None:
        """One metrics record at the current step; starts the next throughput window."""
        trainer = self.trainer
        finite = [loss for loss in self.window_losses if math.isfinite(loss)]
        self.window_losses, self.window_start = [], time.perf_counter()
        if trainer.rank != 0:
            return
        record = {"step": trainer.step, "tokens": trainer.step * self.tokens_per_step,
                  "train_loss": sum(finite) / len(finite) if finite else None}
        if valid is not None:
            record["valid_loss"] = valid if math.isfinite(valid) else None  # JSON has no NaN
        record.update(lr=trainer.optimizer.param_groups[0]["lr"], tokens_per_s=tokens_per_second,
                      elapsed_s=trainer.elapsed_s())
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for name in ("train_loss", "valid_loss", "lr", "tokens_per_s"):
                if record.get(name) is not None:
                    self.tensorboard.add_scalar(name, record[name], trainer.step)
            self.tensorboard.flush()


def _open_metrics(path: Path, step: int):
    """``path`` opened for appending the records after ``step`` (see :class:`RunReport`)."""
    if step == 0 or not path.exists():
        return open(path, "w", encoding="utf-8")
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    atomic_write(path, lambda handle: handle.write("".join(kept).encode()))
    return open(path, "a", encoding="utf-8")
