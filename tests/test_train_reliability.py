"""Training never loses data: non-finite steps are skipped and counted, checkpoints never hold
non-finite weights, the best one is kept, ``--out`` is checked and locked before the first step,
and every bad command-line argument is one line and exit code 2."""
import fcntl
import math
import os

import pytest
import torch

from fastformers import train as train_module
from fastformers.cli import main
from fastformers.train import (CheckpointError, OutputDirError, OutputLock, TrainingDiverged, atomic_save,
                               load_checkpoint)

from lm_helpers import TINY_MODEL  # noqa: F401  (tiny_trainer's model sizes)
from test_train import tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_FLAGS = ["--seq-len", "8", "--batch-size", "4", "--eval-batches", "1", "--d-model", "16", "--heads", "2",
              "--d-ff", "32", "--n-layers", "1", "--mem-len", "4"]


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    from lm_helpers import sample_text

    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(sample_text(20_000), encoding="utf-8")
    return path


def poison_logits(trainer, steps):
    """From now on, the logits of the training forwards at the given (1-based) step numbers are NaN."""
    def hook(module, inputs, output):
        if module.training and trainer.step + 1 in steps:
            return output._replace(logits=output.logits * float("nan"))
        return output

    return trainer.model.register_forward_hook(hook)


def parameters_of(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_nonfinite_steps_are_skipped_then_the_run_stops_keeping_the_good_checkpoint(text_path, tmp_path):
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=20, checkpoint_interval=1, max_bad_steps=3)
    trainer.config.steps = 2
    trainer.run(progress=False)
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    before = parameters_of(trainer)
    optimizer_steps = trainer.scheduler.last_epoch
    trainer.config.steps = 20
    poison_logits(trainer, range(3, 100))
    with pytest.raises(TrainingDiverged, match="3 consecutive steps .* non-finite .* --max-bad-steps"):
        trainer.run(progress=False)
    assert trainer.history["skipped"] == [3, 4, 5]
    assert trainer.scheduler.last_epoch == optimizer_steps
    for name, value in parameters_of(trainer).items():
        assert torch.equal(value, before[name]), name
    # checkpoints written during the streak hold the last good weights
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 4 and good["step"] == 2
    for name, value in good["model"].items():
        assert torch.equal(kept["model"][name], value), name


def test_a_transient_nonfinite_step_is_skipped_and_training_goes_on(text_path, tmp_path):
    trainer = tiny_trainer("switch", text_path, tmp_path, steps=6, eval_interval=3, max_bad_steps=2)
    poison_logits(trainer, {2, 4})
    history = trainer.run(progress=False)
    assert history["skipped"] == [2, 4]
    assert len(history["train"]) == 6 and math.isnan(history["train"][1])
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_checkpoint(tmp_path / "checkpoint.pt")["history"]["skipped"] == [2, 4]


def test_a_checkpoint_is_never_written_from_nonfinite_weights(text_path, tmp_path):
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=1, checkpoint_interval=1)
    trainer.run(progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    assert trainer.save() is None
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_best_checkpoint_holds_the_lowest_validation_loss(text_path, tmp_path):
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=6, eval_interval=2)
    history = trainer.run(progress=False)
    best_step, best_loss = min(history["valid"], key=lambda entry: entry[1])
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == best_step and best["history"]["valid"][-1][1] == best_loss
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6


def test_atomic_save_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(train_module.os, "fsync", record)
    atomic_save({"x": 1}, tmp_path / "a.pt")
    assert synced == [False, True]


