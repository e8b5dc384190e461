import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script

from mnist_cnn.cli import main
from mnist_cnn.config import CorruptFile, TrainConfig
from mnist_cnn.ensemble import ensemble_probas, member_dirs, up_to_date_report
from mnist_cnn.model import StrongCNN, count_params
from mnist_cnn.predict import Classifier
from mnist_cnn.train import HISTORY_KEYS, loss_and_accuracy, train

CPU = torch.device("cpu")
TINY = ["--epochs", "1", "--train-subset", "1500", "--batch-size", "128", "--precision", "fp32"]


def test_ensemble_trains_reuses_and_evaluates(tmp_path, data_dir, mnist, capsys):
    folder = tmp_path / "ens"
    args = ["ensemble", "--models", "2", *TINY, "--out", str(folder), "--data-dir", str(data_dir)]
    assert main(args) == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["members"] == 2 and len(report["member_test_accuracy"]) == 2
    assert report["seeds"] == [0, 1]
    # Each member keeps its own best epoch; the ensemble has none of its own.
    members = [json.loads((run / "report.json").read_text()) for run in member_dirs(folder)]
    assert report["member_best_epoch"] == [m["best_epoch"] for m in members]
    out = capsys.readouterr().out
    assert report["best_epoch"] is None and "kept epochs 1, 1 (of 1 trained)" in out
    assert "members (test-time augmentation): " in out
    for run in member_dirs(folder):
        assert (run / "report.json").exists() and (run / "model.safetensors").exists()
    for name in ("random_results.png", "wrong_results.png", "confusion_matrix.png",
                 "training_curves.png"):
        assert (folder / name).exists()

    # Running the same command again reuses the finished members, and the ensemble's report
    # as well: nothing changed since it was scored.
    first_out = out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, reused") == 2 and "scored earlier" in out
    assert f"from {folder}/report.json" in out
    members_line = next(line for line in first_out.splitlines() if line.startswith("members"))
    assert members_line in out.splitlines() and "kept epochs 1, 1 (of 1 trained)" in out
    # Scored again when asked another way, or when a member is not the one scored (another
    # run's weights moved in keep their old timestamps: the report compares the files' bytes).
    assert up_to_date_report(folder, tta=True, device=CPU) == report
    assert up_to_date_report(folder, tta=False, device=CPU) is None
    first, second = (run / "model.safetensors" for run in member_dirs(folder))
    kept = second.read_bytes()
    shutil.copy2(first, second)
    assert up_to_date_report(folder, tta=True, device=CPU) is None
    second.write_bytes(kept)
    assert up_to_date_report(folder, tta=True, device=CPU) == report
    # Scored in another precision (a bf16 machine's report, on this fp32 one): scored again.
    assert report["scored_in"] == "fp32" and all(m["scored_in"] == "fp32" for m in members)
    (folder / "report.json").write_text(json.dumps(report | {"scored_in": "bf16"}))
    assert up_to_date_report(folder, tta=True, device=CPU) is None
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "wrong_results.png").unlink()  # a figure deleted: drawn again
    assert up_to_date_report(folder, tta=True, device=CPU) is None

    # Other flags into the same folder: one clear line, and nothing reused, trained or written
    # (another --models is no other flag: the folder is still this command's own).
    assert main([*args, "--lr", "0.004", "--models", "3"]) == 2
    err = capsys.readouterr().err
    assert "member-0 was trained with other settings: lr 0.002 (asked: 0.004)" in err
    assert json.loads((folder / "report.json").read_text()) == report

    out = tmp_path / "eval"
    assert main(["evaluate", str(folder), "--out", str(out), "--data-dir", str(data_dir)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["test_accuracy"] == report["test_accuracy"]
    assert again["test_errors"] == report["test_errors"]

    # The reference model's ensemble scores its members and their average through test-time
    # augmentation by default; each member is scored the way the ensemble is.
    runs, cpu = member_dirs(folder), torch.device("cpu")
    assert report["tta"] is True and json.loads((folder / "ensemble.json").read_text())["tta"]
    for run, val_accuracy in zip(runs, report["member_val_accuracy"], strict=True):
        # (validation only: test is scored by the same code, and seven views of 10,000 images
        # a member cost a CI run half a minute)
        val = ensemble_probas([run], [mnist.val_images], cpu, tta=True)[0]
        assert val_accuracy == loss_and_accuracy(val, mnist.val_labels)[1]
    assert report["member_val_accuracy"] != [m["val_accuracy"] for m in members]  # not plain
    # Switched off when evaluating: the members' numbers are their own reports'; the ensemble
    # folder itself is unchanged.
    plain_out = tmp_path / "eval_plain"
    assert main(["evaluate", str(folder), "--tta", "off", "--out", str(plain_out),
                 "--data-dir", str(data_dir)]) == 0
    plain = json.loads((plain_out / "report.json").read_text())
    assert plain["tta"] is False and plain["val_accuracy"] != report["val_accuracy"]
    assert plain["member_test_accuracy"] == [m["test_accuracy"] for m in members]
    assert json.loads((folder / "ensemble.json").read_text())["tta"] is True
    # Re-scored in place, the folder follows: ensemble.json says what its report.json does (the
    # setting predict, serve and a continued `mnist-cnn ensemble` use).
    assert main(["evaluate", str(folder), "--no-tta", "--data-dir", str(data_dir)]) == 0
    assert json.loads((folder / "report.json").read_text())["val_accuracy"] == plain["val_accuracy"]
    assert json.loads((folder / "ensemble.json").read_text()) == {
        "members": ["member-0", "member-1"], "tta": False}
    assert Classifier.load(folder).tta is False

    # The results tables' script reads an ensemble folder and a plain run folder alike.
    summarize = load_script("summarize_runs").summarize
    both, one = summarize(folder), summarize(member_dirs(folder)[1])
    assert both["seeds"] == [0, 1] and one["seeds"] == [1]
    assert one["test_each"] == both["test_each"][1:] and one["errors"] == both["errors"][1:]
    assert one["ensemble_errors"] == one["errors"][0]  # a run is an ensemble of one
    assert one["val_loss_each"] == both["val_loss_each"][1:]
    # The plain weights are read at the epoch the run's rule keeps: the last one here.
    last = [json.loads(line) for line in (member_dirs(folder)[1] / "metrics.jsonl").read_text()
            .splitlines()][-1]
    assert one["val_raw"] == f"{100 * last['val_accuracy_raw']:.3f} ± 0.000"
    # A damaged ensemble report is named as one.
    (folder / "report.json").write_text("[]")
    with pytest.raises(CorruptFile, match="cannot be read as an ensemble's report.json"):
        summarize(folder)
    # An ensemble stopped during its second member: the finished one is summarized, alone.
    (folder / "report.json").unlink()
    (member_dirs(folder)[1] / "report.json").unlink()
    stopped = summarize(folder)
    assert stopped["seeds"] == [0] and stopped["test_each"] == both["test_each"][:1]
    assert stopped["ensemble_test"] is None


def test_tta_gives_probabilities(tmp_path, data_dir, mnist):
    folder = tmp_path / "ens"
    # --no-tta: the ensemble's own scoring is the test above's; here a member is all it takes.
    assert main(["ensemble", "--models", "1", *TINY, "--no-tta", "--out", str(folder),
                 "--data-dir", str(data_dir)]) == 0
    runs, cpu = member_dirs(folder), torch.device("cpu")
    plain, plain_val = ensemble_probas(runs, [mnist.test_images[:200], mnist.val_images[:50]], cpu)
    tta = ensemble_probas(runs, [mnist.test_images[:200]], cpu, tta=True)[0]
    # Scoring several sets in one pass gives what scoring each alone gives.
    torch.testing.assert_close(plain_val, ensemble_probas(runs, [mnist.val_images[:50]], cpu)[0])
    assert torch.allclose(tta.sum(1), torch.ones(200), atol=1e-4)
    assert not torch.equal(plain, tta)
    assert (tta.argmax(1) == plain.argmax(1)).float().mean() > 0.9


def test_strong_model_shape_and_training(mnist, tmp_path):
    model = StrongCNN()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count_params(model) == 325_994
    # --width multiplies every layer's channels: 48/96/192 at 1.5.
    wide = StrongCNN(width=1.5)
    assert wide(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert [m.out_channels for m in wide.features if isinstance(m, torch.nn.Conv2d)] == [
        48, 48, 48, 96, 96, 96, 192]
    # Rotation only (no shift): 24 steps are too few to learn shifted digits too, and this test is
    # about the batch-norm statistics, not augmentation (with the shift: 0.63, measured).
    cfg = dataclasses.replace(TrainConfig(), model="strong", dropout=(0.4, 0.4), epochs=1,
                              train_subset=3000, batch_size=128, precision="fp32", max_shift=0.0)
    history = train(cfg, tmp_path / "strong", mnist, torch.device("cpu"), progress=False,
                    log=lambda s: None)
    # The weight average must carry the batch-norm statistics, or validation collapses.
    assert history[0]["val_accuracy"] > 0.8


def test_model_flag_trains_that_model_and_a_hand_made_ensemble_mixes_models(
    tmp_path, data_dir, capsys
):
    for name in ("strong", "m7"):
        run = tmp_path / name
        assert main(["train", "--model", name, *TINY, "--train-subset", "300", "--out", str(run),
                     "--data-dir", str(data_dir)]) == 0
        config = json.loads((run / "config.json").read_text())
        # Every model shares the default dropout (0.2/0.2 beat the strong model's old 0.4/0.4).
        assert config["model"] == name and config["dropout"] == list(TrainConfig().dropout)
        assert json.loads((run / "report.json").read_text())["model"] == name
    # An ensemble.json written by hand may name finished runs beside it, of different models
    # (how mixed ensembles are measured, docs/RESULTS.md): evaluate averages them and says so.
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "ensemble.json").write_text(json.dumps({"members": ["../strong", "../m7"]}))
    assert main(["evaluate", str(mix), "--out", str(tmp_path / "eval"),
                 "--data-dir", str(data_dir)]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["model"] == "m7/strong" and report["members"] == 2 and not report["tta"]
    # Each member scored as its own run scored itself (fp32, no test-time augmentation).
    own = [json.loads((tmp_path / n / "report.json").read_text())["test_accuracy"]
           for n in ("strong", "m7")]
    assert report["member_test_accuracy"] == pytest.approx(own, abs=1e-9)
    assert "an ensemble of 2 m7/strong models" in Classifier.load(mix, CPU).about
    # `mnist-cnn ensemble` would write its own members' list over it: refused.
    capsys.readouterr()
    assert main(["ensemble", "--models", "1", "--out", str(mix)]) == 2
    assert "is an ensemble of other runs (../strong, ../m7), not one" in capsys.readouterr().err
    assert json.loads((mix / "ensemble.json").read_text())["members"] == ["../strong", "../m7"]


def test_keep_last_epoch_rescores_an_old_best_epoch_ensemble(tmp_path, data_dir, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mnist_cnn import ensemble

    folder, out = tmp_path / "ens", tmp_path / "last"
    with monkeypatch.context() as m:  # made as before finished runs dropped their checkpoint
        m.setattr(ensemble, "drop_resume_state", lambda run: None)
        assert main(["ensemble", "--models", "1", *TINY, "--epochs", "2", "--select", "best",
                     "--no-tta", "--out", str(folder), "--data-dir", str(data_dir)]) == 0
    script = Path(__file__).parents[1] / "scripts" / "keep_last_epoch.py"
    env = os.environ | {"MNIST_DATA_DIR": str(data_dir)}
    subprocess.run([sys.executable, str(script), str(folder), str(out)], check=True, env=env)
    member = json.loads((out / "member-0" / "report.json").read_text())
    assert member["select"] == "last" and member["best_epoch"] == 2
    assert json.loads((out / "member-0" / "config.json").read_text())["select"] == "last"
    report = json.loads((out / "report.json").read_text())
    assert report["select"] == "last" and report["member_test_accuracy"] == [
        member["test_accuracy"]
    ]
    assert report["tta"] is False  # --no-tta: the reference model's default turned off
    # Continued without the flag, an ensemble keeps the scoring it was made with.
    assert main(["ensemble", "--models", "1", *TINY, "--epochs", "2", "--select", "best",
                 "--out", str(folder), "--data-dir", str(data_dir)]) == 0
    assert json.loads((folder / "report.json").read_text())["tta"] is False
    # The source is untouched and still says it kept the best epoch.
    assert json.loads((folder / "report.json").read_text())["select"] == "best"


def test_val_test_agreement_pairs_same_seed_runs_of_different_folders(tmp_path):
    agreement = load_script("val_test_agreement")

    def run(name, seed, val_accuracy, val_loss, test_errors, epochs=30):
        folder = tmp_path / name
        folder.mkdir()
        TrainConfig(seed=seed, epochs=epochs).save(folder / "config.json")
        (folder / "report.json").write_text(json.dumps(
            {"val_accuracy": val_accuracy, "test_errors": test_errors, "best_epoch": epochs,
             "epochs": epochs, "test_accuracy": 1 - test_errors / 10_000, "train_seconds": 1.0}))
        last = dict.fromkeys(HISTORY_KEYS, 0) | {"epoch": epochs, "val_loss": val_loss}
        (folder / "metrics.jsonl").write_text(json.dumps(last))

    run("a", 0, 0.9970, 0.011, 42)
    run("b", 0, 0.9976, 0.012, 40)  # 3 validation images more right, 2 test images: agrees
    run("c", 0, 0.9966, 0.010, 41)  # the lowest loss, but test between a and b
    run("a_copy", 0, 0.9970, 0.011, 42)  # a copy of a: left out
    run("d", 1, 0.9960, 0.010, 40)  # another seed: paired with nothing
    run("short", 0, 0.9900, 0.030, 90, epochs=10)  # under 20 epochs: left out
    (tmp_path / "not_a_run").mkdir()
    runs = agreement.load_runs([tmp_path])
    assert sorted(Path(r["folder"]).name for r in runs) == ["a", "b", "c", "d"]
    [line] = agreement.tally(runs)
    assert line["runs"] == 4
    # a-b: b better on validation (3 images) and test; a-c: a better on validation (2) and
    # worse on test; b-c: b better on validation (5) and test.
    assert line["val_accuracy"] == {"agree": 2, "disagree": 1, "test_equal": 0}
    assert line["val_accuracy_by_images_apart"] == {
        "1": {"agree": 0, "disagree": 0, "test_equal": 0},
        "2-3": {"agree": 1, "disagree": 1, "test_equal": 0},
        ">=4": {"agree": 1, "disagree": 0, "test_equal": 0},
    }
    # Loss: a-b a lower, b better on test (disagree); a-c c lower, c better (agree); b-c c
    # lower, b better (disagree).
    assert line["val_loss"] == {"agree": 1, "disagree": 2, "test_equal": 0}


def test_padding_does_not_split_a_strong_ensemble(tmp_path, mnist):
    # The strong model has its own padding: a member begun with --padding valid continues
    # without it; any other difference is still refused, before anything trains.
    from mnist_cnn.ensemble import RecipeMismatch, train_members

    strong = TrainConfig(model="strong", epochs=1, train_subset=300, precision="fp32")
    folder = tmp_path / "ens"
    for k, change in enumerate((dict(padding="valid"), dict(lr=0.004))):
        (folder / f"member-{k}").mkdir(parents=True)
        dataclasses.replace(strong, seed=k, **change).save(folder / f"member-{k}" / "config.json")
    with pytest.raises(RecipeMismatch) as mismatch:
        train_members(strong, folder, 2, mnist, torch.device("cpu"), progress=False)
    assert "member-1 was trained with other settings: lr 0.004 (asked: 0.002)" in str(
        mismatch.value
    )
    assert not (folder / "ensemble.json").exists()


def test_augmentation_settings_do_not_split_an_ensemble_without_augmentation(tmp_path, mnist):
    # Begun with --no-augment and a rotation that did nothing (refused now): it continues
    # without the rotation. The same difference with augmentation on is a real one.
    from mnist_cnn.ensemble import RecipeMismatch, train_members

    plain = TrainConfig(augment=False, epochs=1, train_subset=300, precision="fp32")
    folder = tmp_path / "ens"
    (folder / "member-0").mkdir(parents=True)
    dataclasses.replace(plain, max_rotation=20, max_shift=3).save(
        folder / "member-0" / "config.json")
    (folder / "member-1").mkdir()
    dataclasses.replace(plain, seed=1, lr=0.004).save(folder / "member-1" / "config.json")
    with pytest.raises(RecipeMismatch) as mismatch:  # checked before anything trains
        train_members(plain, folder, 2, mnist, torch.device("cpu"), progress=False)
    assert "member-0" not in str(mismatch.value) and "member-1" in str(mismatch.value)
    augmented = dataclasses.replace(plain, augment=True)
    dataclasses.replace(augmented, max_rotation=20).save(folder / "member-0" / "config.json")
    with pytest.raises(RecipeMismatch, match="member-0 was trained with other settings: "
                       "max_rotation 20"):
        train_members(augmented, folder, 2, mnist, torch.device("cpu"), progress=False)
