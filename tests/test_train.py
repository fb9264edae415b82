"""Training: the loss falls, resume is exact, checkpoints are atomic and corruption is reported."""
import os

import pytest
import torch

from fastformers import train as train_module
from fastformers.cli import main
from fastformers.train import CheckpointError, Trainer, default_train_config, load_checkpoint

from lm_helpers import TINY_MODEL, sample_text

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ["xl", "compressive", "feedback", "switch"]


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(sample_text(20_000), encoding="utf-8")
    return path


def tiny_trainer(model, text_path, out, **overrides):
    settings = dict(data=str(text_path), out=str(out), seq_len=8, batch_size=4, optimizer="adamw", lr=3e-3,
                    warmup=1, eval_interval=1000, eval_batches=2, checkpoint_interval=1000)
    settings.update(overrides)
    model_overrides = {k: settings.pop(k) for k in list(settings) if k in TINY_MODEL or k in ("dropout", "kv")}
    return Trainer.start(default_train_config(model, **settings), log=lambda line: None,
                         **{**TINY_MODEL, **model_overrides})


@pytest.mark.parametrize("model, extra", [("xl", {}), ("compressive", {}), ("feedback", {}),
                                          ("feedback", {"kv": False}), ("switch", {})])
def test_a_few_steps_reduce_the_loss(model, extra, text_path, tmp_path):
    trainer = tiny_trainer(model, text_path, tmp_path, steps=30, batch_size=8, **extra)
    before = trainer.evaluate()
    history = trainer.run(progress=False)
    assert len(history["train"]) == 30
    after = history["valid"][-1][1]
    assert after < before - 0.3, (before, after)
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("model", MODELS)
def test_resume_continues_exactly(model, text_path, tmp_path):
    # Dropout and Switch's token dropping draw random numbers, so the RNG state must be restored too.
    overrides = dict(steps=3, checkpoint_interval=3, eval_interval=2, dropout=0.1)
    uninterrupted = tiny_trainer(model, text_path, tmp_path / "a", **overrides)
    uninterrupted.run(progress=False)
    expected = [uninterrupted.train_step() for _ in range(3)]
    resumed = Trainer.resume(tmp_path / "a" / "checkpoint.pt", log=lambda line: None)
    assert resumed.step == 3
    assert [resumed.train_step() for _ in range(3)] == expected
    for ours, theirs in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(ours, theirs)


def test_cli_train_then_resume(text_path, tmp_path, capsys):
    common = ["--data", str(text_path), "--out", str(tmp_path), "--seq-len", "8", "--batch-size", "4",
              "--eval-interval", "2", "--eval-batches", "1"]
    model = ["--d-model", "16", "--heads", "2", "--d-ff", "32", "--n-layers", "1", "--mem-len", "4"]
    assert main(["train", "xl", "--steps", "2", *common, *model]) == 0
    assert main(["train", "xl", "--resume", "--steps", "4", *common]) == 0
    output = capsys.readouterr().out
    assert "resuming" in output and "step 4: train loss" in output and "bits/char" in output
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert main(["train", "xl", "--resume", "--d-model", "32", *common]) == 2


def test_interrupted_save_leaves_the_previous_checkpoint(text_path, tmp_path, monkeypatch):
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=2, checkpoint_interval=2)
    trainer.run(progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    before = checkpoint.read_bytes()

    def crash_halfway(payload, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.torch, "save", crash_halfway)
    trainer.train_step()
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fastformers-train.lock", "best.pt", "checkpoint.pt",
                                                          "loss.png"]
    assert load_checkpoint(checkpoint)["step"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error_and_stays_untouched(damage, text_path, tmp_path, capsys):
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=1, checkpoint_interval=1)
    trainer.run(progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    good = checkpoint.read_bytes()
    damaged = {"truncate": good[: len(good) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    checkpoint.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(checkpoint)
    assert main(["train", "xl", "--resume", "--out", str(tmp_path)]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--tokens", "3"]) == 1
    assert checkpoint.read_bytes() == damaged


def test_not_a_checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastformers"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_noam_schedule_matches_labml():
    config = default_train_config("xl", preset="labml", warmup=10)
    factor = train_module.lr_factor(config, d_model=64)
    # labml's Noam: lr · d_model^-0.5 · min(t^-0.5, t · warmup^-1.5), t = 1, 2, ...
    for done, t in [(0, 1), (9, 10), (99, 100)]:
        assert factor(done) == pytest.approx(64 ** -0.5 * min(t ** -0.5, t * 10 ** -1.5))


def test_reference_backend_trains_the_same_model(text_path, tmp_path):
    fused = tiny_trainer("feedback", text_path, tmp_path / "f", steps=2)
    reference = tiny_trainer("feedback", text_path, tmp_path / "r", steps=2, backend="reference")
    losses_fused = [fused.train_step() for _ in range(2)]
    losses_reference = [reference.train_step() for _ in range(2)]
    assert losses_fused == pytest.approx(losses_reference, rel=1e-5)
    assert reference.model.transformer.last_backend == "reference"
