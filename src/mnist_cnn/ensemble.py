"""Ensembles: N ordinary runs with consecutive seeds, their softmax outputs averaged.

An ensemble folder holds `ensemble.json` (the members and whether test-time augmentation is on),
one ordinary run folder per member (`member-0`, `member-1`, ... each with its own report.json),
and the ensemble's own report.json and figures. Finished members are reused and an interrupted
member is resumed, so an interrupted `mnist-cnn ensemble` picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from mnist_cnn.augment import transform
from mnist_cnn.config import AUGMENT_VALUES, CorruptFile, TrainConfig, corrupt, write_json
from mnist_cnn.data import MNIST
from mnist_cnn.evaluate import check_run, load_run, read_history, save_report, write_report
from mnist_cnn.figures import FIGURES
from mnist_cnn.train import (
    REPORT_KEYS,
    drop_resume_state,
    inference_precision,
    kept_teacher_probabilities,
    loss_and_accuracy,
    precision_name,
    predict_proba,
    read_report,
    run_finished,
    teacher_probabilities,
    train,
    training_images,
)

# Test-time augmentation: the identity and small shifts and rotations, as (degrees, scale, dx, dy).
TTA = torch.tensor([
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, -1.0],
    [8.0, 1.0, 0.0, 0.0], [-8.0, 1.0, 0.0, 0.0],
])


def is_ensemble(folder: Path) -> bool:
    return (Path(folder) / "ensemble.json").is_file()


def read_spec(folder: Path) -> dict:
    """An ensemble folder's ensemble.json: its members' folder names and whether it scores with
    test-time augmentation ("tta")."""
    path = Path(folder) / "ensemble.json"
    try:
        spec = json.loads(path.read_text())
        names = spec["members"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError("no list of member folders")
    except (ValueError, TypeError, KeyError) as e:
        raise corrupt(path, "an ensemble's ensemble.json", e) from None
    return spec


def member_names(models: int) -> list[str]:
    """The folder names `mnist-cnn ensemble` gives its members, in seed order."""
    return [f"member-{k}" for k in range(models)]


def foreign_members(names: list[str]) -> list[str]:
    """The members an ensemble.json names that `mnist-cnn ensemble` did not make (not its
    member-K folders, in order): a hand-made ensemble, of finished runs from anywhere."""
    return [name for name, made in zip(names, member_names(len(names)), strict=True)
            if name != made]


def model_names(configs: list[TrainConfig]) -> str:
    """The models an ensemble averages, in words: "strong", or "m7/strong" for a hand-made mix."""
    return "/".join(sorted({c.model for c in configs}))


def member_dirs(folder: Path) -> list[Path]:
    return [Path(folder) / name for name in read_spec(folder)["members"]]


def ready_members(folder: Path) -> list[Path]:
    """An ensemble folder's members, checked before any is loaded: FileNotFoundError names the
    unfinished ones (and how to continue them) or a member whose weights are gone."""
    names = read_spec(folder)["members"]
    members = [Path(folder) / name for name in names]
    done = [run_finished(r) for r in members]
    if not all(done):
        unfinished = [name for name, d in zip(names, done, strict=True) if not d]
        if foreign_members(names):  # an ensemble.json written by hand
            raise FileNotFoundError(
                f"{folder}: {', '.join(unfinished)} not finished (or missing): every folder its "
                "ensemble.json names (relative to it) must be a finished run")
        finished = done.index(False)  # members 0 .. finished - 1 are finished
        which = "member" if finished == 1 else f"{finished} members"
        smaller = (f"; or, to use its first {which} only, that command with "
                   f"--models {finished}") if finished else ""
        raise FileNotFoundError(
            f"{folder}: {', '.join(unfinished)} not finished (or missing): run the mnist-cnn "
            f"ensemble command that made it again, and it continues{smaller}")
    for member in members:  # finished, then its weights deleted
        check_run(member)
    return members


def finished_runs(folder: Path) -> list[Path]:
    """The finished runs (train.run_finished) of a run folder (itself) or of an ensemble folder
    (its members; one stopped part-way may have unfinished ones)."""
    runs = member_dirs(folder) if is_ensemble(folder) else [Path(folder)]
    return [r for r in runs if run_finished(r)]


class RecipeMismatch(ValueError):
    """A member already in the ensemble folder was started with another recipe."""


def train_members(
    cfg: TrainConfig, folder: Path, models: int, data: MNIST, device: torch.device,
    tta: bool = False, progress: bool = True, log=print,
) -> list[Path]:
    """Train (or reuse, or resume) members with seeds cfg.seed, cfg.seed + 1, ...

    A member already in the folder is reused or resumed only if it was started with this
    recipe: otherwise the ensemble would silently mix recipes (RecipeMismatch, before any work)."""
    names = member_names(models)
    member_cfgs = [dataclasses.replace(cfg, seed=cfg.seed + k) for k in range(models)]
    for name, member_cfg in zip(names, member_cfgs, strict=True):
        saved_path = folder / name / "config.json"
        if saved_path.is_file():
            # As written to config.json: settings left to their default are resolved there.
            saved = TrainConfig.load(saved_path).to_json()
            wanted = member_cfg.to_json()
            # The batch-norm models have their own padding: a --padding given to one command and
            # not the other changes nothing they train.
            moot = set() if cfg.model == "reference" else {"padding"}
            if not cfg.augment:  # begun with augmentation flags that did nothing (now refused)
                moot |= set(AUGMENT_VALUES)
            diff = [f"{key} {saved[key]} (asked: {wanted[key]})"
                    for key in saved if saved[key] != wanted[key] and key not in moot]
            if diff:
                raise RecipeMismatch(
                    f"{folder / name} was trained with other settings: {', '.join(diff)}; "
                    "give the same flags to continue it, or another --out"
                )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "ensemble.json", {"members": names, "tta": tta})
    teacher_probs = None
    for name, member_cfg in zip(names, member_cfgs, strict=True):
        run = folder / name
        if run_finished(run):
            log(f"{name}: finished earlier, reused")
            continue
        # A member with a checkpoint resumes; its saved config is member_cfg (checked above).
        resume = (run / "checkpoint.safetensors").is_file()
        log(f"{name}: {'resuming' if resume else 'training'} (seed {member_cfg.seed})")
        if cfg.teacher and teacher_probs is None and not (
            resume and kept_teacher_probabilities(run, member_cfg) is not None
        ):
            # The members share the teacher and the images: it labels them once (and not at all
            # for a member that resumes from the copy it kept).
            teacher_probs = teacher_probabilities(
                cfg.teacher, training_images(cfg, data)[0], device)
        train(member_cfg, run, data, device, resume=resume, progress=progress, log=log,
              teacher_probs=teacher_probs)
        _, model = load_run(run, device)
        report = write_report(run, run, model, member_cfg, data, device)
        drop_resume_state(run)
        # Its own report, as `mnist-cnn train` scores it: the ensemble's may use TTA.
        log(f"{name}: test accuracy {100 * report['test_accuracy']:.2f}% "
            f"({report['test_errors']} wrong{', without test-time augmentation' if tta else ''})")
    return [folder / name for name in names]


def model_proba(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device,
    amp: torch.dtype | None, tta: bool = False,
) -> torch.Tensor:
    """One model's softmax outputs [N, 10] (on the CPU) for uint8 images [N, 28, 28], averaged
    over the TTA views when on."""
    views = TTA if tta else TTA[:1]
    total = torch.zeros(len(images), 10)
    for k, view in enumerate(views):
        x = images if k == 0 else tta_view(images, view)  # view 0 is the identity
        total += predict_proba(model, x, device, amp)
    return total / len(views)


def member_probas(
    runs: list[Path], image_sets: list[torch.Tensor], device: torch.device, tta: bool = False
) -> list[list[torch.Tensor]]:
    """For each member, for each set of uint8 images, its softmax outputs (`model_proba`). Each
    member is loaded once for all the sets."""
    outputs = []
    for run in runs:
        cfg, model = load_run(run, device)
        amp = inference_precision(cfg.precision, device)
        outputs.append([model_proba(model, images, device, amp, tta) for images in image_sets])
    return outputs


def average(outputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """For each set of images, the members' outputs (`member_probas`) averaged."""
    return [sum(sets) / len(outputs) for sets in zip(*outputs, strict=True)]


