"""Training loop: AdamW, warm-up + cosine decay, clipping, validation, exact resume.

Shape legend: B batch · L sequence length · V vocabulary size.

A run directory holds::

    config.json             what was trained (train, model and task settings, vocabulary)
    metrics.jsonl           one JSON object per line: train loss, validation, test
    checkpoints/step_N/     model.safetensors, optimizer.safetensors, state.json
    results.json            final validation and test metrics (when the run finished)

A checkpoint directory is filled under a temporary name and then renamed in one
``os.replace``, so a checkpoint either exists completely or not at all; the newest
one is what ``resume`` continues from. Nothing is pickled: tensors go to safetensors,
everything else to JSON.

Why resuming is exact: the batch of step ``t`` is a pure function of ``(seed, t)``
(see :mod:`qkv.train.tasks`), the learning rate a pure function of ``t``, and the
checkpoint restores weights, AdamW's moments, the RNG state and the running loss
of the current logging interval. A resumed run therefore performs the same float
operations as an uninterrupted one (on the same machine and thread count).

The files of a run folder are the user's: they may be truncated, edited, or come
from another run. Everything read back is checked first (JSON keys, tensor names
and shapes), and a file that does not fit raises :class:`RunFileError` naming it,
never a KeyError or a shape error from deep inside PyTorch.

A process killed while writing leaves its temporary file or folder behind (their
names end in ``.tmp-<pid>``). A run folder belongs to one training at a time, so
when a run starts or resumes, such leftovers are from a dead process whatever
their pid, and are removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import _checks as C
from . import ddp
from .config import TrainConfig
from .models import ModelConfig, attention_parameter_count, build_model
from .tasks import IGNORE, Batch, CharLMTask, make_task

__all__ = [
    "TIMING_KEYS",
    "RunFileError",
    "TrainConfig",
    "TrainingDiverged",
    "check_run_files",
    "evaluate",
    "finished_results",
    "latest_checkpoint",
    "lr_at",
    "read_metrics",
    "train",
]

#: Metric fields that measure time and so differ between otherwise identical runs.
TIMING_KEYS = ("elapsed_s", "tokens_per_s")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


class RunFileError(ValueError):
    """A file of a run folder cannot be read back: damaged, edited, or another model's.

    A ValueError because the fix is the user's (another folder, another checkpoint),
    like any other bad argument; the message names the file.
    """


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``.

    >>> cfg = TrainConfig("reverse", steps=110, warmup=10, lr=1.0, min_lr=0.0)
    >>> [round(lr_at(s, cfg), 3) for s in (0, 9, 10, 60, 109)]
    [0.1, 1.0, 1.0, 0.5, 0.0]
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# -- loss and evaluation --------------------------------------------------------------
def forward_logits(model, batch: Batch) -> Tensor:
    """Logits ``(B, L, V)`` of a batch, for either model kind."""
    if batch.src is None:
        return model(batch.inputs)
    return model(batch.src, batch.inputs, src_padding=batch.src_padding)


def _token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per position ``(B, L)``, 0 where the label is ``IGNORE``."""
    B, L, V = logits.shape
    return F.cross_entropy(
        logits.reshape(B * L, V).float(),
        labels.reshape(B * L),
        ignore_index=IGNORE,
        reduction="none",
    ).view(B, L)


def _context_parallel_losses(net, batch: Batch, cp: ddp.ContextGroups, max_len: int) -> Tensor:
    """Per-token losses ``(B, L_pad / N)`` of this process's shard of every sequence.

    The sequences are padded at the end to a multiple of ``2 N`` (the zigzag layout,
    which balances the causal work) with ignored labels. Under the causal mask no real
    token attends to a later one, so the padding changes no real token's loss; its
    positions repeat the last embedding row when ``max_len`` does not cover them.
    """
    from ..distributed import context_parallel, shard_sequence

    L = batch.inputs.shape[1]
    pad = (-L) % (2 * cp.size)
    inputs = F.pad(batch.inputs, (0, pad), value=0)  # (B, L_pad); any id: never attended
    labels = F.pad(batch.labels, (0, pad), value=IGNORE)  # (B, L_pad)
    positions = torch.arange(L + pad, device=inputs.device).clamp_(max=max_len - 1)

    def mine(t: Tensor, dim: int) -> Tensor:
        return shard_sequence(t, dim, cp.group, "zigzag")

    with context_parallel(cp.group, "zigzag"):
        logits = net(mine(inputs, 1), positions=mine(positions, 0))  # (B, L_pad / N, V)
    return _token_losses(logits, mine(labels, 1))


