"""The `mnist-cnn` command: train and evaluate (`python -m mnist_cnn` is the same)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import ipaddress
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from mnist_cnn import __version__
from mnist_cnn.config import (
    AUGMENT_VALUES,
    CHOICES,
    FAST,
    MODEL_NAMES,
    TTA_BY_DEFAULT,
    CannotResume,
    CorruptFile,
    DataError,
    Diverged,
    TrainConfig,
)

DEFAULTS = TrainConfig()
SEED_MAX = 2**32 - 1  # the largest --seed (an ensemble's members too: seed, seed + 1, ...)


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, no traceback."""


def _dropout(text: str) -> tuple[float, float]:
    try:
        p1, p2 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two drop rates like 0.3,0.7, got {text!r}"
        ) from None
    if not (0 <= p1 < 1 and 0 <= p2 < 1):
        raise argparse.ArgumentTypeError(f"drop rates must be in [0, 1), got {text!r}")
    return p1, p2


def _bounded(kind, low, inclusive: bool, high=None, below: bool = False):
    """An argparse type: a finite number of `kind` above `low` (or at least `low` when
    inclusive), and at most `high` if given (below `high` with `below`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):  # nan passes the tests below
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (value == low and not inclusive):
            word = f"{low} or more" if inclusive else "positive"
            raise argparse.ArgumentTypeError(f"must be {word}, got {text!r}")
        if high is not None and (value > high or (value == high and below)):
            raise argparse.ArgumentTypeError(
                f"must be {'below ' if below else ''}{high}{'' if below else ' or less'}, "
                f"got {text!r}")
        return value

    return parse


def _positive(kind):
    return _bounded(kind, 0, inclusive=False)


_nonnegative = _bounded(float, 0, inclusive=True)
_nonnegative_int = _bounded(int, 0, inclusive=True)
_unit = _bounded(float, 0, inclusive=True, high=1)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute (default: auto = cuda if available, else cpu)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with the MNIST files (default: $MNIST_DATA_DIR, else "
                        "~/.cache/mnist-cnn; missing files are downloaded and verified)")


def _add_recipe(t: argparse.ArgumentParser) -> None:
    """The training-recipe flags shared by train and ensemble."""
    d = DEFAULTS
    t.add_argument("--model", choices=MODEL_NAMES,
                   help=f"architecture: reference (the reference table), strong (batch norm, "
                        f"more and smaller convolutions) or m7 (batch norm, four 7x7 "
                        f"convolutions: a member unlike strong, for mixed ensembles) "
                        f"(default: {d.model})")
    t.add_argument("--width", type=_bounded(float, 0, inclusive=False, high=8), metavar="W",
                   help="strong and m7 only: multiply the channels by W (strong at 1.5: "
                        f"48/96/192 channels, about 2.2x the arithmetic) (default: {d.width:g})")
    # Recipe flags default to None: unset ones take the value of the recipe (defaults or --fast).
    t.add_argument("--epochs", type=_positive(int), metavar="N",
                   help=f"epochs to train (default: {d.epochs})")
    t.add_argument("--batch-size", type=_positive(int), metavar="N",
                   help=f"images per training step (default: {d.batch_size})")
    t.add_argument("--optimizer", choices=CHOICES["optimizer"],
                   help="adam, or sgd with Nesterov momentum 0.9; both follow the one-cycle "
                        f"schedule (default: {d.optimizer})")
    t.add_argument("--lr", type=_positive(float), metavar="X",
                   help=f"peak learning rate of the one-cycle schedule (default: {d.lr}; "
                        "sgd wants a far larger one, e.g. 0.1)")
    t.add_argument("--weight-decay", type=_nonnegative, metavar="WD",
                   help="weight decay: with adam decoupled (AdamW), each step multiplies the "
                        "weights by 1 - lr × WD; with sgd an L2 term WD × w in the gradient "
                        f"(default: {d.weight_decay:g}, off)")
    # Each epoch's seed is derived from it in 64-bit arithmetic (train.epoch_seed): bounded.
    t.add_argument("--seed", type=_bounded(int, 0, inclusive=True, high=SEED_MAX), metavar="N",
                   help=f"seed for initialization, data order, rotations and dropout "
                        f"(default: {d.seed})")
    _add_common(t)
    t.add_argument("--max-rotation", type=_nonnegative, metavar="DEG",
                   help="random rotation uniform in ±DEG degrees (default: "
                        f"{d.rotation():g} for the reference model, "
                        f"{TrainConfig(model='strong').rotation():g} for strong and m7)")
    t.add_argument("--max-shift", type=_nonnegative, metavar="PX",
                   help="random shift uniform in ±PX pixels on each axis "
                        f"(default: {d.max_shift:g})")
    t.add_argument("--max-scale", type=_nonnegative, metavar="FRAC",
                   help="random scale uniform in 1 ± FRAC, FRAC below 1 "
                        f"(default: {d.max_scale:g})")
    t.add_argument("--max-shear", type=_nonnegative, metavar="K",
                   help="random slant: horizontal shear uniform in ±K (0.2 leans a vertical "
                        f"stroke by about 11 degrees) (default: {d.max_shear:g}, off)")
    t.add_argument("--elastic", type=_nonnegative, metavar="ALPHA",
                   help="elastic distortion strength in pixels, Simard et al.'s is 34 "
                        f"(default: {d.elastic:g}, off)")
    t.add_argument("--elastic-sigma", type=_positive(float), metavar="PX",
                   help=f"smoothness of the elastic distortion (default: {d.elastic_sigma:g})")
    t.add_argument("--max-thickness", type=_unit, metavar="T",
                   help="random stroke thickness change uniform in ±T, T at most 1 (a change "
                        "of +1 is a 3x3 dilation, strokes a pixel wider each side; -1 an "
                        "erosion) (default: "
                        f"{d.max_thickness:g}, off)")
    t.add_argument("--cutout", type=_nonnegative, metavar="PX",
                   help="erase a random PX x PX square of each training image to background "
                        f"(cutout) (default: {d.cutout:g}, off)")
    t.add_argument("--clean-epochs", type=_nonnegative_int, metavar="K",
                   help="train the last K epochs without augmentation (default: for the "
                        "reference model a tenth of the epochs, rounded down, "
                        f"{d.n_clean_epochs()} of {d.epochs}; for strong and m7 0)")
    t.add_argument("--no-augment", action="store_true", help="train without augmentation")
    t.add_argument("--dropout", type=_dropout, metavar="P1,P2",
                   help="drop rates of the two dropout layers "
                        f"(default: {d.dropout[0]:g},{d.dropout[1]:g})")
    t.add_argument("--padding", choices=CHOICES["padding"],
                   help=f"the reference model's convolution padding; its table leaves it open "
                        f"(default: {d.padding})")
    t.add_argument("--ema", type=_bounded(float, 0, inclusive=True, high=1, below=True),
                   metavar="DECAY",
                   help="decay of the weight moving average that is validated and saved, "
                        f"below 1; 0 turns it off (default: {d.ema})")
    t.add_argument("--select", choices=CHOICES["select"],
                   help="which epoch's weights the run keeps: the last, or the best by "
                        f"validation accuracy (default: {d.select})")
    t.add_argument("--label-smoothing", type=_bounded(float, 0, inclusive=True, high=0.99),
                   metavar="EPS",
                   help=f"label smoothing of the loss (default: {d.label_smoothing:g})")
    t.add_argument("--teacher", metavar="DIR",
                   help="distill: also fit the softened outputs of this finished run or "
                        "ensemble folder on the training images (default: none)")
    t.add_argument("--teacher-weight", type=_unit, metavar="W",
                   help="with --teacher: weight of the teacher's targets in the loss, the "
                        f"labels' is 1 - W (default: {d.teacher_weight:g})")
    t.add_argument("--teacher-temperature", type=_positive(float), metavar="T",
                   help="with --teacher: divides the log of the teacher's probabilities and "
                        "the student's logits, which softens both "
                        f"(default: {d.teacher_temperature:g})")
    t.add_argument("--precision", choices=CHOICES["precision"],
                   help="auto = bf16 autocast where the hardware runs it fast, else fp32 "
                        f"(default: {d.precision})")
    t.add_argument("--train-subset", type=_positive(int), metavar="N",
                   help="train on the first N training images only (quick trials, tests)")
    t.add_argument("--fast", action="store_true",
                   help=f"the time-to-99%% recipe ({FAST.epochs} epochs, batch "
                        f"{FAST.batch_size}, lr {FAST.lr} with {100 * FAST.warmup:.0f}%% of "
                        f"the steps warming up, no dropout, no augmentation, EMA {FAST.ema}, label "
                        f"smoothing {FAST.label_smoothing}); other flags still apply, except "
                        "augmentation flags (it has none to shape)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-cnn",
        description="Train and evaluate a CNN digit classifier on MNIST (with figures of what "
        "it gets wrong), classify digits in your own images and serve a page to draw on: the "
        "reference project's layers (the default) or stronger models (--model strong, m7).",
    )
    parser.add_argument("--version", action="version", version=f"mnist-cnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train", help="train a model and write a run folder",
        description="Train the reference CNN (or --model strong, m7) with the default recipe and "
        "write a run folder: "
        "model.safetensors, config.json, metrics.jsonl, report.json and four figures. "
        "Checkpoints are saved after every epoch; Ctrl-C stops cleanly and --resume continues.",
    )
    _add_recipe(t)
    t.add_argument("--out", metavar="DIR", type=Path,
                   help="run folder to write (default: a new folder under runs/)")
    t.add_argument("--resume", metavar="RUN_DIR", type=Path,
                   help="continue an interrupted run with its saved settings")

    en = sub.add_parser(
        "ensemble", help="train N models with consecutive seeds and average them",
        description="Train N models with seeds --seed, --seed+1, ... (one ordinary run folder "
        "each, inside --out), average their softmax outputs and write the ensemble's "
        "report.json and figures into --out. Finished members are reused and an interrupted "
        "one is resumed, so running the same command again (with the same --out) continues an "
        "interrupted ensemble.",
    )
    en.add_argument("--models", type=_positive(int), default=3, metavar="N",
                    help="members (default: 3)")
    en.add_argument("--tta", action=argparse.BooleanOptionalAction,
                    help="test-time augmentation: score each member on the image and six copies "
                         "shifted by a pixel or turned by 8 degrees, averaged (default: on for "
                         "the reference model, off for strong and m7, as chosen on validation; an "
                         "ensemble continued without either flag keeps its own)")
    _add_recipe(en)
    en.add_argument("--out", metavar="DIR", type=Path,
                    help="ensemble folder (default: a new folder under runs/)")

    e = sub.add_parser(
        "evaluate", help="evaluate a run or ensemble folder on the test set",
        description="Rebuild the kept model of a run folder (or the members of an ensemble "
        "folder) and score it on the 10,000 test images; writes report.json and the figures "
        "(the same numbers as at the end of training).",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                   help="a folder written by train or ensemble")
    _add_common(e)
    e.add_argument("--out", metavar="DIR", type=Path,
                   help="where to write report.json and figures (default: RUN_DIR)")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="ensemble folders: score with or without test-time augmentation (also "
                        "spelled --tta on, --tta off; default: as the ensemble was made; "
                        "scored in place, the folder keeps the choice for predict and serve)")
    pr = sub.add_parser(
        "predict", help="classify digits in image files",
        description="Classify the digit in each image (PNG, JPEG, BMP, GIF, WebP; any size, "
        "colour or grayscale, dark ink on light paper or light on dark). Each image is turned "
        "into a 28×28 MNIST-style image first. Prints the top 3 digits per file. Exits 1 if "
        "any file could not be classified (the others still are).",
    )
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    pr.add_argument("--checkpoint", metavar="DIR", type=Path,
                    help="a run or ensemble folder to use (an ensemble's members averaged, "
                         "through test-time augmentation if it was made with it; default: the "
                         "model shipped with the package)")
    pr.add_argument("--json", action="store_true",
                    help='one JSON object per line and file: {"file", "prediction", '
                         '"probabilities"} or {"file", "error"}')
    pr.add_argument("--save-preprocessed", metavar="DIR", type=Path,
                    help="write the 28×28 images the model saw into DIR (x.png for x.jpg; "
                         "files already there are kept: x-2.png, x-3.png instead)")
    pr.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                    help="where to compute (default: cpu)")
    b = sub.add_parser(
        "bench", help="measure training and inference speed against a PyTorch baseline",
        description="Measure, in one run on this machine: training throughput, one epoch's time, "
        "inference throughput at batch 1000, single-image latency, the matmul rate and the "
        "model's FLOPs, and time to 99.0%/99.5% test accuracy; the same for a tutorial-style "
        "eager fp32 DataLoader baseline. Prints a table; --json writes the numbers. Takes about "
        "7 minutes on 2 cores with AVX-512 BF16, 23 on 2 AVX2 cores (fp32).",
    )
    b.add_argument("--json", metavar="FILE", type=Path, help="write the results as JSON")
    b.add_argument("--quick", action="store_true",
                   help="a reduced run (under a minute) without time-to-accuracy")
    _add_common(b)

    sv = sub.add_parser(
        "serve", help="web page to draw a digit on, and a JSON API",
        description="Serve a page with a canvas to draw a digit on (prediction updated as you "
        "draw) and POST /api/predict (multipart field `image`); OpenAPI schema at /openapi.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (loopback: only this machine can connect; "
                    "'': every address, IPv4 and IPv6, so other machines can; 0.0.0.0: every "
                    "IPv4 one)")
    sv.add_argument("--port", type=_bounded(int, 0, inclusive=False, high=65535), default=8000,
                    metavar="N", help="port to listen on")
    # '%(default).0s' prints nothing; its presence stops ArgumentDefaultsHelpFormatter from
    # adding '(default: None)' after the default said in words.
    sv.add_argument("--checkpoint", metavar="DIR", type=Path,
                    help="a run or ensemble folder to use (an ensemble's members averaged, "
                         "through test-time augmentation if it was made with it; default: the "
                         "model shipped with the package)%(default).0s")
    sv.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                    help="where to compute")
    # A word no command knows is reported with that command's usage (main), not the top one.
    parser.set_defaults(command_parsers=sub.choices)
    return parser


def _refuse_stray_results(folder: Path, shown: str) -> None:
    """Weights or a report in a new run's or ensemble's --out without a run around them (an
    evaluate --out, a copy): not to be overwritten, nor left beside new results as if theirs."""
    held = [name for name in ("model.safetensors", "report.json") if (folder / name).exists()]
    if held:
        raise UserError(f"{shown} already holds {' and '.join(held)}: choose another --out")


def _check_out(path: Path, flag: str, hint: str = "") -> None:
    """Refuse an output folder that cannot be made (a file in the way, no permission) at once, in
    one line, instead of with a traceback after loading data or training."""
    existing = path
    # os.path's tests, not Path's: they read a folder we may not enter (or a dangling link) as
    # "not there" instead of raising, so the loop climbs to what we can report on.
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is in the way (not a folder){hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {existing}{hint}")


def _new_run_dir() -> Path:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


# The recipe flags whose value replaces the recipe's (defaults, or --fast); unset ones are None.
RECIPE_VALUES = ("model", "width", "optimizer", "epochs", "batch_size", "lr", "weight_decay",
                 "seed", "max_rotation", "max_shift", "max_scale", "max_shear", "elastic",
                 "elastic_sigma", "max_thickness", "cutout", "clean_epochs", "padding", "ema",
                 "label_smoothing", "select", "precision", "train_subset", "teacher",
                 "teacher_weight", "teacher_temperature", "dropout")


def _recipe_flags_given(args: argparse.Namespace) -> list[str]:
    """The recipe flags on the command line, as typed."""
    given = [n for n in RECIPE_VALUES if getattr(args, n) is not None]
    given += [n for n in ("fast", "no_augment") if getattr(args, n)]
    return [f"--{n.replace('_', '-')}" for n in given]


def _config_from_args(
    args: argparse.Namespace, world: int = 1, main: bool = True
) -> TrainConfig:
    """The recipe (defaults, or --fast) with every flag the user gave applied on top, for a
    training in `world` processes (`main`: this is the one that prints notes)."""
    base = FAST if args.fast else DEFAULTS
    given = {name: getattr(args, name) for name in RECIPE_VALUES if getattr(args, name) is not None}
    if args.dropout is not None:
        given["dropout"] = tuple(args.dropout)
    if args.no_augment:
        given["augment"] = False
    cfg = dataclasses.replace(base, **given)
    if not cfg.augment:
        # Training would apply none of them while config.json recorded them: refuse instead.
        moot = [f"--{n.replace('_', '-')}" for n in AUGMENT_VALUES if getattr(args, n) is not None]
        if moot:
            why = ("--no-augment" if args.no_augment
                   else "--fast (its recipe trains without augmentation)")
            raise UserError(f"{', '.join(moot)} {'has' if len(moot) == 1 else 'have'} no effect "
                            f"with {why}: leave {'it' if len(moot) == 1 else 'them'} out")
    if cfg.width != 1 and cfg.model == "reference":
        raise UserError("--width applies to --model strong and m7 only (the reference layers are "
                        "fixed)")
    if args.padding is not None and cfg.model != "reference" and main:
        # A note, not an error: an ensemble begun with it continues with or without it.
        print(f"mnist-cnn: note: --padding applies to the reference model; the {cfg.model} "
              "model's convolutions have their own", file=sys.stderr)
    if cfg.max_scale >= 1:
        raise UserError(f"--max-scale {cfg.max_scale:g} would scale digits by 1 - "
                        f"{cfg.max_scale:g} <= 0: give a fraction below 1 (0.1 is ±10%)")
    need = cfg.min_share()
    if min(cfg.batch_size, cfg.train_subset or cfg.batch_size) < need * world:
        if world == 1:  # only a batch-norm model can get here (--batch-size is 1 or more)
            raise UserError(f"--model {cfg.model} trains with batch norm, which needs 2 images "
                            "or more a batch: give --batch-size and --train-subset of 2 or more")
        raise UserError(
            f"--model {cfg.model} in {world} processes needs --batch-size (and --train-subset) "
            f"of {need * world} or more: each process's share of a batch must hold "
            f"{'2 images (batch norm)' if need == 2 else 'an image'}")
    if cfg.teacher is not None:
        # Absolute, so that resuming from another working folder still finds it.
        cfg = dataclasses.replace(cfg, teacher=str(_check_teacher(cfg.teacher, "--teacher")))
    elif args.teacher_weight is not None or args.teacher_temperature is not None:
        raise UserError("--teacher-weight and --teacher-temperature apply with --teacher only")
    from mnist_cnn.data import TRAIN_SIZE

    if cfg.train_subset is not None and cfg.train_subset > TRAIN_SIZE:
        raise UserError(f"--train-subset {cfg.train_subset} is more than the "
                        f"{TRAIN_SIZE:,} training images")
    if cfg.clean_epochs is not None and cfg.clean_epochs > cfg.epochs:
        raise UserError(f"--clean-epochs {cfg.clean_epochs} is more than the {cfg.epochs} epochs")
    return cfg


def _check_teacher(teacher: str, what: str) -> Path:
    from mnist_cnn.train import teacher_runs

    path = Path(teacher).resolve()
    try:
        teacher_runs(path)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    return path


def _load_data(args: argparse.Namespace, quiet: bool = False):
    from mnist_cnn.data import load_mnist, resolve_data_dir

    if not quiet:
        print(f"MNIST: {resolve_data_dir(args.data_dir)} (verifying checksums)", file=sys.stderr)
    return load_mnist(args.data_dir, progress=sys.stderr.isatty() and not quiet)


def _device(name: str):
    from mnist_cnn.train import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def _warn_if_slow_bf16(cfg: TrainConfig, device, say=print, resuming: bool = False) -> None:
    """bf16 asked for where it is not native runs, but many times slower than fp32 (12× for
    training on an AVX2 CPU, docs/PERFORMANCE.md): say so before the long wait."""
    from mnist_cnn.train import has_native_bf16

    if cfg.precision == "bf16" and not has_native_bf16(device):
        which = ("this CPU has no native bf16 (AVX-512 BF16 or AMX)" if device.type == "cpu"
                 else "this GPU has no native bf16 (it came with Ampere)")
        new_run = "a new run with " if resuming else ""
        say(f"mnist-cnn: warning: {which}, so bf16 runs many times slower than fp32 here; "
            f"{new_run}--precision auto (the default) would use fp32", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_cnn.ensemble import is_ensemble
    from mnist_cnn.evaluate import load_run, write_report
    from mnist_cnn.model import count_params
    from mnist_cnn.train import (
        Interrupted,
        distributed_setup,
        drop_resume_state,
        kept_teacher_probabilities,
        prepare_model,
        read_report,
        run_finished,
        train,
    )

    # Under `torchrun --nproc-per-node N --no-python mnist-cnn train ...` this joins the group.
    dist, device_name = distributed_setup(args.device)
    device = _device(device_name)
    say = print if dist.main else (lambda *a, **k: None)
    if args.resume:
        ignored = _recipe_flags_given(args) + (["--out"] if args.out else [])
        if ignored:
            raise UserError(f"--resume continues a run with the settings in its config.json; "
                            f"leave out {', '.join(ignored)} (or start a new run with --out)")
        run_dir = args.resume
        if is_ensemble(run_dir):
            raise UserError(f"{run_dir} is an ensemble folder: continue it with the mnist-cnn "
                            "ensemble command that made it (it resumes its members)")
        if not run_dir.is_dir():
            raise UserError(f"--resume {run_dir}: " + ("not a folder" if run_dir.exists()
                                                      else "it does not exist"))
        if not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} has no config.json to resume from")
        cfg = TrainConfig.load(run_dir / "config.json")
        if run_finished(run_dir):  # (its checkpoint removed when it finished)
            say(f"{run_dir} has finished all its epochs: nothing to resume", file=sys.stderr)
            if dist.main:
                _print_report(read_report(run_dir), run_dir, wrote=False)
            _end_distributed(dist)
            return 0
        if not (run_dir / "checkpoint.safetensors").is_file():
            raise UserError(f"{run_dir} has no checkpoint.safetensors to resume from")
        _check_out(run_dir, "--resume")
        if cfg.teacher is not None and kept_teacher_probabilities(run_dir, cfg) is None:
            # Without the probabilities kept in the run folder (runs begun before they were)
            # the teacher must label the images again, and it may have moved since.
            _check_teacher(cfg.teacher, "this run's teacher (its config.json)")
    else:
        cfg = _config_from_args(args, dist.world, dist.main)
        run_dir = args.out or _new_run_dir()
        if dist.world > 1:  # every rank must write to rank 0's folder
            import torch.distributed as tdist

            shared = [run_dir]
            tdist.broadcast_object_list(shared, src=0)
            run_dir = shared[0]
        _check_out(run_dir, "--out")
        if is_ensemble(run_dir):
            raise UserError(f"--out {run_dir} is an ensemble folder: choose another --out")
        if run_finished(run_dir):
            raise UserError(f"{run_dir} holds a finished run: choose another --out")
        if (run_dir / "checkpoint.safetensors").exists():
            raise UserError(
                f"{run_dir} already holds a run: resume it with --resume {run_dir}, "
                "or choose another --out"
            )
        # (A config.json alone is a run stopped before its first epoch: nothing lost.)
        _refuse_stray_results(run_dir, f"{run_dir}")
    _warn_if_slow_bf16(cfg, device, say, resuming=bool(args.resume))
    new_folder = not args.resume and not run_dir.exists()
    # How to continue it: under torchrun, by the same kind of launch (over several machines,
    # whose processes each this one cannot count, in general terms).
    resume = f"mnist-cnn train --resume {run_dir}"
    if dist.world > 1:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(dist.world))
        resume = (f"torchrun --nproc-per-node {per_node} --no-python {resume}"
                  if per_node == str(dist.world) else f"the same torchrun launch, of {resume}")
    try:
        data = _load_data(args, quiet=not dist.main)
        params = count_params(prepare_model(cfg, device))
        say(
            f"Training {cfg.model} CNN ({params:,} parameters) on {device}"
            f"{f' × {dist.world} processes' if dist.world > 1 else ''} for {cfg.epochs} "
            f"epoch{'s' if cfg.epochs > 1 else ''}, "
            f"batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed} → {run_dir}",
            file=sys.stderr,
        )
        history = train(cfg, run_dir, data, device, resume=bool(args.resume),
                        progress=sys.stderr.isatty(), log=lambda s: say(s, flush=True), dist=dist)
    except (Interrupted, KeyboardInterrupt) as stop:
        # Interrupted: in an epoch, the finished ones saved. A bare KeyboardInterrupt: before
        # the first one began (the data, the model, the teacher's labels being prepared).
        if not (run_dir / "checkpoint.safetensors").is_file():
            if new_folder and dist.main:  # made by this run, and holds nothing worth keeping
                shutil.rmtree(run_dir, ignore_errors=True)
            say("\nInterrupted before the first epoch ended: nothing was saved; run the same "
                "command again to start over.", file=sys.stderr)
            return 130
        n = stop.epochs_done if isinstance(stop, Interrupted) else None
        saved = ("its finished epochs are" if n is None
                 else f"{n} finished epoch{' is' if n == 1 else 's are'}")
        say(f"\nInterrupted: {saved} saved in {run_dir}.\nContinue with: {resume}",
            file=sys.stderr)
        return 130
    if dist.main:
        try:
            _, model = load_run(run_dir, device)
            report = write_report(run_dir, run_dir, model, cfg, data, device, history)
        except KeyboardInterrupt:
            say(f"\nInterrupted while writing the report: every epoch is saved in {run_dir}.\n"
                f"Finish it with: {resume}", file=sys.stderr)
            return 130
        drop_resume_state(run_dir)
        _print_report(report, run_dir)
    _end_distributed(dist)
    return 0


def _end_distributed(dist) -> None:
    """Under torchrun: wait for every process, then leave the group."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_cnn.ensemble import is_ensemble, ready_members, write_ensemble_report
    from mnist_cnn.evaluate import load_run, write_report
    from mnist_cnn.train import read_history

    device = _device(args.device)
    out = args.out or args.run_dir
    if args.out:
        _check_out(args.out, "--out")
        held = ("an ensemble" if is_ensemble(args.out)
                else "another run" if (args.out / "config.json").is_file() else None)
        if held and os.path.realpath(args.out) != os.path.realpath(args.run_dir):
            # Its report.json would then describe another model than the one beside it.
            raise UserError(f"--out {args.out} holds {held}: its report.json would be "
                            "overwritten; choose another --out")
    elif os.path.isdir(args.run_dir):  # else load_run says it is not a run folder
        _check_out(args.run_dir, "RUN_DIR", hint=" (give --out to write elsewhere)")
    if is_ensemble(args.run_dir):
        try:
            ready_members(args.run_dir)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        data = _load_data(args)
        report = write_ensemble_report(args.run_dir, out, data, device, args.tta)
        _print_report(report, out)
        return 0
    try:
        cfg, model = load_run(args.run_dir, device)  # first: a mistyped folder is said as such
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if args.tta is not None:
        raise UserError("--tta and --no-tta apply to ensemble folders (made by mnist-cnn "
                        "ensemble)")
    history = read_history(args.run_dir)  # empty without metrics.jsonl (the shipped model)
    _note_if_unfinished(args.run_dir, len(history), cfg.epochs, "scoring")
    report = write_report(args.run_dir, out, model, cfg, _load_data(args), device, history)
    _print_report(report, out)
    return 0