def test_loss_curve_is_written_atomically(text_path, tmp_path, monkeypatch):
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=2, eval_interval=1)
    trainer.run(progress=False)
    before = (tmp_path / "loss.png").read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(train_module.os, "replace", crash)
    trainer.history["valid"].append((3, 1.0))
    with pytest.raises(OSError, match="disk full"):
        trainer.write_loss_curve()
    assert (tmp_path / "loss.png").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_loss_curve_skips_nonfinite_losses(text_path, tmp_path):
    trainer = tiny_trainer("xl", text_path, tmp_path)
    trainer.history = {"train": [2.0, float("nan"), 1.5, float("nan")], "valid": [(2, 1.8), (4, float("nan"))],
                       "skipped": [2, 4]}
    assert trainer.write_loss_curve().read_bytes()[:4] == b"\x89PNG"


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_bad_out_is_reported_before_the_first_step(where, text_path, tmp_path, capsys, monkeypatch):
    regular = tmp_path / "file"
    regular.write_text("x")
    out = regular / "run" if where == "under_a_file" else regular
    monkeypatch.setattr(train_module.Trainer, "train_step", lambda self: pytest.fail("a step ran"))
    assert main(["train", "xl", "--data", str(text_path), "--out", str(out), *TINY_FLAGS]) == 2
    one_line_error(capsys, "--out", str(out))
    with pytest.raises(OutputDirError):
        tiny_trainer("xl", text_path, out)


def test_unwritable_out_is_reported(tmp_path, monkeypatch):
    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(train_module.Path, "write_bytes", refuse)
    with pytest.raises(OutputDirError, match="cannot write files in it"):
        train_module.prepare_output_dir(tmp_path / "run")


def test_a_second_run_on_the_same_out_is_refused(text_path, tmp_path, capsys):
    lock_file = tmp_path / train_module.LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"12345")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
        assert main(["train", "xl", "--data", str(text_path), "--out", str(tmp_path), "--steps", "1",
                     *TINY_FLAGS]) == 2
        one_line_error(capsys, "in use by another training run", "12345")
    finally:
        os.close(fd)
    with OutputLock(tmp_path), OutputLock(tmp_path):  # free again, and re-entrant in one process
        pass
    assert main(["train", "xl", "--data", str(text_path), "--out", str(tmp_path), "--steps", "1",
                 *TINY_FLAGS]) == 0


@pytest.mark.parametrize("key", train_module.CHECKPOINT_KEYS)
def test_load_checkpoint_names_a_missing_key(key, text_path, tmp_path):
    tiny_trainer("xl", text_path, tmp_path, steps=1, checkpoint_interval=1).run(progress=False)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del payload[key]
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match=f"lacks the key '{key}'"):
        load_checkpoint(tmp_path / "damaged.pt")


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "CKPT", "--tokens", "-3"], "--tokens"),
    (["generate", "CKPT", "--tokens", "0"], "--tokens"),
    (["generate", "CKPT", "--temperature", "nan"], "--temperature"),
    (["generate", "CKPT", "--temperature", "-1"], "--temperature"),
    (["generate", "CKPT", "--temperature", "inf"], "--temperature"),
    (["generate", "CKPT", "--top-k", "-1"], "--top-k"),
    (["generate", "CKPT", "--threads", "0"], "--threads"),
    (["generate", "CKPT", "--prompt", ""], "--prompt"),
    (["generate", "CKPT", "--tokens", "many"], "--tokens"),
    (["train", "xl", "--steps", "0"], "steps"),
    (["train", "xl", "--lr", "nan"], "--lr"),
    (["train", "xl", "--lr", "-1"], "lr"),
    (["train", "xl", "--grad-clip", "0"], "grad_clip"),
    (["train", "xl", "--max-bad-steps", "0"], "max_bad_steps"),
    (["train", "xl", "--d-model", "30", "--heads", "4"], "d_model"),
    (["train", "xl", "--dropout", "1.5"], "--dropout"),
    (["train", "xl", "--time-limit", "0"], "--time-limit"),
    (["train", "xl", "--threads", "-2"], "--threads"),
    (["train", "nope"], "invalid choice"),
    (["bench", "--min-time", "-1"], "--min-time"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, fragment, tmp_path, capsys):
    argv = [str(tmp_path / "missing.pt") if a == "CKPT" else a for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run"), "--data", str(tmp_path / "missing.txt")]
    assert main(argv) == 2
    one_line_error(capsys, fragment)
    assert not (tmp_path / "run").exists()


def test_generate_api_refuses_bad_sampling_arguments(tmp_path):
    from fastformers.generate import generate, sample_next

    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 3), float("nan"), 0)
    with pytest.raises(ValueError, match="tokens"):
        next(generate(tmp_path / "missing.pt", "a", -3))
