"""Whole models on the suite's device: labml_nn's model against the same model
after ``fastformers.convert`` (training forward + backward: logits, loss and
every parameter gradient) against a float64 copy of labml_nn's, in float32
(IEEE and TF32) and under bf16 / fp16 autocast; and every module's backend,
which must be fused on CUDA or say why (``fastformers.explain``) and warn."""
import copy
import warnings

import pytest
import torch

pytest.importorskip("labml_nn")

import fastformers  # noqa: E402
from cuda_check import BACKEND, DEVICE, DRY_RUN, PRECISIONS, ERROR_FACTOR, Precision  # noqa: E402
from fastformers.explain import format_plans  # noqa: E402
from fastformers.models import build_model, default_model_config, labml_modules  # noqa: E402
from fastformers.train import cross_entropy  # noqa: E402

VOCAB = 65
# (seq, batch, config overrides): labml's experiment sizes, smaller where the
# GPU suite would otherwise spend its minutes on one model.
SIZES = {
    "xl": (32, 8, dict(mem_len=32)),
    "compressive": (8, 16, dict(mem_len=8, c_mem_len=32, compression_rate=2)),
    "feedback": (32, 8, dict(d_model=256, heads=4, d_ff=512, n_layers=3)),
    "switch": (64, 16, dict()),
}
DRY_SIZES = {"xl": (4, 2, dict(mem_len=4, d_model=32, heads=2, d_ff=64, n_layers=2))}


def build(name, dropout=0.0):
    """labml_nn's model and its converted copy (forced onto the suite's backend), same seeded weights."""
    seq, batch, overrides = (DRY_SIZES if DRY_RUN else SIZES)[name]
    torch.manual_seed(0)
    labml = build_model(default_model_config(name, VOCAB, **{**overrides, "dropout": dropout}), labml_modules())
    fused = fastformers.convert(copy.deepcopy(labml), backend=BACKEND)
    tokens = torch.randint(0, VOCAB, (seq + 1, batch), generator=torch.Generator().manual_seed(1))
    return labml.to(DEVICE), fused.to(DEVICE), tokens.to(DEVICE)


def training_step(model, tokens, precision: Precision):
    """Logits, loss and every parameter gradient (by name) of one training
    forward+backward, the memory pre-filled by a first step as in training."""
    low = precision.dtype in (torch.bfloat16, torch.float16)
    model.train()
    with precision.active(), torch.autocast(DEVICE, dtype=precision.dtype, enabled=low):
        torch.manual_seed(2)  # Switch's labml drop policy draws permutations
        memory = model(tokens[:-1], None).memory
        torch.manual_seed(3)
        output = model(tokens[:-1], memory)
        loss = cross_entropy(output.logits, tokens[1:])
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
    model.zero_grad(set_to_none=True)
    loss.backward()
    values = {"logits": output.logits.detach(), "loss": loss.detach()}
    values.update({f"grad {name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    return values


MODEL_CASES = [pytest.param(name, precision, id=f"{name}-{precision.name}",
                            marks=[pytest.mark.dry] if name in DRY_SIZES and precision is PRECISIONS[0] else [])
               for name in SIZES for precision in PRECISIONS]


@pytest.mark.parametrize("name, precision", MODEL_CASES)
def test_model_training_step_matches_labml(name, precision):
    if DRY_RUN and name not in DRY_SIZES:
        pytest.skip("the dry run takes the Transformer-XL model")
    labml, fused, tokens = build(name)
    oracle = training_step(copy.deepcopy(labml).double(), tokens, Precision("float64", torch.float64))
    try:
        reference = training_step(labml, tokens, precision)
    except RuntimeError as error:
        # labml_nn's Switch fails under autocast (index_put of bf16 rows into a
        # float32 output): the bound is then the precision's floor alone.
        reference, why = None, f"labml_nn fails in {precision.name}: {error}"
    got = training_step(fused, tokens, precision)
    assert got.keys() == oracle.keys(), f"gradients differ in which parameters get one: {got.keys() ^ oracle.keys()}"
    failures = []
    for key, exact in oracle.items():
        fused_error = (got[key].double() - exact).abs().max().item()
        ref_error = 0.0 if reference is None else (reference[key].double() - exact).abs().max().item()
        scale = max(exact.abs().max().item(), 1.0)
        if not fused_error <= ERROR_FACTOR * ref_error + precision.floor * scale:
            failures.append(f"{key}: fused error {fused_error:.3g}, labml_nn's {ref_error:.3g} (scale {scale:.3g})")
    note = "" if reference is not None else f" ({why})"
    assert not failures, f"{name} ({precision.name}){note}:\n" + "\n".join(failures)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_fallbacks_warn_and_show_in_explain(name, dropout):
    """On CUDA every module runs fused, or explain() names it with a reason and
    its forward warned with a FallbackWarning."""
    _, fused, tokens = build(name, dropout)
    for module in fused.modules():
        if hasattr(module, "backend"):
            module.backend = None  # the automatic choice, as users get it
    plans = fastformers.explain(fused, torch.device(DEVICE), show=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused.train()
        fused(tokens[:-1], None)
    warned = " ".join(str(w.message) for w in caught if w.category.__name__ == "FallbackWarning")
    falling_back = [plan for plan in plans if plan.train_backend == "reference"]
    unexplained = [plan.path for plan in falling_back if not plan.why or plan.why == "fused"]
    silent = [plan.path for plan in falling_back if plan.cls not in warned]
    assert not unexplained, f"explain() gives no reason for the reference path of {unexplained}"
    assert not silent, f"{silent} run the reference on CUDA without a FallbackWarning; explain():\n" + format_plans(plans)
