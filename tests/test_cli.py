import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_cnn.cli import UserError, main

RUN_FILES = [
    "model.safetensors", "config.json", "metrics.jsonl", "report.json", "random_results.png",
    "wrong_results.png", "confusion_matrix.png", "training_curves.png",
]


def test_train_then_evaluate_end_to_end(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    args = ["--data-dir", str(data_dir)]
    assert main(["train", "--epochs", "2", "--train-subset", "2000", "--batch-size", "128",
                 "--out", str(run), *args]) == 0
    for name in RUN_FILES:
        assert (run / name).stat().st_size > 0, name
    # Finished: what only resuming reads is gone (the checkpoint is 4x the weights).
    assert not (run / "checkpoint.safetensors").exists()
    report = json.loads((run / "report.json").read_text())
    for key in ("test_accuracy", "test_errors", "val_accuracy", "epochs", "train_seconds",
                "params", "per_class_accuracy", "confusion_matrix"):
        assert key in report
    assert report["epochs"] == 2 and report["params"] == 3_231_114
    assert 0.8 < report["test_accuracy"] <= 1
    assert report["test_errors"] == round((1 - report["test_accuracy"]) * 10_000)
    assert sum(map(sum, report["confusion_matrix"])) == 10_000
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["seed"] == 0 and "version" in config
    metrics = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(
        metrics[0]
    )

    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), *args]) == 0
    again = json.loads((out / "report.json").read_text())
    for key in ("test_accuracy", "test_errors", "val_accuracy", "confusion_matrix", "epochs"):
        assert again[key] == report[key], key
    for name in RUN_FILES[4:]:
        assert (out / name).exists()

    # A second train into the same folder is refused, not overwritten (finished: no --resume).
    assert main(["train", "--epochs", "1", "--out", str(run), *args]) == 2
    assert "holds a finished run: choose another --out" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"  # its report not written yet: --resume writes it
    shutil.copytree(run, unfinished)
    (unfinished / "report.json").unlink()
    (unfinished / "checkpoint.safetensors").write_bytes(b"")  # kept until the report is written
    assert main(["train", "--epochs", "1", "--out", str(unfinished), *args]) == 2
    assert f"resume it with --resume {unfinished}" in capsys.readouterr().err

    # Resuming the finished run trains nothing and rewrites nothing: it says so, with its numbers.
    before = {name: (run / name).stat().st_mtime_ns for name in RUN_FILES}
    assert main(["train", "--resume", str(run), *args]) == 0
    captured = capsys.readouterr()
    assert "nothing to resume" in captured.err
    assert f"test accuracy {100 * report['test_accuracy']:.2f}%" in captured.out
    assert {name: (run / name).stat().st_mtime_ns for name in RUN_FILES} == before

    # Evaluating a run that stopped early says so (here: a config asking for one epoch more).
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    (stopped / "config.json").write_text(json.dumps({**config, "epochs": 3}))
    assert main(["evaluate", str(stopped), "--out", str(tmp_path / "eval2"), *args]) == 0
    err = capsys.readouterr().err
    assert f"{stopped} stopped after epoch 2 of 3; scoring" in err  # no checkpoint: no --resume
    # predict uses its model too, and says the same.
    from PIL import Image

    Image.new("L", (40, 40), 255).save(tmp_path / "blank.png")
    main(["predict", str(tmp_path / "blank.png"), "--checkpoint", str(stopped)])
    assert f"{stopped} stopped after epoch 2 of 3; predicting with the model it has kept so " \
        "far" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "/nonexistent/run"], "/nonexistent/run does not exist"),
        # A mistyped folder is said to be missing, not taken for a single run.
        (["evaluate", "/nonexistent/run", "--tta", "on"], "/nonexistent/run does not exist"),
        (["train", "--data-dir", "/nonexistent/data", "--epochs", "1"], "Put the four MNIST files"),
        (["train", "--resume", "/nonexistent/run"], "--resume /nonexistent/run: it does not exist"),
        (["train", "--width", "1.5", "--epochs", "1"],
         "--width applies to --model strong and m7 only"),
        (["train", "--epochs", "2", "--clean-epochs", "3"], "is more than the 2 epochs"),
        (["ensemble", "--teacher", "/nonexistent/run"],
         "/nonexistent/run is not a finished run or ensemble folder (it does not exist)"),
        (["ensemble", "--teacher", "."], "not a finished run or ensemble folder (no run in it)"),
        (["train", "--teacher-weight", "0.3"], "apply with --teacher only"),
        (["train", "--train-subset", "100000"], "is more than the 55,000 training images"),
        (["train", "--resume", "run", "--epochs", "3", "--out", "x"],
         "leave out --epochs, --out"),
        (["bench", "--quick", "--json", "."], "is a folder: give a file name"),
        (["train", "--max-scale", "1"], "give a fraction below 1"),
        (["train", "--model", "strong", "--train-subset", "1"], "2 images or more a batch"),
        (["train", "--model", "strong", "--batch-size", "1"], "2 images or more a batch"),
        (["train", "--model", "m7", "--batch-size", "1"], "--model m7 trains with batch norm"),
        # Augmentation flags where there is no augmentation: refused, not silently dropped.
        (["train", "--fast", "--max-rotation", "20", "--cutout", "4"],
         "--max-rotation, --cutout have no effect with --fast"),
        (["ensemble", "--no-augment", "--clean-epochs", "3"],
         "--clean-epochs has no effect with --no-augment"),
        # Members take seeds --seed, --seed + 1, ...: each within --seed's own limit.
        (["ensemble", "--seed", "4294967295", "--models", "2"],
         "would need seeds up to 4294967296, past the largest"),
    ],
)
def test_user_mistakes_get_one_clear_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    from mnist_cnn import data

    monkeypatch.setattr(data, "MIRRORS", ())  # offline: never reach out
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_training_whose_loss_is_not_a_number_stops_with_one_line(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "5", "--train-subset", "512", "--optimizer", "sgd", "--lr",
                 "1e4", "--precision", "fp32", "--out", str(out), "--data-dir",
                 str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert f"mnist-cnn: error: the training of {out} diverged in epoch" in err
    assert "another --out) with a lower --lr (this one's: 10000)" in err


def test_the_kept_epochs_of_an_ensemble_say_how_many_each_member_trained(capsys):
    from mnist_cnn.cli import _print_report

    report = {"test_accuracy": 0.99, "test_errors": 100, "val_accuracy": 0.99, "epochs": 30,
              "best_epoch": None, "member_best_epoch": [29, 40], "member_epochs": [30, 40],
              "train_seconds": 10.0}
    _print_report(report, Path("ens"))
    assert "kept epochs 29, 40 (of 30, 40 trained)" in capsys.readouterr().out
    del report["member_epochs"]  # a report from before they were recorded: the first's count
    _print_report(report, Path("ens"))
    assert "kept epochs 29, 40 (of 30 trained)" in capsys.readouterr().out


def test_padding_with_the_strong_model_is_noted_and_ignored(capsys):
    from mnist_cnn.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["train", "--model", "strong", "--padding", "valid"])
    assert _config_from_args(args).model == "strong"
    assert "--padding applies to the reference model" in capsys.readouterr().err
    # Under torchrun only the first process says it.
    assert _config_from_args(args, world=2, main=False).model == "strong"
    assert capsys.readouterr().err == ""
    # m7 is a batch-norm model like strong: --width applies, --padding is noted.
    args = build_parser().parse_args(["train", "--model", "m7", "--width", "1.5",
                                      "--padding", "valid"])
    assert _config_from_args(args).width == 1.5
    assert "the m7 model's convolutions have their own" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_made_is_refused_at_once(tmp_path, capsys, monkeypatch):
    import mnist_cnn.cli as cli

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(cli, "_load_data", no_data)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    commands = (["train", "--out", str(blocker)], ["ensemble", "--out", str(blocker / "sub")],
                ["evaluate", "x", "--out", str(blocker)],
                ["predict", "x.png", "--save-preprocessed", str(blocker)])
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{blocker} is in the way (not a folder)" in err and "Traceback" not in err, argv
    # A folder we may not write in (simulated: the tests may run as root, who always may).
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    assert main(["train", "--out", str(tmp_path / "new" / "run")]) == 2
    assert f"no permission to write in {tmp_path}" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2  # writes into RUN_DIR when --out is not given
    assert "give --out to write elsewhere" in capsys.readouterr().err


