import dataclasses
import json
import os

import pytest
import torch
from conftest import load_script

from mnist_cnn.config import TrainConfig, write_json
from mnist_cnn.evaluate import load_run, write_report
from mnist_cnn.train import Interrupted, lr_at, run_finished, train

CPU = torch.device("cpu")
TINY = TrainConfig(epochs=2, batch_size=128, train_subset=1500, precision="fp32")


def without_time(history):
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


def test_short_real_training_reaches_sane_accuracy(mnist, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=1, train_subset=10_000, batch_size=256)
    history = train(cfg, tmp_path / "run", mnist, CPU, progress=False, log=lambda s: None)
    assert len(history) == 1
    assert history[0]["val_accuracy"] > 0.90  # one epoch on 10,000 images, measured ≈ 0.94
    # The two validation halves (even and odd images) make up the whole.
    a, b = history[0]["val_accuracy_halves"]
    assert a != b and (a + b) / 2 == pytest.approx(history[0]["val_accuracy"], abs=1e-6)


def test_a_diverging_training_warns_and_one_whose_loss_is_not_a_number_stops(mnist, tmp_path):
    from mnist_cnn.config import Diverged

    # Adam keeps its steps bounded: far too high a rate makes the loss climb, not nan.
    said = []
    cfg = dataclasses.replace(TINY, epochs=2, train_subset=1024, batch_size=256, lr=10.0)
    train(cfg, tmp_path / "adam", mnist, CPU, progress=False, log=said.append)
    warnings = [s for s in said if s.startswith("warning:")]
    assert len(warnings) == 1 and "training is diverging" in warnings[0]  # said once
    # SGD's loss overflows: the run stops there, that epoch not recorded.
    cfg = dataclasses.replace(TINY, epochs=5, train_subset=512, optimizer="sgd", lr=1e4)
    with pytest.raises(Diverged, match=r"diverged in epoch (\d) .*lower --lr") as stop:
        train(cfg, tmp_path / "sgd", mnist, CPU, progress=False, log=lambda s: None)
    epoch = int(stop.value.args[0].split("diverged in epoch ")[1].split()[0])
    lines = (tmp_path / "sgd" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == epoch - 1


def test_epoch_choice_reads_the_other_half():
    summarize_runs = load_script("summarize_runs")
    # Epoch 2 is the best on half 0 (read on half 1: 0.90), epoch 3 on half 1 (on half 0: 0.94);
    # the last epoch reads 0.99 on half 1 and 0.94 on half 0.
    history = [{"val_accuracy_halves": h} for h in ([0.5, 0.5], [0.99, 0.90], [0.94, 0.99])]
    choice = summarize_runs.epoch_choice([history])
    assert choice == {"best_epoch_on_other_half": 92.0, "last_epoch": 96.5}
    assert summarize_runs.epoch_choice([[{"val_accuracy": 0.9}]]) is None


def test_same_seed_same_numbers(mnist, tmp_path):
    a = train(TINY, tmp_path / "a", mnist, CPU, progress=False, log=lambda s: None)
    b = train(TINY, tmp_path / "b", mnist, CPU, progress=False, log=lambda s: None)
    c = train(dataclasses.replace(TINY, seed=1), tmp_path / "c", mnist, CPU, progress=False,
              log=lambda s: None)
    assert without_time(a) == without_time(b)
    assert without_time(a) != without_time(c)


def test_raw_weights_of_an_ema_run_are_a_run_without_ema(mnist, tmp_path):
    # metrics.jsonl's val_accuracy_raw is how docs/RESULTS.md measures the EMA without a second
    # training: it must equal what a run with --ema 0 validates.
    quiet = dict(progress=False, log=lambda s: None)
    with_ema = train(TINY, tmp_path / "ema", mnist, CPU, **quiet)
    without = train(dataclasses.replace(TINY, ema=0.0), tmp_path / "raw", mnist, CPU, **quiet)
    assert [h["val_accuracy_raw"] for h in with_ema] == [h["val_accuracy"] for h in without]
    assert all("val_accuracy_raw" not in h for h in without)
    assert [h["val_accuracy"] for h in with_ema] != [h["val_accuracy"] for h in without]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_interrupt_then_resume_matches_an_uninterrupted_run(mnist, tmp_path, optimizer):
    cfg = dataclasses.replace(TINY, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else TINY.lr,
                              weight_decay=5e-4 if optimizer == "sgd" else 0.0)
    full = train(cfg, tmp_path / "full", mnist, CPU, progress=False, log=lambda s: None)
    assert full[-1]["val_accuracy"] > 0.5  # both optimizers learn (1,500 images, two epochs)

    def ctrl_c_after_first_epoch(line):
        if line.startswith("epoch   1/"):
            raise KeyboardInterrupt

    # A folder whose name is not UTF-8 (Latin-1 é): its safetensors files read as any others.
    run = tmp_path / os.fsdecode(b"cut-\xe9")
    with pytest.raises(Interrupted) as stop:
        train(cfg, run, mnist, CPU, progress=False, log=ctrl_c_after_first_epoch)
    assert stop.value.epochs_done == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / "model.safetensors").exists() and (run / "checkpoint.safetensors").exists()

    # A report.json in a half-trained run (`mnist-cnn evaluate` writes one) does not make it
    # finished, even one claiming every epoch: the checkpoint is at epoch 1.
    for epochs in (1, cfg.epochs):
        write_json(run / "report.json", {"epochs": epochs})
        assert not run_finished(run)

    saved = TrainConfig.load(run / "config.json")
    # TINY's defaults, resolved
    assert saved == dataclasses.replace(cfg, clean_epochs=0, max_rotation=25.0)
    resumed = train(saved, run, mnist, CPU, resume=True, progress=False, log=lambda s: None)
    assert without_time(resumed) == without_time(full)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2]
    write_json(run / "report.json", {"epochs": 1})  # a stale report of the first epoch
    assert not run_finished(run)
    write_json(run / "report.json", {"epochs": cfg.epochs})
    assert run_finished(run)
    kept = load_run(run, CPU)[1].state_dict()
    same = load_run(tmp_path / "full", CPU)[1].state_dict()
    assert all(torch.equal(kept[k], same[k]) for k in same)


