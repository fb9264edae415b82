"""Training: the loss falls, resume is exact, checkpoints are atomic and corruption is reported; precision,
device, metrics, TensorBoard, progress bar and loss curve."""
import io
import math
import os
import sys

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
                                                          "loss.png", "metrics.jsonl"]
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


# --- precision, device, metrics, TensorBoard, progress bar, loss curve ---------------------------------------

def read_metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", MODELS)
def test_bf16_autocast_trains_and_resume_keeps_precision_and_device(model, text_path, tmp_path):
    trainer = tiny_trainer(model, text_path, tmp_path, steps=2, eval_interval=2, precision="bf16")
    history = trainer.run(progress=False)
    assert all(math.isfinite(loss) for loss in history["train"]) and math.isfinite(history["valid"][-1][1])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]
    assert (saved["precision"], saved["device"]) == ("bf16", "cpu")
    resumed = Trainer.resume(tmp_path / "checkpoint.pt", log=lambda line: None)
    assert (resumed.config.precision, resumed.config.device) == ("bf16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        Trainer.resume(tmp_path / "checkpoint.pt", log=lambda line: None, precision="fp32")


def test_bf16_forward_runs_under_autocast(text_path, tmp_path, monkeypatch):
    seen = []
    trainer = tiny_trainer("xl", text_path, tmp_path, precision="bf16")
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward",
                        lambda *args: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                                  else None) or forward(*args))
    trainer.train_step()
    trainer.evaluate()
    assert seen[0] == torch.bfloat16 and seen[-1] == torch.bfloat16
    fp32 = tiny_trainer("xl", text_path, tmp_path / "fp32")
    monkeypatch.setattr(fp32.model, "forward", lambda *args: seen.append(torch.is_autocast_enabled("cpu"))
                        or forward(*args))
    fp32.train_step()
    assert seen[-1] is False


def test_bad_precision_and_device_are_rejected():
    with pytest.raises(ValueError, match="precision"):
        default_train_config("xl", precision="fp8")
    with pytest.raises(ValueError, match="device"):
        default_train_config("xl", device="tpu")
    with pytest.raises(ValueError, match="log_interval"):
        default_train_config("xl", log_interval=0)


def test_metrics_jsonl_every_log_step_and_resume_appends(text_path, tmp_path):
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=4, log_interval=2, eval_interval=3, checkpoint_interval=3)
    trainer.run(progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 3, 4]
    assert ["valid_loss" in r for r in records] == [False, True, True]
    for r in records:
        assert set(r) >= {"step", "tokens", "train_loss", "lr", "tokens_per_s", "elapsed_s"}
        assert r["tokens"] == r["step"] * 8 * 4 and r["tokens_per_s"] > 0 and r["lr"] > 0
    assert records[0]["train_loss"] == pytest.approx(sum(trainer.history["train"][:2]) / 2)
    assert records[-1]["elapsed_s"] >= records[0]["elapsed_s"] > 0
    # the checkpoint is at step 4: resuming appends after the records up to it
    resumed = Trainer.resume(tmp_path / "checkpoint.pt", log=lambda line: None, steps=6)
    resumed.run(progress=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3, 4, 6]
    assert read_metrics(tmp_path)[-1]["elapsed_s"] > records[-1]["elapsed_s"]


def test_resume_drops_the_metrics_past_the_checkpoint(text_path, tmp_path):
    tiny_trainer("xl", text_path, tmp_path, steps=4, log_interval=1, checkpoint_interval=2).run(progress=False)
    # as if the run had died writing step 5's record, its last checkpoint at step 2
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "tok')
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=4, log_interval=1)
    trainer.step = 2
    report = train_module.RunReport(trainer, progress=False, deadline=math.inf)
    report.__exit__(None, None, None)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_scalars(text_path, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_trainer("xl", text_path, tmp_path, steps=4, log_interval=2, eval_interval=4,
                 tensorboard=True).run(progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train_loss", "valid_loss", "lr", "tokens_per_s"}
    assert [event.step for event in events.Scalars("train_loss")] == [2, 4]
    assert [event.step for event in events.Scalars("valid_loss")] == [4]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(text_path, tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    lines = []
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=3, eval_interval=2)
    trainer.log = lines.append
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    trainer.run(progress=True)
    shown = terminal.getvalue()
    assert "3/3" in shown and "tok/s" in shown and "left" in shown and "loss" in shown
    assert any(line.startswith("step 2: train loss") for line in lines)  # log lines still reach the log
    assert trainer.log == lines.append  # restored after the run

    not_a_terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", not_a_terminal)
    tiny_trainer("xl", text_path, tmp_path / "b", steps=2).run(progress=True)
    assert not_a_terminal.getvalue() == ""


def test_loss_curve_is_drawn_by_matplotlib(text_path, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    tiny_trainer("xl", text_path, tmp_path, steps=4, eval_interval=2).run(progress=False)
    pixels = image.imread(tmp_path / "loss.png")
    assert pixels.shape[:2] == (400, 640)


def test_without_matplotlib_the_run_says_why_there_is_no_curve(text_path, tmp_path, monkeypatch):
    lines = []
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=2, eval_interval=2)
    trainer.log = lines.append
    monkeypatch.setattr(train_module.plot, "available", lambda: False)
    trainer.run(progress=False)
    assert not (tmp_path / "loss.png").exists()
    assert any("matplotlib is not installed" in line and "fastformers[train]" in line for line in lines)


def test_without_tqdm_a_terminal_run_says_why_there_is_no_bar(text_path, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tqdm)
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    lines = []
    trainer = tiny_trainer("xl", text_path, tmp_path, steps=1)
    trainer.log = lines.append
    trainer.run(progress=True)
    assert any("tqdm is not installed" in line for line in lines) and sys.stderr.getvalue() == ""