@torch.no_grad()
def evaluate(model, batches: list[Batch], info: ddp.DistInfo | None = None) -> dict:
    """Mean loss per answer token, token accuracy and whole-answer accuracy.

    Whole-answer accuracy counts an example as right when every answer token is the
    argmax under teacher forcing; that is exactly when greedy decoding reproduces the
    answer, so it equals exact-match accuracy of generation at the cost of one pass.
    Under torchrun each process evaluates every ``world_size``-th batch and the sums
    are added.
    """
    info = info or ddp.DistInfo()
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, tokens, right tokens, right rows, rows
    for i, batch in enumerate(batches):
        if i % info.world_size != info.rank:
            continue
        batch = batch.to(info.device)
        logits = forward_logits(model, batch)
        real = batch.labels != IGNORE  # (B, L)
        right = (logits.argmax(-1) == batch.labels) & real
        sums += torch.tensor(
            [
                _token_losses(logits, batch.labels).sum().item(),
                real.sum().item(),
                right.sum().item(),
                (right | ~real).all(dim=1).sum().item(),
                len(batch),
            ],
            dtype=torch.float64,
        )
    ddp.all_reduce_sum(sums, info)
    model.train(was_training)
    loss = sums[0].item() / sums[1].item()
    return {
        "loss": loss,
        "bits_per_token": loss / math.log(2),
        "token_acc": sums[2].item() / sums[1].item(),
        "seq_acc": sums[3].item() / sums[4].item(),
    }


# -- files ----------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    """Write JSON atomically: a temporary file in the same folder, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_CHECKPOINT_NAME = re.compile(r"step_(\d+)")
# What save_checkpoint and _write_json name their work in progress (see the module
# docstring); nothing else in a run folder is ever deleted as a leftover.
_TMP_CHECKPOINT = re.compile(r"\.tmp-step_\d+-\d+")
_TMP_FILE = re.compile(r"\.(config\.json|metrics\.jsonl|results\.json|state\.json)\.tmp-\d+")


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step_")))


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Delete the temporary files and folders that killed writers left in run folder ``out``.

    Only names of the form this module writes are touched, whatever pid they carry;
    call it only while no other process writes to ``out``. Returns what was removed.
    """
    out = Path(out)
    removed: list[Path] = []
    if out.is_dir():
        removed += [p for p in out.iterdir() if p.is_file() and _TMP_FILE.fullmatch(p.name)]
    root = out / "checkpoints"
    if root.is_dir():
        removed += [p for p in root.iterdir() if _TMP_CHECKPOINT.fullmatch(p.name)]
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def _read_json(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object from a run folder, with at least ``keys``; else :class:`RunFileError`."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(f"{path} is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"{path} should hold a JSON object, not {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise RunFileError(f"{path} lacks {missing}: it is damaged or was not written by qkv")
    return obj


def _read_tensors(path: Path, like: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The tensors of a safetensors file; with ``like``, exactly its names and shapes."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except SafetensorError as err:
        raise RunFileError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated"
        ) from None
    if like is not None:
        missing, extra = sorted(set(like) - set(tensors)), sorted(set(tensors) - set(like))
        if missing or extra:
            raise RunFileError(
                f"{path} holds another model's weights: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        for name, t in tensors.items():
            if t.shape != like[name].shape:
                raise RunFileError(
                    f"{path} holds another model's weights: {name} is "
                    f"{tuple(t.shape)}, this model's is {tuple(like[name].shape)}"
                )
    return tensors


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_run_files(path: str | Path) -> None:
    """Check that a run folder (or one of its checkpoints) can be loaded for generation.

    Reads config.json and the newest ``model.safetensors`` as
    :func:`qkv.train.generate.load_run` will, and raises :class:`RunFileError`
    naming the file that is damaged or does not fit the model config.json describes.
    A path that holds no run at all is left for ``load_run`` to refuse.
    """
    path = Path(path)
    ckpt = path if (path / "model.safetensors").exists() else latest_checkpoint(path)
    if ckpt is None:
        return
    run_dir = path if ckpt is not path else path.parent.parent
    if not (run_dir / "config.json").exists():
        return
    config = _read_json(run_dir / "config.json", keys=("model", "vocab", "task_kind"))
    if not isinstance(config["model"], dict):
        raise RunFileError(f"{run_dir / 'config.json'}: 'model' should be a JSON object")
    try:
        mcfg = ModelConfig(**config["model"])
    except (TypeError, ValueError) as err:  # the user's file, checked by ModelConfig
        raise RunFileError(f"{run_dir / 'config.json'}: bad model settings ({err})") from None
    if not isinstance(config["vocab"], list):
        raise RunFileError(f"{run_dir / 'config.json'}: 'vocab' should be a JSON list")
    _read_tensors(ckpt / "model.safetensors", like=build_model(mcfg).state_dict())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or ``None``."""
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    """AdamW's state as flat tensors (for safetensors) plus its param groups (for JSON)."""
    sd = opt.state_dict()
    tensors = {
        f"state.{idx}.{name}": t.detach().cpu().contiguous()
        for idx, st in sd["state"].items()
        for name, t in st.items()
    }
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, groups