def ensemble_probas(
    runs: list[Path], image_sets: list[torch.Tensor], device: torch.device, tta: bool = False
) -> list[torch.Tensor]:
    """For each set of uint8 images, the members' softmax outputs (`member_probas`), averaged."""
    return average(member_probas(runs, image_sets, device, tta))


def tta_view(images: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28] seen through one row of TTA (degrees, scale, dx, dy)."""
    x = transform(images.unsqueeze(1).float(), view.expand(len(images), 4))
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def member_fingerprints(runs: list[Path]) -> list[str]:
    """For each member, the SHA-256 of its config.json and weights: what its scores depend on.
    An ensemble's report keeps them, so a member retrained, replaced or moved in (timestamps
    and all) is seen as changed."""
    digests = []
    for run in runs:
        h = hashlib.sha256()
        for name in ("config.json", "model.safetensors"):
            h.update((run / name).read_bytes())
        digests.append(h.hexdigest())
    return digests


def scored_in(first: TrainConfig, device: torch.device) -> str:
    """The precision an ensemble's members are scored in on `device` ("bf16" or "fp32"; the
    command's members share one recipe, so the first member's config says it; a hand-made
    ensemble.json mixing precisions is reported by its first member's)."""
    return precision_name(inference_precision(first.precision, device))


