"""The q/k block-projection kernels against float64 dense matmuls with block-diagonal weights.

Without a GPU they run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1): token
counts that are not a multiple of the token tile, widths whose channel tile is 16 or 64, gate widths that
are not a power of two, with and without biases, and the layer's packed projections against its dense path.
"""
import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from reference_mlstm import rel_err  # noqa: E402
from vil.kernels.packed_qk_triton import packed_qk_triton  # noqa: E402
from vil.vision_lstm import MLSTMLayer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, wq, bq, wk, bk, wg, bg):
    x, wq, wk, wg = (t.double() for t in (x, wq, wk, wg))
    parts = [x @ torch.block_diag(*wq.unbind(0)).T, x @ torch.block_diag(*wk.unbind(0)).T, x @ wg.T]
    return torch.cat([p if b is None else p + b.double() for p, b in zip(parts, (bq, bk, bg))], dim=-1)


def check(M, C, G, S, dtype, bias, tol, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, M, C, generator=g).to(DEVICE, dtype).requires_grad_()
    wq, wk = (torch.randn(C // S, S, S, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    wg = torch.randn(G, C, generator=g).to(DEVICE).requires_grad_()
    bq, bk, bg = ((torch.randn(n, generator=g).to(DEVICE).requires_grad_() if bias else None) for n in (C, C, G))
    inputs = [t for t in (x, wq, bq, wk, bk, wg, bg) if t is not None]
    out = packed_qk_triton(x, wq, bq, wk, bk, wg, bg)
    ref = reference(x, wq, bq, wk, bk, wg, bg)
    assert out.shape == (2, M, 2 * C + G) and out.dtype == dtype
    dout = torch.randn(ref.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(out, inputs, dout.to(dtype))
    ref_grads = torch.autograd.grad(ref, inputs, dout.double())
    assert rel_err(out, ref) < tol
    names = ["x", "wq", "bq", "wk", "bk", "wg", "bg"] if bias else ["x", "wq", "wk", "wg"]
    for name, got, want, inp in zip(names, grads, ref_grads, inputs):
        assert got.dtype == inp.dtype, name
        assert rel_err(got, want) < tol, name


@pytest.mark.parametrize("M, C, G, S, dtype, bias, tol", [
    (37, 64, 16, 4, torch.float32, True, 1e-5),
    (37, 48, 5, 4, torch.float32, False, 1e-5),
    (300, 128, 64, 4, torch.float32, True, 1e-5),  # several backward tiles per program, two channel tiles
    (200, 128, 64, 4, torch.bfloat16, True, 1e-2),
    (21, 32, 16, 8, torch.float32, True, 1e-5),
])
def test_matches_reference(M, C, G, S, dtype, bias, tol):
    check(M, C, G, S, dtype, bias, tol)


def test_input_validation():
    x = torch.randn(2, 3, 32)
    w, wg = torch.randn(8, 4, 4), torch.randn(16, 32)
    with pytest.raises(ValueError, match="wq and wk must be"):
        packed_qk_triton(x, torch.randn(4, 4, 4), None, w, None, wg, None)
    with pytest.raises(ValueError, match="multiple of 16"):
        packed_qk_triton(torch.randn(2, 3, 24), torch.randn(6, 4, 4), None, torch.randn(6, 4, 4), None,
                         torch.randn(16, 24), None)
    with pytest.raises(ValueError, match=r"wg must have shape \(G, 32\)"):
        packed_qk_triton(x, w, None, w, None, torch.randn(16, 16), None)
    with pytest.raises(ValueError, match=r"bq must have shape \(32,\)"):
        packed_qk_triton(x, w, torch.randn(16), w, None, wg, None)


@pytest.mark.parametrize("proj_bias", [True, False])
def test_layer_packed_projections_equal_the_dense_path(proj_bias):
    # ViL-like layer (4 heads, 4 x 4 blocks), float32: the kernels against the dense matmuls in float64.
    torch.manual_seed(0)
    layer = MLSTMLayer(32, num_heads=4, proj_bias=proj_bias).to(DEVICE)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer64 = copy.deepcopy(layer).double()
    x, x_conv = torch.randn(2, 9, 32, device=DEVICE), torch.randn(2, 9, 64, device=DEVICE, requires_grad=True)
    x_conv64 = x_conv.detach().double().requires_grad_()
    got = layer._packed_projections(x, x_conv, fused_qk=True)[0]
    want = layer64._packed_projections(x.double(), x_conv64)[0]
    assert got.shape == want.shape and rel_err(got, want) < 1e-5
    dout = torch.randn(want.shape, device=DEVICE, dtype=torch.float64)
    grads = torch.autograd.grad(got, [x_conv, *layer.parameters()], dout.float(), allow_unused=True)
    ref_grads = torch.autograd.grad(want, [x_conv64, *layer64.parameters()], dout, allow_unused=True)
    names = ["x_conv"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None and b.norm() > 0:
            assert rel_err(a, b) < 1e-5, name


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M,C,G", [(256 * 196, 384, 16), (12 * 4096, 384, 16), (128 * 196, 1536, 64)],
                         ids=["vil-t-224", "vil-t-1024", "vil-b-224"])
def test_gpu_matches_reference(M, C, G, dtype, tol):
    check(M // 2, C, G, 4, dtype, True, tol)


@pytest.mark.gpu
@requires_cuda
def test_gpu_torch_compile_matches_eager():
    x = torch.randn(4, 196, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wq, wk = (torch.randn(96, 4, 4, device="cuda", requires_grad=True) for _ in range(2))
    wg = torch.randn(16, 384, device="cuda", requires_grad=True)
    b = torch.randn(384, device="cuda", requires_grad=True)
    fn = lambda t: packed_qk_triton(t * 2, wq, b, wk, b, wg, None).float().square().sum()  # noqa: E731
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        for t in (x, wq, wk, wg, b):
            t.grad = None
        f(x).backward()
        results.append([t.grad.clone() for t in (x, wq, wk, wg, b)])
    for eager, compiled in zip(*results):
        assert rel_err(compiled, eager.double()) < 1e-3