def _check_optimizer_files(
    ckpt: Path, opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups
) -> None:
    """Refuse optimizer state that does not fit ``opt`` (RunFileError naming the file).

    ``load_state_dict`` would otherwise fail with a message about parameter groups,
    or worse, accept moments of the wrong shape and fail at the next step.
    """
    mine = opt.state_dict()["param_groups"]
    where = ckpt / "state.json"
    if not isinstance(groups, list) or len(groups) != len(mine):
        raise RunFileError(f"{where}: 'param_groups' does not fit this model's optimizer")
    for got, want in zip(groups, mine, strict=True):
        # Extra keys are left to torch (another version may store more); these are
        # the ones AdamW's step reads and that would otherwise fail mid-run.
        if (
            not isinstance(got, dict)
            or got.get("params") != want["params"]
            or not all(_is_number(got.get(k)) for k in ("lr", "eps", "weight_decay"))
            or not (
                isinstance(got.get("betas"), list)
                and len(got["betas"]) == 2
                and all(_is_number(b) for b in got["betas"])
            )
        ):
            raise RunFileError(f"{where}: 'param_groups' does not fit this model's optimizer")
    params = [p for g in opt.param_groups for p in g["params"]]
    where = ckpt / "optimizer.safetensors"
    for key, t in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise RunFileError(f"{where}: unexpected tensor {key!r}")
        idx, name = int(parts[1]), parts[2]
        if idx >= len(params) or name not in ("step", "exp_avg", "exp_avg_sq"):
            raise RunFileError(f"{where}: unexpected tensor {key!r}")
        if name != "step" and t.shape != params[idx].shape:
            raise RunFileError(
                f"{where}: {key} is {tuple(t.shape)}, the parameter is {tuple(params[idx].shape)}"
            )


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict]
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, step: int, model, opt, extra: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step_<step>`` atomically (see the module docstring)."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    tensors, groups = _optimizer_tensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "state.json", {"step": step, "param_groups": groups, **extra})
    for name in ("model.safetensors", "optimizer.safetensors"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # left by a run that was killed after it; same step, same content
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, and what follows, is skipped)."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # the process died while writing this line
        if not isinstance(record, dict) or not _is_int(record.get("step", 0)):
            break  # not a line this module wrote: the file was damaged here
        records.append(record)
    return records


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Keep the records of steps <= ``upto``: later ones are redone by the resumed run.

    The test record is dropped too: it is written after the last step, so a run
    killed between that record and results.json would otherwise get it twice.
    """
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= upto and r.get("split") != "test"]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


# -- the run ----------------------------------------------------------------------------
def build_task(cfg: TrainConfig):
    """The task of ``cfg``, with its options (every field of ``cfg.data`` but the name)."""
    options = asdict(cfg.data)
    return make_task(options.pop("task"), cfg.seed, **options)


def model_config(cfg: TrainConfig, task) -> ModelConfig:
    """The model of ``cfg`` for ``task``: the chosen architecture, the task's sizes."""
    kind = "decoder" if isinstance(task, CharLMTask) else (cfg.model or task.default_model)
    if isinstance(task, CharLMTask) and cfg.model == "encdec":
        raise ValueError("the charlm task needs model='decoder'")
    shared = {f.name for f in fields(ModelConfig)} & {f.name for f in fields(cfg.arch)}
    return ModelConfig(
        kind=kind,
        vocab_size=len(task.vocab),
        max_len=task.max_length(kind),
        **{name: getattr(cfg.arch, name) for name in sorted(shared)},
    )


def run_config(cfg: TrainConfig, task, mcfg: ModelConfig) -> dict:
    """What config.json records: enough to rebuild the model and its vocabulary."""
    return {
        "train": cfg.to_dict(),
        "model": mcfg.to_dict(),
        "task": task.describe(),
        "task_kind": "lm" if isinstance(task, CharLMTask) else "seq",
        "vocab": task.vocab.chars(),
    }


