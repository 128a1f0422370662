"""The fused depthwise-convolution + SiLU kernels against a float64 ``F.conv2d`` reference.

Without a GPU they run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small
grids that still cover the tile edges: token tiles crossing image boundaries, channel counts that are not
a multiple of the channel tile, kernels of 3 and 5, strided inputs.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from reference_mlstm import rel_err  # noqa: E402
from vil.kernels.dwconv_silu_triton import dwconv2d_silu_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, weight, bias, grid, dout):
    """Output and gradients of silu(conv2d) in float64 on the (B, C, H, W) image of the tokens."""
    x, weight = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bias = None if bias is None else bias.detach().double().requires_grad_()
    B, N, C = x.shape
    image = x.transpose(1, 2).reshape(B, C, *grid)
    out = F.silu(F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=C)).flatten(2).transpose(1, 2)
    out.backward(dout.double())
    return out, x.grad, weight.grad, None if bias is None else bias.grad


def check(B, grid, C, K, dtype, bias, tol, strided=False):
    H, W = grid
    x = torch.randn(B, H * W, C + 8 * strided, device=DEVICE, dtype=dtype)[..., :C].requires_grad_()
    weight = (torch.randn(C, 1, K, K, device=DEVICE) / K).requires_grad_()
    b = torch.randn(C, device=DEVICE).requires_grad_() if bias else None
    out = dwconv2d_silu_triton(x, weight, b, grid)
    dout = torch.randn_like(out)
    out.backward(dout)
    expected = reference(x, weight, b, grid, dout)
    assert out.dtype == dtype and out.shape == x.shape
    got = (out, x.grad, weight.grad, None if b is None else b.grad)
    for name, g, e in zip(("out", "dx", "dweight", "dbias"), got, expected):
        if e is not None:
            assert rel_err(g, e) < tol, f"{name}: {rel_err(g, e):.2e}"


@pytest.mark.parametrize(
    "B,grid,C,K,dtype,bias,tol",
    [
        (2, (5, 7), 40, 3, torch.float32, True, 1e-5),
        (3, (3, 4), 130, 5, torch.float32, False, 1e-5),  # two channel tiles, the second partial
        (2, (6, 5), 24, 3, torch.bfloat16, True, 1e-2),
        (3, (9, 7), 20, 3, torch.float32, True, 1e-5),  # input-gradient programs of several token tiles
    ],
)
def test_matches_reference(B, grid, C, K, dtype, bias, tol):
    check(B, grid, C, K, dtype, bias, tol)


def test_strided_input():
    check(2, (4, 3), 16, 3, torch.float32, True, 1e-5, strided=True)


def test_input_validation():
    x = torch.randn(2, 12, 8)
    with pytest.raises(ValueError, match="grid"):
        dwconv2d_silu_triton(x, torch.randn(8, 1, 3, 3), None, (3, 5))
    with pytest.raises(ValueError, match="K odd"):
        dwconv2d_silu_triton(x, torch.randn(8, 1, 2, 2), None, (3, 4))
    with pytest.raises(ValueError, match="depthwise"):
        dwconv2d_silu_triton(x, torch.randn(8, 2, 3, 3), None, (3, 4))
    with pytest.raises(ValueError, match="bias"):
        dwconv2d_silu_triton(x, torch.randn(8, 1, 3, 3), torch.randn(4), (3, 4))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,grid,C", [(16, (14, 14), 384), (2, (64, 64), 384), (8, (14, 14), 1536)],
                         ids=["vil-t-224", "vil-t-1024", "vil-b-224"])
def test_gpu_matches_reference(B, grid, C, dtype, tol):
    check(B, grid, C, 3, dtype, True, tol)


@pytest.mark.gpu
@requires_cuda
def test_gpu_torch_compile_matches_eager():
    x = torch.randn(4, 196, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    conv = torch.nn.Conv2d(384, 384, 3, padding=1, groups=384, device="cuda")
    fn = lambda t: dwconv2d_silu_triton(t * 2, conv.weight, conv.bias, (14, 14)).float().square().sum()  # noqa: E731
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        x.grad = conv.weight.grad = conv.bias.grad = None
        f(x).backward()
        results.append([t.grad.clone() for t in (x, conv.weight, conv.bias)])
    for eager, compiled in zip(*results):
        assert rel_err(compiled, eager.double()) < 1e-3
