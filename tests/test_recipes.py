"""Training recipes: presets, the labml preset reproducing the settings used before recipes, the
AdamW warm-up/cosine schedule, the relative-position count ``n_positions`` and the time-to-loss report."""
import dataclasses
import math

import pytest
import torch

import fastformers
from fastformers import recipes
from fastformers.models import MODEL_NAMES, ModelConfig, build_model, default_model_config
from fastformers.nn import FeedbackAttention, RelativeMultiHeadAttention
from fastformers.train import TrainConfig, Trainer, default_train_config, lr_factor, make_optimizer

from harness import assert_parity
from lm_helpers import SHARED_TEXT, TINY_MODEL, sample_text

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11
HAS_CPP = "cpp" in fastformers.available_backends()
FUSED = ["cpp", "triton"] if HAS_CPP else ["triton"]
# What `fastformers train MODEL` ran with before recipes existed (labml_nn 0.5.1's experiments).
LABML_TRAIN = {
    "xl": dict(seq_len=2, batch_size=32, optimizer="noam", lr=1.0),
    "compressive": dict(seq_len=8, batch_size=32, optimizer="adamw", lr=2.5e-4),
    "feedback": dict(seq_len=128, batch_size=64, optimizer="noam", lr=1.0),
    "switch": dict(seq_len=64, batch_size=32, optimizer="noam", lr=1.0),
}


def test_presets_and_unknown_names():
    assert recipes.PRESETS[0] == recipes.DEFAULT_PRESET == "cpu" and "labml" in recipes.PRESETS
    with pytest.raises(ValueError, match="model must be one of .*'gpt'"):
        recipes.recipe("gpt", "cpu")
    with pytest.raises(ValueError, match="preset must be one of .*'fast'"):
        recipes.recipe("xl", "fast")
    with pytest.raises(ValueError, match="preset must be one of"):
        default_train_config("xl", preset="fast")


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_preset_sets_the_same_fields(model):
    # so that layering one preset's values over another's never keeps a value of the other
    first, *others = (recipes.recipe(model, preset) for preset in recipes.PRESETS)
    for other in others:
        assert set(other.train) == set(first.train) and set(other.model) == set(first.model)
    for preset in recipes.PRESETS:
        built = recipes.recipe(model, preset)
        assert set(built.train) <= {f.name for f in dataclasses.fields(TrainConfig)}
        assert set(built.model) <= {f.name for f in dataclasses.fields(ModelConfig)}
        built.train["lr"] = -1.0  # a copy: the next recipe is unchanged
        assert recipes.recipe(model, preset).train["lr"] > 0


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_labml_preset_is_the_previous_default_exactly(model):
    assert default_train_config(model, preset="labml") == TrainConfig(model=model, **LABML_TRAIN[model])
    assert (default_model_config(model, V, **recipes.recipe(model, "labml").model)
            == default_model_config(model, V))


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_labml_preset_keeps_labml_state_dict(model):
    labml = pytest.importorskip("labml_nn") and fastformers.models.labml_modules()
    config = default_model_config(model, V, **{**recipes.recipe(model, "labml").model, "n_layers": 1})
    ours, theirs = build_model(config).state_dict(), build_model(config, labml).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_default_preset_is_cpu_and_explicit_values_win():
    config = default_train_config("xl", lr=1e-3, preset=None)
    assert config.preset == "cpu" and config.optimizer == "adamw" and config.lr == 1e-3
    assert config.decay_steps == recipes.recipe("xl").train["decay_steps"]


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_cpu_recipe_positions_cover_the_lengths_it_trains(model):
    train, settings = recipes.recipe(model).train, recipes.recipe(model).model
    config = default_model_config(model, V, **settings)
    if model == "switch":
        assert config.position_embeddings == train["seq_len"]
        return
    keys = {"xl": config.mem_len + train["seq_len"],
            "compressive": config.c_mem_len + config.mem_len + train["seq_len"],
            "feedback": train["seq_len"]}[model]
    assert keys <= config.n_positions < 4 * keys