def _param_groups(model) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay}, {"params": other, "weight_decay": 0.0}]


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    threads: int | None = None,
    context_parallel: int = 1,
) -> dict:
    """Train as ``cfg`` says, writing the run directory ``out``; returns the final metrics.

    Args:
        cfg: the run's settings.
        out: run directory (created).
        resume: continue from the newest checkpoint in ``out`` (the config must match).
        progress: show a progress bar (process 0 only).
        threads: torch CPU threads for this process (default: 1 under torchrun).
        context_parallel: split each sequence over this many processes with ring
            attention (decoder models; the number of torchrun processes must be a
            multiple of it, the rest is data parallelism; see :mod:`.ddp`). Like the
            process count it changes how a run is computed, not what is trained, so it
            is not part of the run's settings: a run may resume with another value.

    Raises:
        TrainingDiverged: the loss became NaN or infinite; the last good checkpoint is kept.
        ValueError: bad settings, or ``out`` holds a different run / a run without ``resume``.
    """
    info = ddp.init_distributed(cfg.device)
    saved_threads = torch.get_num_threads()
    try:
        results = _train(cfg, Path(out), resume, progress, threads, info, context_parallel)
        ddp.barrier(info)  # every process is done talking before any leaves the group
        return results
    finally:
        torch.set_num_threads(saved_threads)  # callers in this process keep their setting
        ddp.shutdown(info)


class _Lines:
    """A stream for tqdm off a terminal: every refresh becomes a line of its own.

    tqdm redraws its bar by writing a carriage return and the new bar; a log file or a
    pipe keeps them all, so one physical line grows for the whole run.
    """

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    total: int, initial: int, desc: str, *, file=None, mininterval: float | None = None
):
    """A tqdm bar: redrawn in place on a terminal; elsewhere one short line every 30 s
    (``mininterval``), without carriage returns."""
    import sys

    from tqdm.auto import tqdm

    stream = sys.stderr if file is None else file
    tty = hasattr(stream, "isatty") and stream.isatty()
    if tty:
        return tqdm(total=total, initial=initial, desc=desc, unit="step", file=stream)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        file=_Lines(stream),
        mininterval=30.0 if mininterval is None else mininterval,
        ncols=80,
        ascii=True,
    )


def _train(
    cfg, out: Path, resume, progress, threads, info: ddp.DistInfo, context_parallel: int = 1
) -> dict:
    """Set up, claim the run folder, start or resume, run the steps, evaluate and finish."""
    cp, task, mcfg = _set_up(cfg, threads, info, context_parallel)
    ckpt, finished = _claim_folder(cfg, out, resume, run_config(cfg, task, mcfg), info)
    if finished is not None:
        return finished  # a finished run: resuming it changes nothing, appends nothing
    run, start, acc = _start(cfg, out, resume and ckpt is not None, ckpt, info, cp, task, mcfg)
    _loop(run, start, acc, progress)
    return _finish(run)