def test_select_keeps_the_last_or_the_best_epoch(mnist, tmp_path):
    from safetensors import safe_open

    from mnist_cnn.evaluate import build_report

    def kept_epoch(run):
        with safe_open(str(run / "model.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["epoch"])

    quiet = dict(progress=False, log=lambda s: None)
    cfg = dataclasses.replace(TINY, epochs=3)
    last = train(cfg, tmp_path / "last", mnist, CPU, **quiet)
    best = train(dataclasses.replace(cfg, select="best"), tmp_path / "best", mnist, CPU, **quiet)
    assert without_time(last) == without_time(best)  # the choice changes nothing in training
    first_best = max(best, key=lambda h: h["val_accuracy"])["epoch"]
    assert kept_epoch(tmp_path / "last") == 3 and kept_epoch(tmp_path / "best") == first_best
    probs, labels = torch.full((4, 10), 0.1), torch.arange(4)
    assert build_report(probs, labels, 0.9, best, 1, select="best")["best_epoch"] == first_best
    assert build_report(probs, labels, 0.9, last, 1, select="last")["best_epoch"] == 3
    # Run folders saved before the choice existed kept the best epoch, and still say so.
    old = TrainConfig().to_json()
    del old["select"]
    assert TrainConfig.from_json(old).select == "best" and TrainConfig().select == "last"


def test_weight_decay_is_decoupled_and_zero_is_adam():
    from mnist_cnn.train import make_optimizer

    torch.manual_seed(0)
    grads = [torch.randn(10, 3) for _ in range(3)]

    def run(wd: float, grads: list[torch.Tensor]) -> torch.Tensor:
        model = torch.nn.Linear(3, 10, bias=False)
        torch.nn.init.ones_(model.weight)
        opt = make_optimizer(model, TrainConfig(lr=0.01, weight_decay=wd))
        for g in grads:
            model.weight.grad = g.clone()
            opt.step()
        return model.weight.detach()

    # With a zero gradient, Adam's own step is 0: only the decay moves the weights, by 1 - lr*wd.
    assert torch.allclose(run(0.5, [torch.zeros(10, 3)]), torch.full((10, 3), 1 - 0.01 * 0.5))
    # At 0 it is plain Adam, step for step.
    model = torch.nn.Linear(3, 10, bias=False)
    torch.nn.init.ones_(model.weight)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    for g in grads:
        model.weight.grad = g.clone()
        adam.step()
    assert torch.allclose(run(0.0, grads), model.weight.detach())


def test_one_cycle_schedule():
    cfg = TrainConfig(lr=1.0, warmup=0.25)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(25, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == 0.0
    assert all(lr_at(s, 100, cfg) >= lr_at(s + 1, 100, cfg) for s in range(25, 100))


def test_elastic_distortion_thickness_shear_and_cutout_train_and_change_the_run(mnist, tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    one = dataclasses.replace(TINY, epochs=1)
    plain = train(one, tmp_path / "plain", mnist, CPU, **quiet)
    for change in (
        dict(elastic=34.0), dict(max_thickness=0.5), dict(max_shear=0.2), dict(cutout=8.0)
    ):
        name = next(iter(change))
        changed = train(dataclasses.replace(one, **change), tmp_path / name, mnist, CPU, **quiet)
        assert changed[0]["val_accuracy"] > 0.5  # 1,500 images, one epoch: well above chance
        assert without_time(changed) != without_time(plain)


def test_distillation_loss_is_t_squared_kl():
    from mnist_cnn.train import distillation_loss

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    t = 4.0
    q = (logits / t).softmax(1)
    assert distillation_loss(logits, q, t).item() == pytest.approx(0.0, abs=1e-6)
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    by_hand = t * t * (soft * (soft / q).log()).sum(1).mean()
    assert distillation_loss(logits, soft, t).item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.fixture(scope="module")
def teacher(mnist, tmp_path_factory):
    """A finished two-member ensemble folder (seeds 0 and 1, one epoch each) to distil from."""
    folder = tmp_path_factory.mktemp("teacher")
    for k in range(2):
        run = folder / f"member-{k}"
        cfg = dataclasses.replace(TINY, epochs=1, seed=k)
        train(cfg, run, mnist, CPU, progress=False, log=lambda s: None)
        _, model = load_run(run, CPU)
        write_report(run, run, model, cfg, mnist, CPU)  # what makes a run finished
    (folder / "ensemble.json").write_text(json.dumps({"members": ["member-0", "member-1"]}))
    return folder


def test_distillation_targets_and_training(mnist, teacher, tmp_path):
    import shutil

    from mnist_cnn.train import predict_proba, soften, teacher_probabilities

    quiet = dict(progress=False, log=lambda s: None)
    one = dataclasses.replace(TINY, epochs=1)
    images = mnist.train_images[:300]
    p = sum(predict_proba(load_run(teacher / f"member-{k}", CPU)[1], images, CPU)
            for k in range(2)) / 2
    assert torch.allclose(teacher_probabilities(teacher, images, CPU), p, atol=1e-5)
    # softmax(log p / T) is p^(1/T), normalized: at T = 1, p itself.
    assert torch.allclose(soften(p, 1.0), p, atol=1e-5)
    soft = soften(p, 4.0)
    expected = p ** 0.25 / (p ** 0.25).sum(1, keepdim=True)
    assert torch.allclose(soft, expected, atol=1e-5)
    assert (soft.max(1).values < p.max(1).values).all()  # softer, same ranking
    assert torch.equal(soft.argmax(1), p.argmax(1))
    for folder in (tmp_path / "none", tmp_path):
        with pytest.raises(ValueError, match="not a finished run"):
            teacher_probabilities(folder, images, CPU)

    plain = train(one, tmp_path / "plain", mnist, CPU, **quiet)
    student = train(dataclasses.replace(one, teacher=str(teacher)), tmp_path / "s", mnist, CPU,
                    **quiet)
    assert student[0]["val_accuracy"] > 0.5
    assert without_time(student) != without_time(plain)
    # Weight 0: the teacher's term is multiplied away and the run is the plain one.
    zero = train(dataclasses.replace(one, teacher=str(teacher), teacher_weight=0.0),
                 tmp_path / "z", mnist, CPU, **quiet)
    assert without_time(zero) == without_time(plain)

    # A half-trained ensemble is refused, not read as a smaller one.
    half = tmp_path / "half"
    shutil.copytree(teacher, half)
    (half / "member-1" / "report.json").unlink()
    with pytest.raises(ValueError, match=r"\(member-1 unfinished or without model.safetensors\)"):
        teacher_probabilities(half, images, CPU)


def test_the_teacher_probabilities_are_kept_and_labelled_once(
    mnist, data_dir, teacher, tmp_path, capsys, monkeypatch
):
    import shutil

    from mnist_cnn import ensemble
    from mnist_cnn.cli import main
    from mnist_cnn.ensemble import ensemble_probas, train_members
    from mnist_cnn.train import (
        TEACHER_FILE,
        _atomic_save,
        kept_teacher_probabilities,
        teacher_probabilities,
    )

    quiet = dict(progress=False, log=lambda s: None)
    one = dataclasses.replace(TINY, epochs=1)
    # A copy of the teacher, to be moved away.
    teacher = shutil.copytree(teacher, tmp_path / "teacher")

    # The teacher's probabilities are kept in the run folder: a student interrupted after its
    # first epoch resumes from them, to the same numbers, after its teacher has moved away.
    two = dataclasses.replace(TINY, teacher=str(teacher))
    full = train(two, tmp_path / "full", mnist, CPU, **quiet)

    def ctrl_c_after_first_epoch(line):
        if line.startswith("epoch   1/"):
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(two, cut, mnist, CPU, progress=False, log=ctrl_c_after_first_epoch)
    kept_copy = (cut / TEACHER_FILE).read_bytes()
    teacher.rename(tmp_path / "moved")  # before, this stopped the student from resuming
    assert main(["train", "--resume", str(cut), "--data-dir", str(data_dir),
                 "--device", "cpu"]) == 0
    assert f"Soft targets from the teacher {teacher} (kept in {TEACHER_FILE})" in (
        capsys.readouterr().out)
    lines = [json.loads(s) for s in (cut / "metrics.jsonl").read_text().splitlines()]
    assert without_time(lines) == without_time(full)
    assert not (cut / TEACHER_FILE).exists()  # finished: gone with the checkpoint
    (tmp_path / "moved").rename(teacher)

    # Only a resumed run reads a kept copy, and only a readable one of its own teacher; else the
    # teacher labels the images again.
    other = dataclasses.replace(one, teacher=str(teacher / "member-0"))
    o = tmp_path / "o"
    o.mkdir()
    said = []
    again = f"Soft targets from the teacher {teacher / 'member-0'}"
    (o / TEACHER_FILE).write_bytes(kept_copy)  # left over from another start
    train(other, o, mnist, CPU, progress=False, log=said.append)  # a fresh run
    assert again in said
    short = tmp_path / "short.safetensors"  # its own teacher's, but not one row per image
    _atomic_save({"probabilities": torch.full((10, 10), 0.1)}, short, {"teacher": other.teacher})
    for kept in (kept_copy, b"not safetensors",  # another's, damaged
                 short.read_bytes()):
        (o / TEACHER_FILE).write_bytes(kept)
        said.clear()
        train(other, o, mnist, CPU, resume=True, progress=False, log=said.append)
        assert again in said
    assert torch.equal(kept_teacher_probabilities(o, other),
                       teacher_probabilities(teacher / "member-0", mnist.train_images[:1500], CPU))

    # An ensemble's members share the teacher: it labels the images once for all of them.
    calls = []
    monkeypatch.setattr(ensemble, "ensemble_probas",
                        lambda *a, **k: calls.append(1) or ensemble_probas(*a, **k))
    ens = tmp_path / "ens"
    with monkeypatch.context() as m:  # finished members keep what they were given, to compare
        m.setattr(ensemble, "drop_resume_state", lambda run: None)
        train_members(dataclasses.replace(one, teacher=str(teacher)), ens, 2, mnist, CPU, **quiet)
    assert len(calls) == 1
    assert torch.equal(kept_teacher_probabilities(ens / "member-0", two),
                       kept_teacher_probabilities(ens / "member-1", two))
    # ... and not at all when the only member left resumes from the copy it kept.
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train_members(two, part, 1, mnist, CPU, progress=False, log=ctrl_c_after_first_epoch)
    calls.clear()
    train_members(two, part, 1, mnist, CPU, **quiet)
    assert calls == [] and run_finished(part / "member-0")


def test_clean_epochs_turn_augmentation_off_at_the_end(mnist, tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    augmented = train(TINY, tmp_path / "aug", mnist, CPU, **quiet)
    clean_last = train(dataclasses.replace(TINY, clean_epochs=1), tmp_path / "c1", mnist, CPU,
                       **quiet)
    clean_all = train(dataclasses.replace(TINY, clean_epochs=2), tmp_path / "c2", mnist, CPU,
                      **quiet)
    plain = train(dataclasses.replace(TINY, augment=False), tmp_path / "plain", mnist, CPU,
                  **quiet)
    # The first epoch is the augmented run's; the second differs from it.
    assert without_time(clean_last)[0] == without_time(augmented)[0]
    assert without_time(clean_last)[1] != without_time(augmented)[1]
    # Clean for every epoch is exactly a run without augmentation.
    assert without_time(clean_all) == without_time(plain)


def test_clean_epochs_default_to_a_tenth_of_the_epochs():
    assert TrainConfig().n_clean_epochs() == 3  # 3 of the default 30
    assert TrainConfig(model="strong").n_clean_epochs() == 0  # it lost on validation there
    # A change of --epochs moves the default with it (a short run augments throughout) ...
    assert dataclasses.replace(TrainConfig(), epochs=100).n_clean_epochs() == 10
    assert TINY.n_clean_epochs() == 0 and TrainConfig(augment=False).n_clean_epochs() == 0
    # ... a number given is used as given, and config.json records what the run did.
    assert TrainConfig(clean_epochs=5).n_clean_epochs() == 5
    assert TrainConfig().to_json()["clean_epochs"] == 3
    assert TrainConfig.from_json(TrainConfig().to_json()).clean_epochs == 3
    # Run folders saved before the option existed augmented every epoch.
    old = TrainConfig().to_json()
    del old["clean_epochs"]
    assert TrainConfig.from_json(old).n_clean_epochs() == 0


def test_rotation_defaults_to_25_degrees_for_the_reference_layers_10_for_strong():
    assert TrainConfig().rotation() == 25.0
    assert TrainConfig(model="strong").rotation() == 10.0
    assert TrainConfig(max_rotation=10).rotation() == 10.0
    assert TrainConfig(model="strong", max_rotation=0).rotation() == 0.0
    # config.json records the angle used, so a change of default cannot change a saved run.
    assert TrainConfig(model="strong").to_json()["max_rotation"] == 10.0
    assert TrainConfig.from_json(TrainConfig().to_json()).max_rotation == 25.0


def test_sgd_is_nesterov_with_l2_weight_decay():
    from mnist_cnn.train import make_optimizer

    opt = make_optimizer(torch.nn.Linear(3, 10), TrainConfig(optimizer="sgd", lr=0.1,
                                                             weight_decay=5e-4))
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    with pytest.raises(ValueError, match="optimizer must be"):
        make_optimizer(torch.nn.Linear(3, 10), TrainConfig(optimizer="lion"))


def test_the_weight_average_gets_batchnorm_statistics_of_its_own(mnist, tmp_path):
    from mnist_cnn.data import normalize
    from mnist_cnn.evaluate import load_run
    from mnist_cnn.model import build_model
    from mnist_cnn.train import BN_IMAGES, recalibrate_batchnorm

    torch.manual_seed(0)
    model = build_model("strong", dropout=(0.5, 0.5))
    images = torch.randint(0, 256, (600, 28, 28), dtype=torch.uint8)
    recalibrate_batchnorm(model, images, CPU)
    # The first layer's mean is the plain average over all the images (three batches of 200) ...
    with torch.no_grad():
        out = model.features[0](normalize(images.unsqueeze(1).float() / 255))
    assert torch.allclose(model.features[1].running_mean, out.mean((0, 2, 3)), atol=1e-5)
    # ... and with dropout off, a second pass gives the same statistics, to the bit.
    stats = [b.clone() for b in model.buffers()]
    recalibrate_batchnorm(model, images, CPU)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))
    assert not model.training

    # A strong run saves its weight average with the statistics recomputed for it.
    cfg = dataclasses.replace(TINY, model="strong", epochs=1)
    history = train(cfg, tmp_path / "s", mnist, CPU, progress=False, log=lambda s: None)
    _, saved = load_run(tmp_path / "s", CPU)
    again = [b.clone() for b in saved.buffers()]
    # (on the images it trained on: TINY's first 1,500)
    recalibrate_batchnorm(saved, mnist.train_images[: min(BN_IMAGES, cfg.train_subset)], CPU)
    assert all(torch.allclose(a, b) for a, b in zip(again, saved.buffers(), strict=True))
    assert history[0]["val_accuracy"] > 0.5


def test_no_batch_of_one_image_and_strong_trains_on_what_would_leave_one(mnist, tmp_path):
    from mnist_cnn.train import batches_per_epoch

    assert batches_per_epoch(55_000, 256) == 215  # 214 full batches and one of 216
    assert batches_per_epoch(257, 256) == 1  # one batch of 257, not 256 and 1
    assert batches_per_epoch(256, 256) == 1 and batches_per_epoch(1, 256) == 1
    assert batches_per_epoch(259, 256, world=2) == 1  # 3 left: one process would get 1
    assert batches_per_epoch(260, 256, world=2) == 2  # 4 left: 2 each
    # Batch norm cannot train on one image with 1x1 features (the strong model's last layer).
    cfg = dataclasses.replace(TINY, model="strong", epochs=1, train_subset=129, batch_size=128)
    history = train(cfg, tmp_path / "s", mnist, torch.device("cpu"), progress=False,
                    log=lambda s: None)
    assert len(history) == 1 and history[0]["train_accuracy"] > 0


def test_a_metrics_line_cut_short_is_not_an_epoch(tmp_path):
    from mnist_cnn.config import CorruptFile
    from mnist_cnn.train import HISTORY_KEYS, read_history

    metrics = tmp_path / "metrics.jsonl"
    one, two = (json.dumps({k: epoch for k in HISTORY_KEYS}) for epoch in (1, 2))
    metrics.write_text(f'{one}\n{two}\n{{"epo')  # the disk filled mid-line
    epochs = [json.loads(one), json.loads(two)]
    assert read_history(tmp_path, 2) == epochs  # what --resume reads
    assert read_history(tmp_path) == epochs  # evaluate, figures
    for damaged in (f'{one}\n{{"epo\n{two}\n', f'{one}\nnull\n', f'{one}\n{{"epoch": 2}}\n'):
        # Damage inside, a line that is not an epoch, or one without an epoch's numbers (a
        # KeyError in the report before): an error that names the file.
        metrics.write_text(damaged)
        with pytest.raises(CorruptFile, match="metrics.jsonl cannot be read"):
            read_history(tmp_path)
    assert read_history(tmp_path / "none") == []


def test_a_run_begun_with_other_batches_resumes_with_them(mnist, tmp_path, monkeypatch):
    # A run begun before a one-image last batch joined the one before it (or under another
    # number of processes) keeps its own batches on --resume: the same numbers as without a stop.
    from mnist_cnn import train as train_module

    cfg = dataclasses.replace(TINY, train_subset=1537)  # 12 batches of 128 and one of 1
    quiet = dict(progress=False, log=lambda s: None)
    with monkeypatch.context() as m:
        m.setattr(train_module, "batches_per_epoch", lambda n, b, world=1: -(-n // b))
        before = train(cfg, tmp_path / "before", mnist, CPU, **quiet)

        def ctrl_c_after_first_epoch(line):
            if line.startswith("epoch   1/"):
                raise KeyboardInterrupt

        with pytest.raises(Interrupted):
            train(cfg, tmp_path / "cut", mnist, CPU, progress=False,
                  log=ctrl_c_after_first_epoch)
    resumed = train(cfg, tmp_path / "cut", mnist, CPU, resume=True, **quiet)
    assert without_time(resumed) == without_time(before)
    now = train(cfg, tmp_path / "now", mnist, CPU, **quiet)  # 12 batches, the last of 129
    assert without_time(now) != without_time(before)


def test_a_strong_run_whose_last_batch_more_processes_cannot_share_is_refused(mnist, tmp_path):
    # Begun in one process with a last batch of 2, resumed in 2 processes it would give one of
    # them a single image (batch norm): refused before the processes are tied together.
    from mnist_cnn.config import CannotResume
    from mnist_cnn.train import Dist

    cfg = dataclasses.replace(TINY, model="strong", epochs=1, train_subset=258)  # 128, 128, 2
    run = tmp_path / "s"
    train(cfg, run, mnist, CPU, progress=False, log=lambda s: None)
    longer = dataclasses.replace(cfg, epochs=2)
    with pytest.raises(CannotResume, match="last batch of 2 images, which 2 processes cannot "
                       r"share .* resume it in 1 process or fewer"):
        train(longer, run, mnist, CPU, resume=True, dist=Dist(rank=0, world=2), progress=False)
    # In one process it goes on.
    history = train(longer, run, mnist, CPU, resume=True, progress=False, log=lambda s: None)
    assert [h["epoch"] for h in history] == [1, 2]
    # The reference layers need one image a process (an empty share would give a nan loss).
    ref = dataclasses.replace(TINY, epochs=1, train_subset=258)
    train(ref, tmp_path / "r", mnist, CPU, progress=False, log=lambda s: None)
    with pytest.raises(CannotResume, match="last batch of 2 images, which 3 processes cannot "
                       r"share with 1 or more each: resume it in 2 processes or fewer"):
        train(dataclasses.replace(ref, epochs=2), tmp_path / "r", mnist, CPU, resume=True,
              dist=Dist(rank=0, world=3), progress=False)


def test_auto_precision_on_a_gpu_is_native_bf16_or_fp32(monkeypatch):
    from mnist_cnn.train import resolve_precision

    cuda = torch.device("cuda")
    for native, amp in ((True, torch.bfloat16), (False, None)):
        # Older GPUs report bf16 as supported through emulation; only native counts.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native:
                            native or including_emulation)
        assert resolve_precision("auto", cuda) is amp