def test_trainer_builds_the_preset_model(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    settings = dict(data=str(text), out=str(tmp_path / "run"), seq_len=8, batch_size=4, eval_batches=2)
    cpu = Trainer.start(default_train_config("xl", **settings), log=lambda line: None, n_layers=1)
    assert cpu.model_config.n_positions == recipes.recipe("xl").model["n_positions"]
    assert cpu.model_config.n_layers == 1  # explicit values win over the recipe's
    labml = Trainer.start(default_train_config("xl", preset="labml", **settings), log=lambda line: None)
    assert labml.model_config == default_model_config("xl", len(labml.corpus.vocab))
    # a recipe step trains
    losses = [cpu.train_step() for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)


def factors(config, steps):
    factor = lr_factor(config, d_model=128)
    return [factor(done) for done in range(steps)]


def test_adamw_without_decay_is_the_labml_warmup():
    config = TrainConfig(model="compressive", optimizer="adamw", lr=2.5e-4, warmup=10)
    assert factors(config, 30) == [min(1.0, (done + 1) / 10) for done in range(30)]


def test_warmup_then_cosine_decay_to_min_lr():
    config = TrainConfig(model="xl", optimizer="adamw", lr=1e-3, warmup=10, decay_steps=110, min_lr_ratio=0.1)
    values = factors(config, 200)
    assert values[:10] == pytest.approx([(done + 1) / 10 for done in range(10)])
    assert values[9] == 1.0
    decay = values[9:110]
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:]))
    assert values[59] == pytest.approx(0.55)  # half way: the mean of 1 and min_lr_ratio
    assert values[109:] == pytest.approx([0.1] * 91)
    # noam keeps its own schedule (a recipe's decay does not stop `--optimizer noam`)
    noam = dataclasses.replace(config, optimizer="noam", lr=1.0)
    assert factors(noam, 200) == factors(TrainConfig(model="xl", optimizer="noam", warmup=10), 200)


def test_bad_schedule_settings_name_the_field():
    with pytest.raises(ValueError, match="decay_steps must be larger than warmup"):
        TrainConfig(model="xl", optimizer="adamw", warmup=100, decay_steps=100)
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        TrainConfig(model="xl", optimizer="adamw", min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="beta2 must be in"):
        TrainConfig(model="xl", beta2=1.0)


def test_adamw_decays_matrices_only_and_keeps_one_group_without_decay():
    model = build_model(default_model_config("xl", V, **TINY_MODEL))
    config = TrainConfig(model="xl", optimizer="adamw", lr=1e-3, weight_decay=0.1, beta1=0.8, beta2=0.95)
    optimizer, _ = make_optimizer(config, model, 16)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0 and decayed["betas"] == (0.8, 0.95)
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    optimizer, _ = make_optimizer(dataclasses.replace(config, weight_decay=0.0), model, 16)
    assert len(optimizer.param_groups) == 1


# The positional-table size: labml's by default, a small one works on every backend and refuses
# lengths beyond it.

def test_default_positions_are_labml():
    assert RelativeMultiHeadAttention(2, 8).key_pos_embeddings.shape == (2 * 4096, 2, 4)
    assert FeedbackAttention(2, 8).key_pos_embeddings.shape == (4096, 2, 4)
    assert ModelConfig(model="xl", n_tokens=V).n_positions == 4096


def test_bad_positions_are_a_clear_error():
    with pytest.raises(ValueError, match="n_positions must be at least 1"):
        RelativeMultiHeadAttention(2, 8, n_positions=0)
    with pytest.raises(TypeError, match="n_positions must be an int"):
        FeedbackAttention(2, 8, n_positions=4.0)
    with pytest.raises(ValueError, match="n_positions must be at least 1"):
        ModelConfig(model="xl", n_tokens=V, n_positions=0)