def test_a_corrupt_run_folder_is_one_clear_line(tmp_path, capsys):
    from mnist_cnn.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig().save(run / "config.json")
    (run / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated
    (run / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    for argv, name in ((["evaluate", str(run)], "model.safetensors"),
                       (["predict", "x.png", "--checkpoint", str(run)], "model.safetensors"),
                       (["train", "--resume", str(run)], "checkpoint.safetensors")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{run / name} cannot be read as" in err and "Traceback" not in err, argv
    # Another architecture's weights, and its checkpoint (config.json edited to another model).
    from mnist_cnn.model import build_model
    from mnist_cnn.train import save_weights

    save_weights(run / "model.safetensors", build_model("strong"))
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors cannot be read as weights of the ReferenceCNN" in err
    assert "tensor" in err and "Traceback" not in err
    for text, why in (('{"epochs": 3,', "Expecting"), ("[1, 2]", "a JSON list, not an object"),
                      ('{"model": "nope"}', "model is 'nope', not one of reference, strong"),
                      ('{"dropout": "x"}', "dropout is ['x'], not two rates"),
                      ('{"dropout": [0.1]}', "dropout is [0.1], not two rates"),
                      ('{"precision": "fp8"}', "precision is 'fp8'"),
                      ('{"epochs": "3"}', "epochs is '3', not a whole number"),
                      ('{"epochs": 3.0}', "epochs is 3.0, not a whole number"),
                      ('{"max_rotation": "20"}', "max_rotation is '20', not a number"),
                      ('{"augment": 1}', "augment is 1, not true or false")):  # edits gone wrong
        (run / "config.json").write_text(text)
        assert main(["evaluate", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'config.json'} cannot be read as a run's config.json" in err, text
        assert why in err and "Traceback" not in err, text


def test_resuming_a_student_whose_teacher_is_gone_is_a_clear_error(tmp_path, capsys):
    from mnist_cnn.config import TrainConfig

    run = tmp_path / "student"
    run.mkdir()
    TrainConfig(teacher=str(tmp_path / "moved")).save(run / "config.json")
    (run / "checkpoint.safetensors").write_bytes(b"")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not a finished run or ensemble folder" in err and "Traceback" not in err
    # A kept copy of its probabilities that is not one row per training image (edited, or
    # another subset's) cannot stand in for the teacher either: the same line, before any work.
    from mnist_cnn.train import TEACHER_FILE, _atomic_save

    _atomic_save({"probabilities": torch.full((10, 10), 0.1)}, run / TEACHER_FILE,
                 {"teacher": str(tmp_path / "moved")})
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not a finished run or ensemble folder" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    assert main(["evaluate", "x", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--dropout", "0.3"], ["--dropout", "1.5,0.3"], ["--epochs", "0"],
                                 ["--max-thickness", "1.5"], ["--label-smoothing", "1.5"],
                                 ["--seed", "-1"], ["--seed", "20241129123456"],
                                 ["--width", "1000"], ["--lr", "nan"], ["--lr", "inf"],
                                 ["--max-shift", "inf"], ["--width", "nan"], ["--ema", "1"],
                                 ["--ema", "1.5"], ["--weight-decay", "inf"]])
def test_bad_flags_are_rejected_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *bad])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "mnist_cnn", "train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--max-rotation" in out and "--resume" in out


