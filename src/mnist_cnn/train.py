"""Training: one loop over in-memory batches, an EMA of the weights, atomic per-epoch checkpoints.

A run folder holds everything about a run:
    config.json                 the TrainConfig (enough to rebuild and re-run)
    metrics.jsonl               one line per finished epoch
    checkpoint.safetensors      the last finished epoch: weights, EMA, optimizer state (resume)
    teacher_targets.safetensors with a teacher: its probabilities for the training images (resume)
                                (both removed once the run is finished: `drop_resume_state`)
    model.safetensors           the weights kept: the last epoch's, or the best epoch's by
                                validation accuracy (`select`)
    report.json + figures       written at the end by `evaluate.write_report`
Every file is replaced atomically, so a run killed at any moment loses at most the current epoch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from tqdm import tqdm

from mnist_cnn.augment import (
    cutout,
    sample_cutout,
    sample_displacement,
    sample_thickness,
    sample_transforms,
    thicken,
    transform,
)
from mnist_cnn.config import CannotResume, Diverged, TrainConfig, corrupt, write_atomic
from mnist_cnn.data import MNIST, TRAIN_SIZE, normalize
from mnist_cnn.model import build_model


# --------------------------------------------------------------------------- hardware
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CPU with AVX-512 BF16 or AMX, a GPU from
    Ampere on (older GPUs report bf16 as supported through a slow emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_fast_bf16()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a run, or None for plain fp32. Auto is bf16 where it is native,
    else fp32 (not fp16 on older GPUs: fp16 would need loss scaling)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r} (use auto, fp32 or bf16)")
    return torch.bfloat16 if has_native_bf16(device) else None


def inference_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to score a run with: the run's own, except that a run trained with
    `--precision bf16` is scored in fp32 where bf16 is not native (on such a CPU bf16
    inference measured 8.9× slower; docs/PERFORMANCE.md). Its report.json then reads fp32's
    validation accuracy, which may differ by an image from metrics.jsonl's, read in bf16."""
    if precision == "bf16" and not has_native_bf16(device):
        return None
    return resolve_precision(precision, device)


def precision_name(amp: torch.dtype | None) -> str:
    """How a report's numbers were computed ("bf16" or "fp32"), for report.json's `scored_in`:
    the same weights can read an image differently in the other."""
    return "bf16" if amp == torch.bfloat16 else "fp32"


