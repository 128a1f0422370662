import pytest
import torch

from reference_mlstm import mlstm_reference, rel_err
from vil.mlstm import mlstm, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent

FORMS = {
    "parallel": mlstm_parallel,
    "chunkwise": mlstm_chunkwise,
    "chunkwise_odd_chunk": lambda *a: mlstm_chunkwise(*a, chunk_size=50),
    "chunkwise_tiny_chunk": lambda *a: mlstm_chunkwise(*a, chunk_size=7),
    "recurrent": mlstm_recurrent,
}


def make_inputs(B, NH, S, DH, gate_scale, dtype=torch.float64, uniform=True):
    qkv = [torch.randn(B, NH, S, DH, dtype=dtype) for _ in range(3)]
    if uniform:  # gate pre-activations uniform in [-gate_scale, gate_scale]
        gates = [(torch.rand(B, NH, S, dtype=dtype) * 2 - 1) * gate_scale for _ in range(2)]
    else:
        gates = [torch.randn(B, NH, S, dtype=dtype) * gate_scale for _ in range(2)]
    return [t.requires_grad_() for t in qkv + gates]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("S, gate_scale", [(1, 10.0), (37, 30.0), (196, 5.0), (1024, 30.0)])
def test_forms_match_float64_reference(form, S, gate_scale):
    if form == "recurrent" and S == 1024:
        S = 300  # the step-by-step form is slow in Python; the long case is covered by the others
    inputs = make_inputs(2, 2, S, 8, gate_scale)
    ref = mlstm_reference(*inputs)
    out = FORMS[form](*inputs)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert rel_err(out, ref) < 1e-10
    for name, g, rg in zip("q k v igate fgate".split(), grads, ref_grads):
        assert rel_err(g, rg) < 1e-10, name


@pytest.mark.parametrize("form", FORMS)
def test_forms_float32(form):
    inputs = make_inputs(2, 4, 196, 16, 3.0, uniform=False)
    ref = mlstm_reference(*inputs)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out = FORMS[form](*inputs32)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4
    for name, g, rg in zip("q k v igate fgate".split(), torch.autograd.grad(out, inputs32, grad_out.float()), ref_grads):
        assert rel_err(g, rg) < 1e-4, name


def test_forms_agree_with_each_other_on_long_sequences():
    inputs = [t.detach() for t in make_inputs(1, 2, 1500, 8, 30.0)]
    par, chunk = mlstm_parallel(*inputs), mlstm_chunkwise(*inputs, chunk_size=64)
    assert rel_err(chunk, par) < 1e-12


def test_bfloat16_inputs_run_in_float32_and_return_bfloat16():
    inputs = [t.detach() for t in make_inputs(1, 2, 50, 16, 3.0)]
    ref = mlstm_reference(*inputs)
    out = mlstm_chunkwise(*[t.bfloat16() for t in inputs], chunk_size=16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


def test_unknown_form_is_a_clear_error():
    inputs = [t.detach() for t in make_inputs(1, 1, 4, 4, 1.0)]
    with pytest.raises(ValueError, match="unknown mlstm form 'fast'"):
        mlstm(*inputs, form="fast")


def test_auto_form_uses_pytorch_on_cpu():
    inputs = [t.detach() for t in make_inputs(1, 2, 20, 8, 3.0)]
    assert rel_err(mlstm(*inputs, form="auto"), mlstm_reference(*inputs)) < 1e-10