def test_the_command_line_is_read_without_importing_torch():
    # torch takes seconds to import: --help and a mistyped flag answer without it, and a Ctrl-C
    # while it loads happens inside main(), which reports it in one line.
    from mnist_cnn.config import MODEL_NAMES, TTA_BY_DEFAULT
    from mnist_cnn.model import MODELS

    assert tuple(MODELS) == MODEL_NAMES and set(TTA_BY_DEFAULT) == set(MODEL_NAMES)
    code = ("import sys\nfrom mnist_cnn.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['train', '--epochs', '0']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False"), out.stdout


def test_torchrun_two_cpu_processes(tmp_path, data_dir):
    # Data-parallel training as users launch it: torchrun, 2 processes, gloo on CPU.
    script = Path(sys.executable).with_name("mnist-cnn")
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--standalone", "--no-python", str(script), "train", "--epochs", "2",
         "--train-subset", "3000", "--batch-size", "128", "--precision", "fp32",
         "--data-dir", str(data_dir), "--out", str(run)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "× 2 processes" in proc.stderr
    assert proc.stdout.count("epoch   1/2") == 1  # only rank 0 prints
    report = json.loads((run / "report.json").read_text())
    assert report["epochs"] == 2 and report["test_accuracy"] > 0.85


def test_recipe_flags_reach_the_config(tmp_path):
    from mnist_cnn.cli import _config_from_args, build_parser

    args = build_parser().parse_args(
        ["train", "--model", "strong", "--max-shift", "2", "--max-scale", "0.1", "--elastic", "34",
         "--elastic-sigma", "5", "--label-smoothing", "0.1", "--ema", "0",
         "--weight-decay", "0.05", "--max-thickness", "0.5", "--max-shear", "0.2",
         "--cutout", "6"]
    )
    cfg = _config_from_args(args)
    assert (cfg.model, cfg.max_shift, cfg.max_scale, cfg.elastic, cfg.elastic_sigma) == (
        "strong", 2, 0.1, 34, 5
    )
    assert cfg.label_smoothing == 0.1 and cfg.ema == 0 and cfg.dropout == (0.2, 0.2)
    assert cfg.weight_decay == 0.05 and cfg.max_thickness == 0.5 and cfg.max_shear == 0.2
    assert cfg.cutout == 6 and cfg.teacher is None

    run = tmp_path / "run"
    run.mkdir()
    # A finished run as _config_from_args checks it (the weights are not loaded there).
    from mnist_cnn.config import TrainConfig, write_json

    TrainConfig().save(run / "config.json")
    write_json(run / "report.json", {"epochs": TrainConfig().epochs})
    (run / "model.safetensors").write_text("{}")
    args = build_parser().parse_args(
        ["ensemble", "--teacher", str(run), "--teacher-weight", "0.7",
         "--teacher-temperature", "2"]
    )
    cfg = _config_from_args(args)
    assert (cfg.teacher, cfg.teacher_weight, cfg.teacher_temperature) == (
        str(run.resolve()), 0.7, 2.0
    )
    # `mnist-cnn evaluate RUN --out X` writes a report.json without weights: not a teacher.
    (run / "model.safetensors").unlink()
    with pytest.raises(UserError, match="not a finished run or ensemble folder"):
        _config_from_args(args)