def autocast(device: torch.device, amp: torch.dtype | None):
    """Mixed precision when `amp` is a dtype, plain fp32 when it is None."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def prepare_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    model = build_model(
        cfg.model, width=cfg.width, dropout=tuple(cfg.dropout), padding=cfg.padding
    )
    # channels-last lets oneDNN (CPU) and cuDNN (GPU) pick their fastest convolution kernels.
    return model.to(device=device, memory_format=torch.channels_last)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; with cfg.weight_decay > 0, decoupled weight decay (AdamW: every step multiplies the
    weights by 1 - lr * weight_decay, apart from the gradient statistics; at 0 it is Adam).
    Or SGD with Nesterov momentum 0.9 and weight decay as an L2 term in the gradient."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer != "adam":
        raise ValueError(f"optimizer must be 'adam' or 'sgd', not {cfg.optimizer!r}")
    # The fused kernel does Adam's whole update in one pass over the weights: training steps
    # 8% faster than the per-op (foreach) version on the 2-core CPU (docs/PERFORMANCE.md).
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )


# The weight average's batch-norm statistics are gathered on this many training images (the
# first; about a second an epoch for the strong model, nothing for the reference layers).
BN_IMAGES = 10_000


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: torch.Tensor, device: torch.device,
    amp: torch.dtype | None = None, batch: int = 256,
) -> None:
    """Recompute the batch-norm statistics of `model` on uint8 images [N, 28, 28], unaugmented
    and with dropout off (as the model will be used): the average over batches of equal size
    (within one image), so every image counts the same.

    The weight average (EMA) has no statistics of its own: the live model's were gathered for
    other weights, on augmented images, with dropout on. Leaves the model in eval mode; a model
    without batch norm is left as it is."""
    model.eval()  # dropout off ...
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    if not norms:
        return
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all batches
        bn.train()  # ... while batch norm gathers statistics
    for chunk in torch.tensor_split(images, math.ceil(len(images) / batch)):
        x = normalize(chunk.to(device).unsqueeze(1).float().div_(255.0))
        with autocast(device, amp):
            model(x.contiguous(memory_format=torch.channels_last))
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


# --------------------------------------------------------------------------- evaluation helpers
@torch.inference_mode()
def predict_proba(
    model: nn.Module, images: torch.Tensor, device: torch.device,
    amp: torch.dtype | None = None, chunk: int | None = None,
) -> torch.Tensor:
    """Softmax probabilities [N, 10] (float32, CPU) for uint8 images [N, 28, 28].

    Any number of images can be passed; they are run in chunks. On CPU a chunk is 256 images:
    the first convolution's output for 256 images (12.5 MB in bf16) stays in cache, and a batch
    of 1,000 runs 2.5× faster as four chunks than in one piece (docs/PERFORMANCE.md).
    """
    chunk = chunk or (256 if device.type == "cpu" else 4096)
    model.eval()
    out = []
    for i in range(0, len(images), chunk):
        x = normalize(images[i : i + chunk].to(device)).contiguous(
            memory_format=torch.channels_last
        )
        with autocast(device, amp):
            logits = model(x)
        out.append(logits.float().softmax(1).cpu())
    return torch.cat(out)


def teacher_runs(folder: str | Path) -> list[Path]:
    """The runs of a teacher folder (the run itself, or every member of an ensemble), each
    checked to be finished and to have its weights: a half-trained ensemble is refused, not
    silently read as a smaller one."""
    from mnist_cnn.ensemble import is_ensemble, member_dirs  # ensemble imports train

    folder = Path(folder)
    ensemble = folder.is_dir() and is_ensemble(folder)
    runs = member_dirs(folder) if ensemble else [folder] if folder.is_dir() else []
    lacking = [r for r in runs if not (run_finished(r) and (r / "model.safetensors").is_file())]
    if not runs or lacking:
        if not runs:
            why = "not a folder" if folder.exists() else "it does not exist"
        elif ensemble:
            why = f"{', '.join(r.name for r in lacking)} unfinished or without model.safetensors"
        elif not (folder / "config.json").is_file():
            why = "no run in it"  # an evaluate --out, say: a report, no weights
        else:
            why = "unfinished or without model.safetensors"
        raise ValueError(f"{folder} is not a finished run or ensemble folder ({why})")
    return runs


def teacher_probabilities(
    folder: str | Path, images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The teacher's softmax outputs [N, 10] (on the CPU) for uint8 images [N, 28, 28]: a run's,
    or an ensemble's averaged, without test-time augmentation."""
    from mnist_cnn.ensemble import ensemble_probas

    return ensemble_probas(teacher_runs(folder), [images.cpu()], device)[0]


def soften(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities p softened by the temperature: softmax(log p / T) = p^(1/T), normalized."""
    return (p.clamp_min(1e-30).log() / temperature).softmax(1)


TEACHER_FILE = "teacher_targets.safetensors"


def kept_teacher_probabilities(run_dir: Path, cfg: TrainConfig) -> torch.Tensor | None:
    """The teacher's probabilities a run keeps in its folder (TEACHER_FILE, 2.2 MB for 55,000
    images), written when it began: a resumed run reads them instead of asking the teacher
    again, which may have moved since. None if absent, unreadable, another teacher's or not one
    row per training image: they are a copy, and the teacher, where it still is, labels the
    images again."""
    try:
        tensors, meta = read_safetensors(run_dir / TEACHER_FILE)
        if json.loads(meta.get("teacher", "null")) != cfg.teacher:
            return None
        p = tensors["probabilities"].float()
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):  # absent, or damaged
        return None
    return p if p.shape == (min(cfg.train_subset or TRAIN_SIZE, TRAIN_SIZE), 10) else None


def training_images(cfg: TrainConfig, data: MNIST) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels a run trains on (all 55,000, or the first train_subset)."""
    x, y = data.train_images, data.train_labels
    return (x[: cfg.train_subset], y[: cfg.train_subset]) if cfg.train_subset else (x, y)