@pytest.mark.parametrize("backend", FUSED)
def test_small_positions_fused_matches_reference(backend):
    torch.manual_seed(0)
    P, L, M, B = 12, 5, 7, 2
    attention = RelativeMultiHeadAttention(2, 8, 0.0, n_positions=P).double()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0, 0.5)
    assert attention.key_pos_embeddings.shape == (2 * P, 2, 4)
    x = torch.randn(M + L, B, 8, dtype=torch.double)
    mask = torch.cat((torch.ones(L, M, dtype=torch.bool), torch.ones(L, L, dtype=torch.bool).tril()), 1)[..., None]

    def run(chosen):
        def call(keys):
            attention.backend = chosen
            return attention(query=keys[M:], key=keys, value=keys, mask=mask)
        return call

    assert_parity(run(backend), run("reference"), [x.requires_grad_()])


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_lengths_beyond_positions_are_refused(backend):
    attention = RelativeMultiHeadAttention(2, 8, 0.0, n_positions=6)
    attention.backend = backend
    x = torch.randn(7, 1, 8)
    with pytest.raises(ValueError, match="at most P=6"):
        attention(query=x, key=x, value=x)


@pytest.mark.parametrize("model", ["xl", "compressive", "feedback"])
@pytest.mark.parametrize("backend", FUSED)
def test_small_positions_model_fused_matches_reference(model, backend):
    torch.manual_seed(0)
    config = default_model_config(model, V, **{**TINY_MODEL, "n_positions": 24})
    lm = build_model(config).double()
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.normal_(0, 0.3)
    x = torch.randint(0, V, (8, 2))
    with fastformers.use_backend("reference"):
        expected = lm(x).logits
    with fastformers.use_backend(backend):
        torch.testing.assert_close(lm(x).logits, expected, rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match="P=24"):
            lm(torch.randint(0, V, (26, 2)))


@pytest.mark.skipif(not SHARED_TEXT.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_recipes_report_with_a_tiny_time_limit():
    from fastformers.benchmarks.recipes import recipes_report

    threads = torch.get_num_threads()
    report = recipes_report(["switch"], threads=1, time_limit_s=0.01, data_path=str(SHARED_TEXT))
    assert torch.get_num_threads() == threads
    assert "| switch |" in report and "not reached" in report and "1 thread" in report
    with pytest.raises(ValueError, match="threads must be a positive int"):
        recipes_report(["switch"], threads=0, time_limit_s=1.0)
    with pytest.raises(ValueError, match="time_limit_s must be"):
        recipes_report(["switch"], threads=1, time_limit_s=0.0)


def test_switch_position_embeddings_cache_and_window():
    torch.manual_seed(0)
    config = default_model_config("switch", V, **{**TINY_MODEL, "position_embeddings": 6, "drop_tokens": False})
    lm = build_model(config).double().eval()
    with torch.no_grad():
        lm.position_embed.weight.normal_(0, 1.0)
    assert "position_embed.weight" in lm.state_dict()
    x = torch.randint(0, V, (9, 2))
    with pytest.raises(ValueError, match="position embeddings for 6 positions, got a sequence of 9"):
        lm(x)
    # cached steps equal the full forward while the sequence fits ...
    logits, state = lm.step(x[:4])
    more, state = lm.step(x[4:6], state)
    torch.testing.assert_close(torch.cat((logits, more)), lm(x[:6]).logits)
    # ... and past the last position, the window of the last 6 tokens
    for t in range(6, 9):
        last, state = lm.step(x[t:t + 1], state)
        torch.testing.assert_close(last[-1], lm(x[t - 5:t + 1]).logits[-1])
    assert last.shape == (1, 2, V)


def test_switch_without_position_embeddings_is_labml():
    assert ModelConfig(model="switch", n_tokens=V).position_embeddings == 0
    lm = build_model(default_model_config("switch", V, **TINY_MODEL))
    assert lm.position_embed is None and not any("position" in key for key in lm.state_dict())