@dataclass
class _Run:
    """What the pieces of one training share once it has started."""

    cfg: TrainConfig
    out: Path
    info: ddp.DistInfo
    cp: ddp.ContextGroups
    task: object
    mcfg: ModelConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    net: torch.nn.Module  # the model as trained: wrapped in DDP under torchrun
    val: list[Batch]

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (process 0 only)."""
        if self.info.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _set_up(cfg: TrainConfig, threads, info: ddp.DistInfo, context_parallel: int):
    """Threads, process groups, task and model config; refuses settings that cannot run.

    Returns ``(context groups, task, model config)``.
    """
    if threads is None and info.distributed:
        threads = 1  # N processes on N cores: one thread each avoids oversubscription
    if threads is not None:
        torch.set_num_threads(C.check_positive_int("threads", threads))
    cp = ddp.context_groups(info, context_parallel)
    if cfg.batch_size % cp.data_size:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the number of processes "
            f"({info.world_size})"
            + (f" divided by context_parallel={cp.size}" if cp.size > 1 else "")
        )
    task = build_task(cfg)
    mcfg = model_config(cfg, task)
    if cp.size > 1 and mcfg.kind != "decoder":
        raise ValueError(
            f"context_parallel={cp.size} splits decoder-only models; the {cfg.task} task "
            f"trains an {mcfg.kind} model here (pass --model decoder)"
        )
    return cp, task, mcfg


def _claim_folder(
    cfg: TrainConfig, out: Path, resume: bool, settings: dict, info: ddp.DistInfo
) -> tuple[Path | None, dict | None]:
    """Check that ``out`` may hold this run, clean it, and write config.json for a new one.

    Returns ``(newest checkpoint or None, results of an already finished run or None)``.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a run folder; choose another --out")
    ckpt = latest_checkpoint(out)
    holds_run = out.exists() and (out / "config.json").exists()
    # Every rank looks before rank 0 may write config.json below; otherwise a slower
    # rank would find the fresh file and refuse the run as "already there".
    ddp.barrier(info)
    if holds_run:
        if not resume:
            raise ValueError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        saved = _read_json(out / "config.json")
        if saved != settings:
            train_saved = saved.get("train")
            train_saved = train_saved if isinstance(train_saved, dict) else {}
            diff = sorted(k for k in cfg.to_dict() if train_saved.get(k) != cfg.to_dict()[k])
            raise ValueError(f"cannot resume {out}: its settings differ in {diff or 'the task'}")
    elif resume:
        # Resuming nothing is refused rather than quietly starting afresh: the user
        # asked to continue a run, and a typo in --out must not cost a new training
        # (nor leave a new folder behind). Dropping --resume starts one on purpose.
        raise ValueError(
            f"cannot resume {out}: it holds no run (no config.json); "
            "leave out --resume to start a new run there"
        )
    if info.is_main and out.is_dir():
        remove_stale_temporaries(out)
    if holds_run:
        done = finished_results(out, cfg.steps)
        if done is not None:
            return ckpt, done
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", settings)
    ddp.barrier(info)
    return ckpt, None