def _soft_targets(
    cfg: TrainConfig, run_dir: Path, images: torch.Tensor, device: torch.device, resume: bool,
    teacher_probs: torch.Tensor | None, write: bool, log,
) -> torch.Tensor:
    """The run's soft targets: its teacher's probabilities for the training images, softened.
    A fresh run takes them from `teacher_probs` (an ensemble labels once for all its members)
    or from the teacher, and keeps them in its folder; a resumed run reads the kept copy."""
    p = kept_teacher_probabilities(run_dir, cfg) if resume else None
    if p is not None:
        log(f"Soft targets from the teacher {cfg.teacher} (kept in {TEACHER_FILE})")
    else:
        log(f"Soft targets from the teacher {cfg.teacher}")
        p = teacher_probs if teacher_probs is not None else teacher_probabilities(
            cfg.teacher, images, device)
        if write:
            _atomic_save({"probabilities": p.contiguous()}, run_dir / TEACHER_FILE,
                         {"teacher": cfg.teacher})
    return soften(p, cfg.teacher_temperature).to(device)


def distillation_loss(
    logits: torch.Tensor, soft: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T² × KL(soft ‖ softmax(logits / T)), averaged over the batch (Hinton et al., 2015): 0 when
    the student's softened outputs are the targets; T² keeps its gradient on the scale of the
    cross-entropy's."""
    log_q = (logits.float() / temperature).log_softmax(1)
    return F.kl_div(log_q, soft, reduction="batchmean") * temperature**2


def loss_and_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return loss, (probs.argmax(1) == labels).float().mean().item()


def accuracy_halves(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Accuracy on the even- and on the odd-numbered images apart."""
    hit = (probs.argmax(1) == labels).float()
    return [hit[0::2].mean().item(), hit[1::2].mean().item()]


# --------------------------------------------------------------------------- checkpoints
def save_weights(path: Path, model: nn.Module, metadata: dict | None = None) -> None:
    """Save a state dict as safetensors (no pickle), atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_save(tensors, path, metadata)


def load_weights(path: Path, model: nn.Module) -> None:
    what = f"weights of the {type(model).__name__} its config.json names"
    try:
        tensors, _ = read_safetensors(path)
    except (SafetensorError, ValueError) as e:  # truncated or not safetensors
        raise corrupt(path, what, e) from None
    _load_state(model, tensors, path, what)


def _load_state(module: nn.Module, tensors: dict, path: Path, what: str) -> None:
    """load_state_dict, after checking names and shapes so that another architecture's file
    (an edited config.json) is reported as such rather than as a RuntimeError."""
    expected = module.state_dict()
    odd = sorted(expected.keys() ^ tensors.keys())
    if odd:
        side = "missing" if odd[0] in expected else "unexpected"
        raise corrupt(path, what, ValueError(f"{side} tensor {odd[0]}"))
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            want = list(expected[name].shape)
            raise corrupt(path, what, ValueError(
                f"{name} has shape {list(tensor.shape)}, the model's is {want}"))
    module.load_state_dict(tensors)


def read_safetensors(
    path: Path, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and the metadata in its header (with tensors=False, the
    header alone is read). Python reads the file and safetensors parses the bytes: its own file
    functions take only paths that are valid UTF-8, and would call a file in a folder named in
    another encoding damaged. Raises SafetensorError or ValueError for a damaged file."""
    with open(path, "rb") as f:
        # The format: the header's length (8 bytes, little-endian), the header (JSON), the data.
        data = f.read() if tensors else f.read(8)
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > 100_000_000:
            raise ValueError("no safetensors header")
        header = data[8 : 8 + size] if tensors else f.read(size)
    meta = json.loads(header).get("__metadata__") if header.startswith(b"{") else None
    if not isinstance(meta, (dict, type(None))):
        raise ValueError("its metadata is not a JSON object")
    return (load(data) if tensors else {}), meta or {}


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write safetensors atomically (config.write_atomic). Serialized in memory and written
    with open(), not safetensors' save_file, which makes its files readable by their owner only
    (a server run by another account could not read the weights); this way they get the
    umask's permissions, as every other file here."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    write_atomic(path, save(tensors, metadata=meta))


def _save_checkpoint(path: Path, model, ema, optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema.{k}": v.detach().cpu() for k, v in ema.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
    state = state | {"param_groups": opt["param_groups"]}
    _atomic_save({k: v.contiguous() for k, v in tensors.items()}, path, {"state": state})


# The numbers every line of metrics.jsonl has (the training writes more).
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def read_history(run_dir: Path, epochs: int | None = None) -> list[dict]:
    """A run's metrics.jsonl, one dict per finished epoch; with `epochs`, the first that many
    only, and the lines after them (newer than the checkpoint: half a line, say, written as the
    disk filled) are not parsed. A last line cut short is left out; other damage is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        text = path.read_text()
        lines = [line for line in text.splitlines() if line.strip()][:epochs]
        if epochs is None and lines and not text.endswith("\n"):
            try:
                json.loads(lines[-1])
            except ValueError:  # a line cut short by a crash or a full disk: not an epoch
                lines.pop()
        history = [json.loads(line) for line in lines]
        for h in history:
            if not isinstance(h, dict):
                raise ValueError("a line is not a JSON object")
            # What the report, the figures and --resume read of an epoch: a line without one
            # (edited by hand, or from another tool) is damage, not a KeyError later.
            missing = [k for k in HISTORY_KEYS if not isinstance(h.get(k), (int, float))]
            if missing:
                raise ValueError(f"epoch line without a number for {', '.join(missing)}")
        return history
    except ValueError as e:  # not UTF-8, not JSON, or not objects
        raise corrupt(path, "a run's metrics (a JSON object a line)", e) from None


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Batches of `batch_size` images, the last one taking the remainder. A remainder too small
    to give every process two images joins the batch before it: batch norm in training mode
    cannot normalize one image whose features are 1×1 (the strong model's last layer), and a
    step on one image is mostly noise. The default 55,000 images in batches of 256 leave 216."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and 0 < n % batch_size < 2 * world else steps


def run_finished(run_dir: Path) -> bool:
    """Whether a run folder's training is complete: a report.json of all its epochs, and a
    checkpoint (if kept) at the last one. report.json alone is not enough: `mnist-cnn evaluate`
    of a half-trained run writes one too."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.safetensors"
    if not ((run_dir / "report.json").is_file() and (run_dir / "config.json").is_file()):
        return False
    epochs = TrainConfig.load(run_dir / "config.json").epochs
    reported = read_report(run_dir, needs=("epochs",))["epochs"]
    return reported == epochs and (
        not ckpt.is_file() or _read_checkpoint(ckpt)[1]["epoch"] >= epochs)


UNIFORM_LOSS = math.log(10)  # the cross-entropy of guessing each digit at 10%


def drop_resume_state(run_dir: Path) -> None:
    """Remove what only resuming reads, once the run's report is written (it is finished, and
    nothing resumes a finished run): the checkpoint is four times the kept weights (weights,
    their average, Adam's two moments), 52 MB for the reference layers. Best effort: a file the
    system will not let go of (a permission) leaves the run as finished as it is."""
    for name in ("checkpoint.safetensors", TEACHER_FILE):
        with contextlib.suppress(OSError):
            (Path(run_dir) / name).unlink(missing_ok=True)


# What a run's report.json is read for (the command line's summary of it).
REPORT_KEYS = ("test_accuracy", "test_errors", "val_accuracy", "epochs", "best_epoch",
               "train_seconds")


def read_report(run_dir: Path, needs: tuple[str, ...] = REPORT_KEYS) -> dict:
    """A run (or ensemble) folder's report.json; a damaged one, or one without the keys `needs`,
    is a CorruptFile."""
    from mnist_cnn.ensemble import is_ensemble  # ensemble imports train

    path = Path(run_dir) / "report.json"
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict):
            raise TypeError(f"a JSON {type(report).__name__}, not an object")
        missing = [key for key in needs if key not in report]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (ValueError, TypeError, KeyError) as e:
        what = "an ensemble's" if is_ensemble(run_dir) else "a run's"  # only when it is said
        raise corrupt(path, f"{what} report.json", e) from None
    return report


def _read_checkpoint(path: Path, tensors: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's training state in its header (epoch, step, ...), and its tensors when
    asked (else only the header is read), in one read of the file."""
    try:
        found, meta = read_safetensors(path, tensors)
        return found, json.loads(meta["state"])
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise corrupt(path, "a training checkpoint", e) from None


def _load_checkpoint(path: Path, model, ema, optimizer, device) -> dict:
    tensors, state = _read_checkpoint(path, tensors=True)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    what = f"a training checkpoint of the {type(model).__name__} its config.json names"
    _load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path, what)
    if ema is not None:
        _load_state(ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, path, what)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            if key != "step":
                # Give the moments their weight's memory layout (channels-last for the convs):
                # the fused Adam kernel walks both in memory order and would pair wrong elements.
                v = torch.empty_like(params[int(idx)]).copy_(v)
            opt_state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


# --------------------------------------------------------------------------- training
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """One-cycle: linear warm-up from lr/10 to lr, then linear decay to 0 at the last step."""
    warm = max(1, int(total * cfg.warmup))
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch has its own seed for data order, rotations and dropout, so a resumed run
    continues exactly as if it had never stopped."""
    return seed * 1_000_003 + epoch


@dataclass
class Interrupted(Exception):
    """Raised on Ctrl-C after the last finished epoch is safely on disk."""

    run_dir: Path
    epochs_done: int


@dataclass
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_setup(device_name: str) -> tuple[Dist, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on
    CUDA, one GPU per process. Returns this process's place and the device it should use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device_name
    import torch.distributed as tdist

    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    else:
        device_name = "cpu"
        # Each process gets its share of the cores instead of all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size()), device_name


def train(
    cfg: TrainConfig, run_dir: Path, data: MNIST, device: torch.device,
    resume: bool = False, progress: bool = True, log=print, dist: Dist | None = None,
    on_epoch_end=None, teacher_probs: torch.Tensor | None = None,
) -> list[dict]:
    """Train (or resume) a run in `run_dir`; return the metrics history, one dict per epoch.

    Under torchrun (`dist.world > 1`) every process walks the same shuffled order and the same
    rotations, and takes its own slice of each global batch of `cfg.batch_size` images;
    DistributedDataParallel averages the gradients, so the step equals the single-process one.
    Only rank 0 validates, writes files and prints. `on_epoch_end(epoch, model)` is called on
    rank 0 after each epoch with the model that is validated (used by the benchmark).
    `teacher_probs`, with `cfg.teacher`: the teacher's probabilities for the training images,
    if the caller has them already (`teacher_probabilities`); else the teacher is asked.
    A resumed run keeps the batches it began with; one whose last batch the processes cannot
    share with an image each (two for the batch-norm models) raises CannotResume first.
    """
    dist = dist or Dist()
    if cfg.select not in ("last", "best"):
        raise ValueError(f"select must be 'last' or 'best', not {cfg.select!r}")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    amp = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # initialization: the same on every rank
    model = prepare_model(cfg, device)
    ema = copy.deepcopy(model) if cfg.ema > 0 else None
    optimizer = make_optimizer(model, cfg)

    train_x, train_y = training_images(cfg, data)
    train_x, train_y = train_x.to(device), train_y.to(device)
    n = len(train_x)
    metrics_path = run_dir / "metrics.jsonl"
    ckpt_path = run_dir / "checkpoint.safetensors"
    steps_per_epoch = batches_per_epoch(n, cfg.batch_size, dist.world)
    begun = _read_checkpoint(ckpt_path)[1] if resume else {"epoch": 0}
    if begun["epoch"] and begun["step"] != begun["epoch"] * steps_per_epoch:
        # Begun with other batches (another number of processes, or before a last batch of
        # one image joined the one before it): keep them, so it goes on as it began.
        steps_per_epoch = begun["step"] // begun["epoch"]
        last = n - (steps_per_epoch - 1) * cfg.batch_size
        need = cfg.min_share()
        if need <= last < need * dist.world:
            # Checked before any process waits on another: every one of them stops here. (A
            # strong run's last batch of one image never finished an epoch: batch norm refused.)
            raise CannotResume(
                f"{run_dir} began with a last batch of {last} images, which {dist.world} "
                f"processes cannot share with {need} or more each"
                f"{' (batch norm)' if need == 2 else ''}: resume it in {last // need} "
                f"process{'es' if last // need > 1 else ''} or fewer"
            )
    total_steps = steps_per_epoch * cfg.epochs
    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    soft = None
    if cfg.teacher:
        soft = _soft_targets(cfg, run_dir, train_x, device, resume, teacher_probs,
                             write=dist.main, log=log)

    history: list[dict] = []
    state = {"epoch": 0, "step": 0, "best_val": -1.0, "best_epoch": 0, "train_seconds": 0.0}
    if resume:
        state = _load_checkpoint(ckpt_path, model, ema, optimizer, device)
        # Keep the metrics of finished epochs only (a line may be newer than the checkpoint).
        history = read_history(run_dir, state["epoch"])
        log(f"Resuming {run_dir} after epoch {state['epoch']} of {cfg.epochs}")
    elif dist.main:
        cfg.save(run_dir / "config.json")
    if dist.main:
        write_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())
    progress = progress and dist.main

    step = state["step"]
    max_rotation = cfg.rotation()
    # Whether an augmented batch needs resampling at all (every geometric amount 0: it does not).
    resample = bool(
        max_rotation or cfg.max_shift or cfg.max_scale or cfg.max_shear or cfg.elastic > 0
    )
    diverging = False  # warned of once
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            seed = epoch_seed(cfg.seed, epoch)
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed + dist.rank)  # dropout masks
            order = torch.randperm(n, generator=gen).to(device)
            augment = cfg.augment and epoch <= cfg.epochs - cfg.n_clean_epochs()
            net.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            bar = tqdm(
                range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                disable=not progress, unit="batch", dynamic_ncols=True,
            )
            for i in bar:
                # The last batch takes the remainder (batches_per_epoch).
                end = (i + 1) * cfg.batch_size if i < steps_per_epoch - 1 else n
                idx = order[i * cfg.batch_size : end]
                # Transforms are drawn for the whole global batch, so every rank stays in step.
                params = sample_transforms(
                    len(idx), max_rotation, cfg.max_shift, cfg.max_scale, gen,
                    max_shear=cfg.max_shear,
                ) if augment else None
                field = sample_displacement(
                    len(idx), train_x.shape[-1], cfg.elastic, cfg.elastic_sigma, gen
                ) if augment and cfg.elastic > 0 else None
                # Each drawn after those that existed before it, and only when on, so runs
                # without it draw exactly what they did before it existed.
                thick = sample_thickness(
                    len(idx), cfg.max_thickness, gen
                ) if augment and cfg.max_thickness > 0 else None
                holes = sample_cutout(
                    len(idx), train_x.shape[-1], gen
                ) if augment and cfg.cutout > 0 else None
                if dist.world > 1:
                    idx = idx[dist.rank :: dist.world]
                    params = params[dist.rank :: dist.world] if params is not None else None
                    field = field[dist.rank :: dist.world] if field is not None else None
                    thick = thick[dist.rank :: dist.world] if thick is not None else None
                    holes = holes[dist.rank :: dist.world] if holes is not None else None
                x = train_x[idx].unsqueeze(1).float().div_(255.0)
                if thick is not None:
                    x = thicken(x, thick)
                if params is not None and resample:
                    x = transform(x, params, field)
                if holes is not None:
                    x = cutout(x, holes, cfg.cutout)
                x = normalize(x).contiguous(memory_format=torch.channels_last)
                y = train_y[idx]
                lr = lr_at(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, amp):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if soft is not None:  # train_loss is then this mixture, not a cross-entropy
                    w = cfg.teacher_weight
                    kd = distillation_loss(logits, soft[idx], cfg.teacher_temperature)
                    loss = (1 - w) * loss + w * kd
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if ema is not None:
                    # Warm the average up: early on, trust the recent weights more.
                    d = min(cfg.ema, (1 + step) / (10 + step))
                    with torch.no_grad():
                        torch._foreach_lerp_(
                            list(ema.parameters()), list(model.parameters()), 1 - d
                        )
                        # Its batch-norm statistics are not averaged: the end of the epoch
                        # recomputes them for it (recalibrate_batchnorm).
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == y).sum()
                if progress and (i % 20 == 0 or i == steps_per_epoch - 1):
                    seen = end / dist.world
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}"
                    )
            bar.close()
            if dist.world > 1:
                import torch.distributed as tdist

                tdist.all_reduce(loss_sum)
                tdist.all_reduce(correct)
            if not torch.isfinite(loss_sum):  # every process sees the same sum: all stop here
                raise Diverged(
                    f"the training of {run_dir} diverged in epoch {epoch} (its loss is "
                    f"{loss_sum.item() / n}): start a new run (another --out) with a lower "
                    f"--lr (this one's: {cfg.lr:g})")
            train_seconds = time.perf_counter() - t0
            if not dist.main:
                continue
            evaluated = ema if ema is not None else model
            if ema is not None:
                # Its own batch-norm statistics; the average never feeds back into training.
                recalibrate_batchnorm(ema, train_x[:BN_IMAGES], device, amp)
            probs = predict_proba(evaluated, data.val_images, device, amp)
            val_loss, val_acc = loss_and_accuracy(probs, data.val_labels)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / n,
                "train_accuracy": correct.item() / n,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": lr,
                "seconds": time.perf_counter() - t0,
                "train_seconds": train_seconds,
            }
            # Accuracy on the even- and odd-numbered validation images apart: choosing the best
            # epoch on one half and reading the other tells whether picking the best of many
            # epochs finds better models or luckier readings (scripts/summarize_runs.py).
            row["val_accuracy_halves"] = accuracy_halves(probs, data.val_labels)
            if ema is not None:
                # The raw weights are exactly what a run without the average would have (the
                # average never feeds back into training), so this one number measures the EMA.
                raw = predict_proba(model, data.val_images, device, amp)
                row["val_accuracy_raw"] = loss_and_accuracy(raw, data.val_labels)[1]
            history.append(row)
            state["train_seconds"] += row["seconds"]
            if cfg.select == "last" or val_acc > state["best_val"]:
                state["best_val"], state["best_epoch"] = val_acc, epoch
                save_weights(
                    run_dir / "model.safetensors", evaluated,
                    {"epoch": epoch, "val_accuracy": val_acc},
                )
            # Metrics first, then the checkpoint: on resume, lines past the checkpoint are dropped.
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            state |= {"epoch": epoch, "step": step}
            _save_checkpoint(ckpt_path, model, ema, optimizer, dict(state))
            log(
                f"epoch {epoch:3d}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
                f"{' *' if state['best_epoch'] == epoch else '  '} | lr {lr:.2e} | "
                f"{row['seconds']:.1f}s"
            )
            if not cfg.teacher and row["train_loss"] > 2 * UNIFORM_LOSS and not diverging:
                # Adam keeps its steps bounded, so far too high a rate rarely reaches nan: the
                # loss climbs instead, above what guessing every digit at 10% scores (ln 10).
                diverging = True
                log(f"warning: the training loss ({row['train_loss']:.3g}) is above twice that "
                    f"of a uniform guess ({UNIFORM_LOSS:.2f}): training is diverging; a lower "
                    f"--lr than {cfg.lr:g} should help")
            if on_epoch_end is not None:
                on_epoch_end(epoch, evaluated)
    except KeyboardInterrupt:
        raise Interrupted(run_dir, len(history)) from None
    return history