def up_to_date_report(folder: Path, tta: bool, device: torch.device) -> dict | None:
    """The ensemble folder's report.json (and figures) if they scored the members the folder
    names now, unchanged since (`member_fingerprints`), the way asked (with test-time
    augmentation or without) and in the precision `device` scores them in (a bf16 report is
    not this machine's fp32 one); else None. A repeated `mnist-cnn ensemble` prints it instead
    of scoring again (minutes with test-time augmentation on a CPU)."""
    needs = (*REPORT_KEYS, "members", "tta", "seeds", "member_best_epoch", "member_test_accuracy",
             "member_test_accuracy_mean", "member_val_accuracy", "member_sha256", "scored_in")
    try:
        runs = member_dirs(folder)
        report = read_report(folder, needs=needs)
        fresh = report["member_sha256"] == member_fingerprints(runs)
        first = TrainConfig.load(runs[0] / "config.json")
        same_precision = report["scored_in"] == scored_in(first, device)
    except (CorruptFile, OSError):  # no report yet (or an older one), or a member's file gone
        return None
    drawn = all((Path(folder) / name).is_file() for name in FIGURES)
    if not fresh or not same_precision or report["tta"] != tta or not drawn:
        return None
    return report


def write_ensemble_report(
    folder: Path, out: Path, data: MNIST, device: torch.device, tta: bool | None = None
) -> dict:
    """Score the averaged members on validation and test; report.json and figures into out.
    `tta` overrides the ensemble's own setting (evaluate --tta, --no-tta)."""
    spec = read_spec(folder)
    made_with = bool(spec.get("tta"))
    tta = made_with if tta is None else tta
    runs = [Path(folder) / name for name in spec["members"]]
    members = [read_report(r, needs=("params", "epochs", "best_epoch", "train_seconds"))
               for r in runs]
    configs = [TrainConfig.load(r / "config.json") for r in runs]
    first = configs[0]
    # Before scoring: a member replaced while it is scored (minutes) then differs from what the
    # report keeps, and the next `mnist-cnn ensemble` scores again.
    fingerprints = member_fingerprints(runs)
    outputs = member_probas(runs, [data.test_images, data.val_images], device, tta)
    test_proba, val_proba = average(outputs)
    # Each member scored as the ensemble is (through the same views when TTA is on); the
    # members' own report.json files score them without TTA, as `mnist-cnn train` does.
    accs = [loss_and_accuracy(m[0], data.test_labels)[1] for m in outputs]
    report = save_report(
        out, test_proba, val_proba, data, [read_history(r) for r in runs],
        sum(m["params"] for m in members),
        {
            # A hand-made ensemble.json may name members of several models: "m7/strong".
            "model": model_names(configs), "members": len(runs),
            "tta": tta,
            # The ensemble has no best epoch of its own: each member was picked at its own.
            "best_epoch": None, "member_best_epoch": [m["best_epoch"] for m in members],
            "member_epochs": [m["epochs"] for m in members],
            "member_test_accuracy": accs,
            "member_test_accuracy_mean": sum(accs) / len(accs),
            "member_test_accuracy_min": min(accs),
            "member_val_accuracy": [loss_and_accuracy(m[1], data.val_labels)[1] for m in outputs],
            "train_seconds": round(sum(m["train_seconds"] for m in members), 2),
            "seeds": [m.get("seed") for m in members],
            "member_sha256": fingerprints,  # what up_to_date_report compares
            "scored_in": scored_in(first, device),
        },
        first.seed, first.select,
    )
    if tta != made_with and Path(out).resolve() == Path(folder).resolve():
        # Re-scored in place: ensemble.json follows report.json (once it is written), so that
        # predict, serve and a continued `mnist-cnn ensemble` score the folder as it says.
        write_json(Path(folder) / "ensemble.json", {**spec, "tta": tta})
    return report