def _start(
    cfg: TrainConfig, out: Path, restore: bool, ckpt: Path | None, info, cp, task, mcfg
) -> tuple[_Run, int, dict]:
    """Build model and optimiser, restore checkpoint ``ckpt`` when ``restore``.

    Also trims metrics.jsonl to the restored step. Returns ``(run, first step, running
    train loss of the current logging interval)``.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(info.device)
    opt = torch.optim.AdamW(
        _param_groups(model), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    start, acc = 0, {"loss": 0.0, "steps": 0, "tokens": 0}
    if restore:
        start, acc = _restore(ckpt, model, opt, cfg)
    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        if start == 0:
            metrics_path.write_text("", encoding="utf-8")
        else:
            _rewrite_metrics(metrics_path, start)
    net = ddp.wrap(model, info)
    val = task.eval_batches("val", cfg.eval_examples, 256, mcfg.kind)
    return _Run(cfg, out, info, cp, task, mcfg, model, opt, net, val), start, acc


def _loop(run: _Run, start: int, acc: dict, progress: bool) -> None:
    """Steps ``start .. cfg.steps``: train, and log, validate and checkpoint on schedule."""
    cfg, info = run.cfg, run.info
    bar = None
    if progress and info.is_main:
        bar = progress_bar(cfg.steps, start, f"{cfg.task}/{cfg.attention}")
    t0, tokens_t0 = time.perf_counter(), 0
    run.model.train()
    for step in range(start, cfg.steps):
        lr, step_loss, norm, tokens = _step(run, step)
        acc["loss"] += step_loss
        acc["steps"] += 1
        acc["tokens"] += tokens
        tokens_t0 += tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - t0
            record = {
                "step": done,
                "split": "train",
                "loss": acc["loss"] / acc["steps"],
                "lr": lr,
                "grad_norm": norm,
                "elapsed_s": elapsed,
                "tokens_per_s": tokens_t0 / max(elapsed, 1e-9),
            }
            run.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            acc = {"loss": 0.0, "steps": 0, "tokens": 0}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            run.log({"step": done, "split": "val", **evaluate(run.model, run.val, info)})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if info.is_main:
                save_checkpoint(run.out, done, run.model, run.opt, {"acc": acc})
            ddp.barrier(info)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _step(run: _Run, step: int) -> tuple[float, float, float, int]:
    """One optimiser step on batch ``step``; returns ``(lr, loss, grad norm, tokens)``.

    ``loss`` is the global batch's mean loss per answer token and ``tokens`` the global
    batch's size in token positions (for the throughput).
    """
    cfg, info, cp = run.cfg, run.info, run.cp
    lr = lr_at(step, cfg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    shard = cfg.batch_size // cp.data_size
    full = run.task.train_batch(step, cfg.batch_size, run.mcfg.kind)
    n_tokens = int((full.labels != IGNORE).sum())  # over the global batch
    batch = full.rows(cp.data_rank * shard, (cp.data_rank + 1) * shard).to(info.device)
    if cp.group is None:
        losses = _token_losses(forward_logits(run.net, batch), batch.labels)
    else:
        losses = _context_parallel_losses(run.net, batch, cp, run.mcfg.max_len)
    # Sum over this shard / tokens of the whole batch, times the number of processes
    # (DDP averages gradients): every process's gradient adds up to the global mean.
    # With context parallelism a shard is part of each row; ring attention's backward
    # hands every process the gradient of all processes' losses through its keys and
    # values, so the same sum over all processes is again the global mean's gradient.
    loss = losses.sum() * (info.world_size / n_tokens)
    total = ddp.all_reduce_sum(losses.sum().detach().double().cpu().reshape(1), info)
    step_loss = total.item() / n_tokens
    if not math.isfinite(step_loss):
        raise TrainingDiverged(_diverged_message("loss", step_loss, step, run.out))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip).item()
    if not math.isfinite(norm):
        raise TrainingDiverged(_diverged_message("gradient norm", norm, step, run.out))
    run.opt.step()
    return lr, step_loss, norm, int(full.inputs.numel())


def _finish(run: _Run) -> dict:
    """Validate and test the final weights; write the test record and results.json."""
    cfg, model, info = run.cfg, run.model, run.info
    test = run.task.eval_batches("test", cfg.test_examples, 256, run.mcfg.kind)
    results = {
        "task": cfg.task,
        "attention": cfg.attention,
        "model": run.mcfg.kind,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attention_parameters": attention_parameter_count(model),
        "val": evaluate(model, run.val, info),
        "test": evaluate(model, test, info),
    }
    if info.is_main:
        run.log({"step": cfg.steps, "split": "test", **results["test"]})
        _write_json(run.out / "results.json", results)
    return results


def finished_results(out: str | Path, steps: int) -> dict | None:
    """The results of run folder ``out`` when it has finished all ``steps``, else ``None``.

    Finished means: the newest checkpoint is the last step and results.json (written
    last of all) can be read. A damaged results.json counts as unfinished, so a
    resume evaluates the final weights again and rewrites it.
    """
    out = Path(out)
    ckpt = latest_checkpoint(out)
    if ckpt is None or int(ckpt.name.removeprefix("step_")) != steps:
        return None
    try:
        results = _read_json(out / "results.json", keys=("test", "val"))
    except (RunFileError, OSError):
        return None
    return results if isinstance(results["test"], dict) else None


def _restore(ckpt: Path, model, opt: torch.optim.Optimizer, cfg: TrainConfig) -> tuple[int, dict]:
    """Load checkpoint ``ckpt`` into ``model`` and ``opt``; returns (step, running loss).

    Every file is checked before anything is loaded, so a damaged checkpoint raises
    :class:`RunFileError` naming the file and leaves the model untouched.
    """
    weights = _read_tensors(ckpt / "model.safetensors", like=model.state_dict())
    state = _read_json(ckpt / "state.json", keys=("step", "acc", "param_groups"))
    step, acc = state["step"], state["acc"]
    if not _is_int(step) or not 0 < step <= cfg.steps:
        raise RunFileError(f"{ckpt / 'state.json'}: step should be in 1..{cfg.steps}, got {step!r}")
    if not (
        isinstance(acc, dict)
        and _is_number(acc.get("loss"))
        and _is_int(acc.get("steps"))
        and _is_int(acc.get("tokens"))
    ):
        raise RunFileError(f"{ckpt / 'state.json'}: 'acc' should hold loss, steps and tokens")
    tensors = _read_tensors(ckpt / "optimizer.safetensors")
    rng = tensors.pop("rng.torch", None)
    expected = torch.get_rng_state()
    if rng is None or rng.dtype != expected.dtype or rng.shape != expected.shape:
        raise RunFileError(f"{ckpt / 'optimizer.safetensors'}: no valid 'rng.torch' state")
    _check_optimizer_files(ckpt, opt, tensors, state["param_groups"])
    model.load_state_dict(weights)
    torch.set_rng_state(rng)
    _load_optimizer(opt, tensors, state["param_groups"])
    return step, acc


def _diverged_message(what: str, value: float, step: int, out: Path) -> str:
    last = latest_checkpoint(out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    return (
        f"training diverged: the {what} became {value} at step {step + 1}; stopped without "
        f"saving, {kept} (try a lower --lr or a smaller --grad-clip)"
    )
