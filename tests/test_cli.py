"""The command line: help text for every flag, --precision/--device/--tensorboard/--preset of
``fastformers train`` and ``fastformers bench recipes``."""
import argparse
import builtins
import dataclasses
from typing import Optional

import pytest
import torch

from fastformers import cli, recipes
from fastformers.cli import field_docs, main
from fastformers.models import ModelConfig
from fastformers.train import TrainConfig, load_checkpoint

from lm_helpers import sample_text

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--seq-len", "8", "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1", "--d-model", "16",
        "--heads", "2", "--d-ff", "32", "--n-layers", "1", "--mem-len", "4", "--optimizer", "adamw", "--lr", "3e-3",
        "--warmup", "1"]


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(sample_text(20_000), encoding="utf-8")
    return path


def subcommands(parser: argparse.ArgumentParser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices.items()


@pytest.mark.parametrize("command", ["bench", "train", "generate"])
def test_every_flag_of_every_subcommand_has_help(command):
    parser = dict(subcommands(cli._parser()))[command]
    undocumented = [action.dest for action in parser._actions
                    if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert undocumented == []


def test_dataclass_flags_take_the_fields_documentation():
    for cls in (TrainConfig, ModelConfig):
        docs = field_docs(cls)
        assert set(docs) == {field.name for field in dataclasses.fields(cls)}
        assert all(docs.values()), [name for name, doc in docs.items() if not doc]
    assert field_docs(TrainConfig)["time_limit"].startswith("stop")  # a comment at the end of the line

    @dataclasses.dataclass
    class Example:
        # above, line one
        # line two
        first: int = 1
        second: Optional[str] = None  # after it
        third: int = 3
    assert field_docs(Example) == {"first": "above, line one line two", "second": "after it", "third": ""}


def test_precision_and_device_flags(text_path, tmp_path, capsys):
    assert main(["train", "xl", "--data", str(text_path), "--out", str(tmp_path), "--steps", "2", "--precision", "bf16",
                 "--device", "cpu", *TINY]) == 0
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]
    assert (saved["precision"], saved["device"]) == ("bf16", "cpu")
    assert "on cpu in bf16" in capsys.readouterr().out
    # resume keeps them; another precision is refused
    assert main(["train", "xl", "--resume", "--out", str(tmp_path), "--steps", "3"]) == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]["precision"] == "bf16"
    assert main(["train", "xl", "--resume", "--out", str(tmp_path), "--precision", "fp32"]) == 1
    assert "cannot change ['precision']" in capsys.readouterr().err
    assert main(["train", "xl", "--precision", "fp16"]) == 2
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "xl", "--device", "cuda", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--device cuda: no CUDA GPU" in error
    assert not (tmp_path / "checkpoint.pt").exists()


def test_tensorboard_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("TensorBoard logging requires TensorBoard version 1.15 or above")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    assert main(["train", "xl", "--tensorboard", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "fastformers train: --tensorboard needs the tensorboard package: pip install tensorboard"


def test_tensorboard_flag_writes_events(text_path, tmp_path):
    pytest.importorskip("tensorboard")
    assert main(["train", "xl", "--data", str(text_path), "--out", str(tmp_path), "--steps", "2", "--tensorboard",
                 "--log-interval", "1", *TINY]) == 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_preset_applies_before_explicit_flags(text_path, tmp_path, capsys):
    assert main(["train", "xl", "--data", str(text_path), "--out", str(tmp_path), "--steps", "1",
                 "--preset", "cpu", "--seq-len", "8", "--d-model", "16", "--batch-size", "2",
                 "--eval-batches", "1"]) == 0
    chosen = recipes.recipe("xl", "cpu")
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["train_config"]["preset"] == "cpu"
    assert (saved["train_config"]["seq_len"], saved["train_config"]["batch_size"]) == (8, 2)
    assert saved["train_config"]["lr"] == chosen.train["lr"]
    assert (saved["model_config"]["d_model"], saved["model_config"]["n_layers"]) == (16, chosen.model["n_layers"])
    assert main(["train", "xl", "--resume", "--out", str(tmp_path), "--preset", "cpu"]) == 2
    assert "drop --preset" in capsys.readouterr().err


def test_preset_choices_are_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--preset {{{','.join(recipes.PRESETS)}}}" in help_text


def test_bench_recipes_calls_the_report(monkeypatch, capsys):
    from fastformers.benchmarks import recipes as bench_recipes

    calls = []
    monkeypatch.setattr(bench_recipes, "recipes_report", lambda *args: calls.append(args) or "REPORT")
    assert main(["bench", "recipes", "--threads", "1", "--time-limit", "7", "--data", "text.txt"]) == 0
    assert calls == [(("xl", "compressive", "feedback", "switch"), 1, 7.0, "text.txt")]
    assert "REPORT" in capsys.readouterr().out