def test_folders_of_the_wrong_kind_and_damaged_ensembles(tmp_path, data_dir, capsys):
    from mnist_cnn.predict import DEFAULT_MODEL

    data = ["--data-dir", str(data_dir)]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    run = tmp_path / "run"  # a single run's folder (its config.json is enough to tell)
    run.mkdir()
    (run / "config.json").write_text("{}")
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "ensemble.json").write_text(json.dumps({"members": ["member-0", "member-1"]}))
    scored = tmp_path / "scored"  # what `evaluate --out` writes: a report, no run
    scored.mkdir()
    (scored / "report.json").write_text("{}")
    weights = tmp_path / "weights"  # a run's weights, copied without the run
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"")
    for argv, message in (
        (["ensemble", "--out", str(scored)], f"{scored} already holds report.json"),
        (["ensemble", "--out", str(weights)], f"{weights} already holds model.safetensors"),
        (["ensemble", "--teacher", str(a_file)], "run or ensemble folder (not a folder)"),
        (["train", "--resume", str(a_file)], f"--resume {a_file}: not a folder"),
        (["evaluate", str(DEFAULT_MODEL), "--out", str(tmp_path / "ev"), "--data-dir",
          str(a_file)], "is a file, not a folder"),
        (["ensemble", "--out", str(run)], "holds a single run, not an ensemble"),
        (["train", "--out", str(ens)], "is an ensemble folder"),
        (["train", "--resume", str(ens)], "continue it with the mnist-cnn ensemble command"),
        # Another run's folder as --out of evaluate: its report.json would describe our model.
        (["evaluate", str(DEFAULT_MODEL), "--out", str(run)], "holds another run: its report.json"),
        (["evaluate", str(DEFAULT_MODEL), "--out", str(ens)], "holds an ensemble: its report.json"),
        (["evaluate", str(ens), *data], "member-0, member-1 not finished (or missing)"),
        (["evaluate", str(a_file)], f"{a_file} is a file, not a run or ensemble folder"),
        (["predict", "x.png", "--checkpoint", str(a_file)], "is a file, not a run or ensemble"),
        (["evaluate", str(DEFAULT_MODEL), "--tta", "on", *data], "apply to ensemble folders"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    # Stopped after its first member: the message also says how to use that one alone.
    shutil.copytree(DEFAULT_MODEL, ens / "member-0")
    assert main(["evaluate", str(ens), *data]) == 2
    err = capsys.readouterr().err
    assert "member-1 not finished" in err, err
    assert "to use its first member only, that command with --models 1" in err, err
    for text in ('{"members":', "[]", '{"members": []}', '{"members": "member-0"}'):
        (ens / "ensemble.json").write_text(text)
        assert main(["evaluate", str(ens), *data]) == 2
        err = capsys.readouterr().err
        assert "cannot be read as an ensemble's ensemble.json" in err and "Traceback" not in err
    # A hand-made ensemble naming a run that is not there: no command to run again.
    (ens / "ensemble.json").write_text('{"members": ["member-0", "../nope"]}')
    assert main(["evaluate", str(ens), *data]) == 2
    err = capsys.readouterr().err
    assert "../nope not finished (or missing): every folder its ensemble.json names" in err, err
    # A finished member whose report.json lost a field it is read for.
    (ens / "ensemble.json").write_text('{"members": ["member-0"]}')
    report = json.loads((ens / "member-0" / "report.json").read_text())
    del report["params"]
    (ens / "member-0" / "report.json").write_text(json.dumps(report))
    assert main(["evaluate", str(ens), *data]) == 2
    err = capsys.readouterr().err
    assert "report.json cannot be read as a run's report.json (no params)" in err, err
    # A finished member whose weights were deleted: said before the data loads (here, none).
    shutil.rmtree(ens / "member-0")
    shutil.copytree(DEFAULT_MODEL, ens / "member-0")
    (ens / "member-0" / "model.safetensors").unlink()
    assert main(["evaluate", str(ens), "--data-dir", str(tmp_path / "no-data")]) == 2
    err = capsys.readouterr().err
    assert "member-0 is not a finished run folder: model.safetensors is missing" in err, err
    # A finished run as --out of train: nothing to resume, so not offered.
    shutil.copytree(DEFAULT_MODEL, tmp_path / "done")
    assert main(["train", "--out", str(tmp_path / "done"), *data]) == 2
    assert "holds a finished run: choose another --out" in capsys.readouterr().err


def test_evaluating_a_run_without_metrics_keeps_what_its_report_says(tmp_path, data_dir, capsys):
    from mnist_cnn.predict import DEFAULT_MODEL

    shipped = json.loads((DEFAULT_MODEL / "report.json").read_text())
    out = tmp_path / "ev"
    assert main(["evaluate", str(DEFAULT_MODEL), "--out", str(out), "--data-dir",
                 str(data_dir)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("epochs", "best_epoch", "train_seconds", "test_errors"):
        assert report[key] == shipped[key], key
    # No curves to draw: no empty figure (the other three are written).
    assert not (out / "training_curves.png").exists() and (out / "wrong_results.png").is_file()
    assert f"kept epoch {shipped['best_epoch']} of {shipped['epochs']}" in capsys.readouterr().out
    # Its output folder may be written again (it holds no run); train will not write over it.
    assert main(["evaluate", str(DEFAULT_MODEL), "--out", str(out), "--data-dir",
                 str(data_dir)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--data-dir", str(data_dir)]) == 2
    assert "already holds report.json: choose another --out" in capsys.readouterr().err
    # Nor is it a model to predict with, or evaluate: said so, not as a missing config.json.
    for argv in (["predict", str(out / "wrong_results.png"), "--checkpoint", str(out)],
                 ["evaluate", str(out), "--data-dir", str(data_dir)]):
        assert main(argv) == 2
        assert "holds a report and figures but no model (what `mnist-cnn evaluate --out DIR` " \
            "writes): give the run or ensemble folder it scored" in capsys.readouterr().err
    # A run that lost its config.json and weights is not taken for one.
    (out / "metrics.jsonl").write_text("")
    assert main(["evaluate", str(out), "--data-dir", str(data_dir)]) == 2
    assert "is not a finished run folder: config.json is missing" in capsys.readouterr().err


def test_under_torchrun_one_process_a_machine_prints_a_mistake(monkeypatch, capsys):
    from mnist_cnn import train

    monkeypatch.setattr(train, "distributed_setup", lambda device: (train.Dist(1, 2), "cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["train", "--resume", "/nonexistent/run"]) == 2
    assert capsys.readouterr().err == ""
    # Not a training under torchrun (a command run in a job that set these): it speaks.
    assert main(["evaluate", "/nonexistent/run"]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--resume", "/nonexistent/run"]) == 2
    assert "--resume /nonexistent/run: it does not exist" in capsys.readouterr().err


def test_number_flags_say_why_and_evaluate_takes_both_tta_forms(capsys):
    from mnist_cnn.cli import _tta_words, build_parser

    for bad, why in ((["--lr", "nan"], "expected a finite number"),
                     (["--ema", "1"], "must be below 1"),
                     (["--epochs", "2.5"], "expected a whole number, got '2.5'"),
                     (["--lr", "fast"], "expected a number, got 'fast'"),
                     (["--seed", "1" + "0" * 400], "must be 4294967295 or less"),
                     (["stray"], "unrecognized arguments: stray")):
        with pytest.raises(SystemExit):
            main(["train", *bad])
        assert why in capsys.readouterr().err, bad
    # A word the command does not know: said with that command's usage, not the top one.
    with pytest.raises(SystemExit):
        main(["ensemble", "--resume", "runs/x"])
    err = capsys.readouterr().err
    assert err.startswith("usage: mnist-cnn ensemble") and "same command runs again" in err
    # --tta takes no value (`--tta on|off` is rewritten before parsing), so the folder may come
    # after it.
    parse = build_parser().parse_args
    flags = {(): None, ("--tta",): True, ("--tta", "on"): True, ("--tta=on",): True,
             ("--tta", "off"): False, ("--tta=off",): False, ("--no-tta",): False}
    for flag, tta in flags.items():
        for argv in (["evaluate", "ens", *flag], ["evaluate", *flag, "ens"]):
            args = parse(_tta_words(argv))
            assert (args.run_dir, args.tta) == (Path("ens"), tta), argv
    # Only evaluate's and ensemble's, and not after `--` (a folder named "on").
    assert _tta_words(["evaluate", "--", "--tta", "on"]) == ["evaluate", "--", "--tta", "on"]
    assert _tta_words(["predict", "--tta", "on"]) == ["predict", "--tta", "on"]
    assert build_parser().parse_args(_tta_words(["ensemble", "--tta", "off"])).tta is False


def test_interrupted_before_the_first_epoch_or_while_reporting(tmp_path, data_dir, capsys,
                                                               monkeypatch):
    from mnist_cnn import figures, train
    from mnist_cnn.train import Interrupted

    args = ["--epochs", "1", "--train-subset", "500", "--data-dir", str(data_dir)]

    def ctrl_c_at_once(cfg, run_dir, *a, **k):
        raise Interrupted(run_dir, 0)

    with monkeypatch.context() as m:
        m.setattr(train, "train", ctrl_c_at_once)
        assert main(["train", *args, "--out", str(tmp_path / "a")]) == 130
        assert "nothing was saved; run the same command again" in capsys.readouterr().err
        assert not (tmp_path / "a").exists()  # the folder it made is not left behind
        (tmp_path / "mine").mkdir()  # ... but one the user made is kept
        assert main(["train", *args, "--out", str(tmp_path / "mine")]) == 130
        assert (tmp_path / "mine").is_dir()

    def ctrl_c_while_preparing(cfg, run_dir, *a, **k):  # the model, the teacher's labels
        run_dir.mkdir(exist_ok=True)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # before train's epochs begin: the same, not a bare line
        m.setattr(train, "train", ctrl_c_while_preparing)
        assert main(["train", *args, "--out", str(tmp_path / "c")]) == 130
        assert "nothing was saved; run the same command again" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()

    # Under torchrun the hint to continue is a torchrun command too.
    from mnist_cnn.config import TrainConfig

    launched = tmp_path / "launched"
    launched.mkdir()
    TrainConfig(epochs=2).save(launched / "config.json")
    (launched / "checkpoint.safetensors").write_bytes(b"")

    def ctrl_c_after_one_epoch(cfg, run_dir, *a, **k):
        raise Interrupted(run_dir, 1)

    # Two processes on this machine; then two machines, one process each.
    for per_node, how in ((None, "torchrun --nproc-per-node 2 --no-python"),
                          ("1", "the same torchrun launch, of")):
        with monkeypatch.context() as m:
            if per_node:
                m.setenv("LOCAL_WORLD_SIZE", per_node)
            else:
                m.delenv("LOCAL_WORLD_SIZE", raising=False)
            m.setattr(train, "distributed_setup", lambda device: (train.Dist(0, 2), "cpu"))
            m.setattr(train, "train", ctrl_c_after_one_epoch)
            assert main(["train", "--resume", str(launched), "--data-dir", str(data_dir)]) == 130
        assert (f"Continue with: {how} mnist-cnn train --resume {launched}"
                in capsys.readouterr().err)
    # Stopped while a resumed run prepares (before its next epoch): the same hint.
    with monkeypatch.context() as m:
        m.setattr(train, "train", ctrl_c_while_preparing)
        assert main(["train", "--resume", str(launched), "--data-dir", str(data_dir)]) == 130
        err = capsys.readouterr().err
        assert f"its finished epochs are saved in {launched}" in err and "--resume" in err
    # Each process's share of a strong-model batch must hold two images (batch norm).
    with monkeypatch.context() as m:
        m.setattr(train, "distributed_setup", lambda device: (train.Dist(0, 2), "cpu"))
        assert main(["train", "--model", "strong", "--batch-size", "3"]) == 2
        assert "needs --batch-size (and --train-subset) of 4 or more" in capsys.readouterr().err
        # and of the reference layers' one image (an empty share would train on a nan loss).
        assert main(["train", "--train-subset", "1"]) == 2
        assert "share of a batch must hold an image" in capsys.readouterr().err

    # bf16 on a CPU without native bf16: a warning before the (long) training.
    with monkeypatch.context() as m:
        m.setattr(train, "cpu_has_fast_bf16", lambda: False)
        m.setattr(train, "train", ctrl_c_at_once)
        out = ["--out", str(tmp_path / "w"), "--device", "cpu"]
        assert main(["train", *args, *out, "--precision", "bf16"]) == 130
        assert "warning: this CPU has no native bf16" in capsys.readouterr().err
        assert main(["train", *args, *out]) == 130  # auto: fp32 here, nothing to say
        assert "warning" not in capsys.readouterr().err

    # An ensemble stopped without --out: "the same command" would start a new folder, so the
    # hint names the one to continue.
    from mnist_cnn import ensemble

    def ctrl_c_in_member_0(cfg, folder, *a, **k):
        raise Interrupted(folder / "member-0", 0)

    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        m.setattr(ensemble, "train_members", ctrl_c_in_member_0)
        assert main(["ensemble", "--models", "2", "--data-dir", str(data_dir)]) == 130
        err = capsys.readouterr().err
        made = err.split("→ ")[1].split()[0]  # "Ensemble of 2 ... → runs/<date-time>"
        assert made.startswith("runs") and f"same command with --out {made} (it" in err

    # Stopped while members or the ensemble are scored (no training under way): the same hint,
    # not a bare 'Interrupted.'
    def ctrl_c_while_scoring(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        m.setattr(ensemble, "train_members", ctrl_c_while_scoring)
        assert main(["ensemble", "--models", "2", "--data-dir", str(data_dir)]) == 130
        err = capsys.readouterr().err
        made = err.split("→ ")[1].split()[0]
        assert f"Interrupted in {made}; trained members are kept" in err
        assert f"same command with --out {made} (it" in err

    run = tmp_path / "b"

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    # Stopped while the figures are drawn, the last part of the report: report.json, which
    # marks a run finished, is written after them, so --resume still has the report to finish.
    with monkeypatch.context() as m:
        m.setattr(figures, "write_all", ctrl_c)
        assert main(["train", *args, "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert f"every epoch is saved in {run}" in err and f"--resume {run}" in err
    assert not (run / "report.json").exists()
    assert main(["train", "--resume", str(run), "--data-dir", str(data_dir)]) == 0
    assert (run / "report.json").is_file() and (run / "wrong_results.png").is_file()


def test_weights_are_written_with_the_usual_permissions_and_a_failed_write_is_an_oserror(
    tmp_path, capsys, monkeypatch
):
    import os
    import stat

    from mnist_cnn import train

    old = os.umask(0o022)
    try:
        train._atomic_save({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="cannot write .*x.safetensors: No space left on device"):
        train._atomic_save({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("x.*"))


def test_bf16_on_a_gpu_without_native_bf16_is_warned_about(monkeypatch):
    from mnist_cnn.cli import _warn_if_slow_bf16
    from mnist_cnn.config import TrainConfig

    said = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    _warn_if_slow_bf16(TrainConfig(precision="bf16"), torch.device("cuda"),
                       say=lambda *a, **k: said.append(a[0]))
    assert len(said) == 1 and "this GPU has no native bf16" in said[0]


def test_a_termination_request_stops_a_training_as_ctrl_c_does(tmp_path, data_dir):
    # `kill`, `timeout` or a scheduler's time limit: the finished epochs are kept and the
    # command to continue is printed, as after Ctrl-C (the default SIGTERM just ended it).
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "train", "--epochs", "20", "--train-subset", "1000",
         "--batch-size", "128", "--precision", "fp32", "--out", str(run), "--data-dir",
         str(data_dir)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.safetensors").is_file() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert re.search(r"Interrupted: \d+ finished epochs? (is|are) saved", err), err
    assert f"mnist-cnn train --resume {run}" in err
    assert "Traceback" not in err