def _note_if_unfinished(run_dir: Path, done: int, epochs: int, doing: str) -> None:
    """A run stopped before its last epoch (or still training) has a model to use: evaluate,
    predict and serve use it, and say so."""
    if 0 < done < epochs:
        resume = (f" (mnist-cnn train --resume {run_dir} continues it)"
                  if (run_dir / "checkpoint.safetensors").is_file() else "")
        print(f"mnist-cnn: note: {run_dir} stopped after epoch {done} of {epochs}{resume}; "
              f"{doing} the model it has kept so far", file=sys.stderr)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from mnist_cnn.ensemble import (
        RecipeMismatch,
        foreign_members,
        is_ensemble,
        read_spec,
        train_members,
        up_to_date_report,
        write_ensemble_report,
    )
    from mnist_cnn.train import Interrupted

    device = _device(args.device)
    cfg = _config_from_args(args)
    if cfg.seed + args.models - 1 > SEED_MAX:
        raise UserError(f"--models {args.models} from --seed {cfg.seed} would need seeds up to "
                        f"{cfg.seed + args.models - 1}, past the largest, {SEED_MAX}: give a "
                        "smaller --seed or fewer --models")
    folder = args.out or _new_run_dir()
    _check_out(folder, "--out")
    if not is_ensemble(folder):
        if (folder / "config.json").is_file():
            raise UserError(f"--out {folder} holds a single run, not an ensemble: "
                            "choose another --out")
        _refuse_stray_results(folder, f"--out {folder}")
    else:
        other = foreign_members(read_spec(folder)["members"])
        if other:  # an ensemble.json written by hand, naming runs elsewhere: training replaces it
            raise UserError(f"--out {folder} is an ensemble of other runs ({', '.join(other[:2])}"
                            f"{', ...' if len(other) > 2 else ''}), not one this command "
                            "made: choose another --out")
    _warn_if_slow_bf16(cfg, device)
    data = _load_data(args)
    print(f"Ensemble of {args.models} {cfg.model} models, seeds {cfg.seed}–"
          f"{cfg.seed + args.models - 1} → {folder}", file=sys.stderr)
    # Without --out the same command would start a new folder: name this one.
    again = "the same command" if args.out else f"the same command with --out {folder}"
    try:
        if args.tta is not None:
            tta = args.tta
        elif is_ensemble(folder):  # continued: scored as it was made (its numbers stay its own)
            tta = bool(read_spec(folder).get("tta"))
        else:
            tta = TTA_BY_DEFAULT[cfg.model]
        train_members(cfg, folder, args.models, data, device, tta,
                      progress=sys.stderr.isatty(), log=lambda s: print(s, flush=True))
        report = up_to_date_report(folder, tta, device)
        reused = report is not None
        if reused:
            print("ensemble: scored earlier, its report reused (its members unchanged)")
        else:
            report = write_ensemble_report(folder, folder, data, device)
    except RecipeMismatch as e:
        raise UserError(str(e)) from None
    except Interrupted as stop:
        print(f"\nInterrupted in {stop.run_dir}; finished members are kept.\n"
              f"Continue with {again} (it reuses them).", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # between epochs: a member or the teacher preparing, or scoring
        print(f"\nInterrupted in {folder}; trained members are kept.\n"
              f"Continue with {again} (it reuses them).", file=sys.stderr)
        return 130
    print(f"members{' (test-time augmentation)' if tta else ''}: "
          f"{', '.join(f'{100 * a:.2f}%' for a in report['member_test_accuracy'])} "
          f"(mean {100 * report['member_test_accuracy_mean']:.3f}%)")
    _print_report(report, folder, wrote=not reused)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.save_preprocessed:
        _check_out(args.save_preprocessed, "--save-preprocessed")
    classifier = _classifier(args)
    if args.save_preprocessed:
        args.save_preprocessed.mkdir(parents=True, exist_ok=True)
    return _predict_and_print(args, classifier)


def _predict_and_print(args: argparse.Namespace, classifier) -> int:
    from PIL import Image

    from mnist_cnn.predict import predict_files, unique_png_name

    saved: set[str] = set()
    failed = False
    # Each file's result is printed (and flushed) as soon as it is ready: no wait for the others,
    # and on Ctrl-C main's 'Interrupted.' leaves those printed so far on screen.
    for r in predict_files(classifier, args.images):
        failed = failed or r.error is not None
        if args.json:
            print(json.dumps(r.to_json()), flush=True)
        elif r.error:
            print(f"{r.shown_name}: error: {r.error}", file=sys.stderr, flush=True)
        else:
            top = sorted(range(10), key=lambda k: -r.probabilities[k])[:3]
            ranked = "  ".join(f"{k} {100 * r.probabilities[k]:5.1f}%" for k in top)
            print(f"{r.shown_name}: {r.label}   ({ranked})", flush=True)
        if args.save_preprocessed and r.image is not None:
            folder = args.save_preprocessed
            Image.fromarray(r.image).save(folder / unique_png_name(r.name, saved, folder))
    return 1 if failed else 0


def _classifier(args: argparse.Namespace):
    from mnist_cnn.ensemble import is_ensemble
    from mnist_cnn.predict import Classifier
    from mnist_cnn.train import read_history

    try:
        classifier = Classifier.load(args.checkpoint, _device(args.device))
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if args.checkpoint and not is_ensemble(args.checkpoint):  # an ensemble's members are finished
        try:
            done = len(read_history(args.checkpoint))
        except CorruptFile:  # its metrics do not matter here: the model was read
            done = 0
        epochs = TrainConfig.load(args.checkpoint / "config.json").epochs
        doing = "serving" if args.command == "serve" else "predicting with"
        _note_if_unfinished(args.checkpoint, done, epochs, doing)
    return classifier


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from mnist_cnn.serve import listen, run

    if args.host.startswith("[") and _is_ipv6(args.host.strip("[]")):
        raise UserError(f"--host {args.host}: give the IPv6 address without brackets")
    if "/" in args.host or (":" in args.host and not _is_ipv6(args.host)):
        raise UserError(f"--host {args.host}: give a host name or address alone, without "
                        "http:// or a port (the port is --port), e.g. --host localhost")
    classifier = _classifier(args)
    if not args.host:  # '' listens on every address of the machine (serve.listen)
        where = f"port {args.port} of every address"
    elif ":" in args.host:  # IPv6
        where = f"[{args.host}]:{args.port}"
    else:
        where = f"{args.host}:{args.port}"
    try:
        socks = listen(args.host, args.port)
    except (OSError, UnicodeError) as e:  # the address in use, an unknown or malformed host
        raise UserError(f"cannot listen on {where}: {getattr(e, 'strerror', None) or e}") from None
    url = f"http://{where}/" if args.host else f"{where}: http://localhost:{args.port}/ here"
    print(f"Serving on {url} (Ctrl-C to stop)", file=sys.stderr)
    run(classifier, socks)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mnist_cnn.bench import main as bench_main

    device = _device(args.device)
    if args.json:  # checked now, not after minutes of benchmarking
        if args.json.is_dir():
            raise UserError(f"--json {args.json} is a folder: give a file name")
        _check_out(args.json.parent, "--json")
        args.json.parent.mkdir(parents=True, exist_ok=True)
    bench_main(_load_data(args), device, args.quick, args.json)
    return 0


@contextlib.contextmanager
def _escaping_stdout():
    """A file or folder name the output's encoding cannot write (a Chinese name into a cp1252
    file on Windows, any non-ASCII one under PYTHONIOENCODING=ascii) is written with backslash
    escapes, as stderr already does, not a traceback after the work is done; stdout is put back
    as it was afterwards."""
    out = sys.stdout
    errors = out.errors if isinstance(out, io.TextIOWrapper) else None
    if errors is not None:
        out.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        if errors is not None:
            out.reconfigure(errors=errors)


def _print_report(report: dict, out: Path, wrote: bool = True) -> None:
    kept = f"epoch {report['best_epoch']} of {report['epochs']} trained"
    if report["best_epoch"] is None and "member_best_epoch" in report:  # an ensemble
        best = report["member_best_epoch"]
        trained = report.get("member_epochs", [report["epochs"]] * len(best))  # (older reports)
        of = trained[0] if len(set(trained)) == 1 else ", ".join(map(str, trained))
        kept = f"epochs {', '.join(map(str, best))} (of {of} trained)"
    print(
        f"test accuracy {100 * report['test_accuracy']:.2f}% "
        f"({report['test_errors']} of 10,000 wrong), validation {100 * report['val_accuracy']:.2f}%"
        f", kept {kept}, "
        f"{report['train_seconds']:.0f}s training\n"
        + (f"wrote {out}/report.json and figures" if wrote else f"from {out}/report.json")
    )


def _tta_words(argv: list[str]) -> list[str]:
    """evaluate's and ensemble's `--tta on` / `--tta off` (an older spelling) as the flags
    `--tta` / `--no-tta`: --tta takes no value, so that in `evaluate --tta RUN_DIR` the folder
    stays the folder."""
    if argv[:1] not in (["evaluate"], ["ensemble"]):
        return argv
    end = argv.index("--") if "--" in argv else len(argv)  # after `--` every word is a name
    out: list[str] = []
    for i, a in enumerate(argv[:end]):
        if argv[i - 1] == "--tta" and a in ("on", "off"):
            out[-1] = "--tta" if a == "on" else "--no-tta"
        elif a in ("--tta=on", "--tta=off"):
            out.append("--tta" if a == "--tta=on" else "--no-tta")
        else:
            out.append(a)
    return out + argv[end:]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_tta_words(sys.argv[1:] if argv is None else argv))
    if extra:
        if args.command == "predict" and not any(e.startswith("-") for e in extra):
            args.images += extra  # file names after an option: `predict a.png --json b.png`
        else:
            hint = ("; an ensemble continues when the same command runs again (same --out)"
                    if args.command == "ensemble"
                    and any(e.split("=")[0] == "--resume" for e in extra) else "")
            args.command_parsers[args.command].error(
                f"unrecognized arguments: {' '.join(extra)}{hint}")
    # A termination request (`kill`, `timeout`, a job scheduler's time limit) stops the command
    # as Ctrl-C does: a training keeps its finished epochs and prints how to continue.
    terminate = (signal.signal(signal.SIGTERM, _terminate)
                 if threading.current_thread() is threading.main_thread() else None)
    try:
        # The commands import torch when they run (seconds): a Ctrl-C meanwhile is caught here.
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
                    "serve": cmd_serve, "bench": cmd_bench, "ensemble": cmd_ensemble}
        with _escaping_stdout():
            return commands[args.command](args)
    except (UserError, DataError, CorruptFile, CannotResume, Diverged) as e:
        # Under torchrun every process of a machine meets the same mistake: one of them says it.
        if not (args.command == "train" and os.environ.get("WORLD_SIZE", "1") != "1"
                and os.environ.get("LOCAL_RANK", "0") != "0"):
            print(f"mnist-cnn: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`mnist-cnn predict *.png | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except OSError as e:  # the system refused (a full disk, a permission): its words, one line
        print(f"mnist-cnn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt
