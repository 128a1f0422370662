import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

import vil
from reference_mlstm import rel_err
from vil.checkpoint import CheckpointError
from vil.layers import BlockDiagonalLinear, PatchEmbed
from vil.vision_lstm import TRAVERSALS, MLSTMLayer, from_traversal, to_traversal, traversal_order

SMALL = dict(dim=32, depth=2, patch_size=4, img_size=16, num_classes=5)


@pytest.mark.parametrize("name, count", [("vil2_tiny", 6_391_528), ("vil2_small", 23_398_696), ("vil2_base", 89_263_528)])
def test_parameter_counts(name, count):
    model = vil.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_state_dict_keys_match_released_models(reference_dir):
    for name, tsv in (("vil2_tiny", "vil2_tiny_model_keys.tsv"), ("vil_tiny", "vil1_tiny_model_keys.tsv")):
        released = dict(line.rstrip("\n").split("\t") for line in open(reference_dir / tsv))
        model = vil.create_model(name)
        ckpt = {k: torch.randn(eval(shape)) for k, shape in released.items()}
        vil.load_checkpoint(model, ckpt)  # raises on any missing, unexpected or misshapen key
        own = model.state_dict()
        assert len(own) == len(released)
        assert torch.equal(own["head.weight"], ckpt["head.weight"])
    assert set(vil.create_model("vil2_tiny").state_dict()) == set(
        line.split("\t")[0] for line in open(reference_dir / "vil2_tiny_model_keys.tsv"))


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_authors_checkpoint_reproduces_their_outputs(reference_dir, form):
    expected = torch.load(reference_dir / "vil2_mini_raw.expected.pt", weights_only=True)
    model = vil.create_model("vil2_nano", num_classes=10, mlstm_form=form,
                             checkpoint=str(reference_dir / "vil2_mini_raw.pt")).eval()
    with torch.no_grad():
        for key in ("32x32", "48x40"):
            x = expected["inputs"][key]
            assert rel_err(model(x), expected["logits"][key]) < 1e-4
            assert rel_err(model.forward_feature_maps(x), expected["features"][key]) < 1e-4
            # in float64 the match is exact up to the pos-embed resize's float32 rounding
            assert rel_err(model.double()(x.double()), expected["logits"][key]) < 1e-6
            model.float()


def test_checkpoint_at_another_resolution_resizes_pos_embed(reference_dir):
    expected = torch.load(reference_dir / "vil2_mini_raw.expected.pt", weights_only=True)
    model = vil.create_model("vil2_nano", num_classes=10, img_size=(48, 40),
                             checkpoint=str(reference_dir / "vil2_mini_raw.pt")).eval()
    assert model.pos_embed.embed.shape == (1, 12, 10, 64)
    with torch.no_grad():
        assert rel_err(model(expected["inputs"]["48x40"]), expected["logits"]["48x40"]) < 1e-4


def test_checkpoint_of_another_size_is_a_clear_error(reference_dir):
    with pytest.raises(CheckpointError, match=r"(?s)dim-64 model with patch size 4 and 2 block pairs, the model dim 192"
                       r".*shape mismatches:\n.*checkpoint \(128,\) vs model \(384,\)"):
        vil.create_model("vil2_tiny", checkpoint=str(reference_dir / "vil2_mini_raw.pt"))


def test_checkpoint_missing_keys_are_named(tmp_path):
    sd = vil.create_model("vil2_nano").state_dict()
    sd.pop("blocks.1.rowwise_from_bot_right.layer.proj_down.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "broken.th")
    with pytest.raises(CheckpointError) as err:
        vil.create_model("vil2_nano", checkpoint=str(tmp_path / "broken.th"))
    assert "missing keys" in str(err.value) and "proj_down.weight" in str(err.value)
    assert "unexpected keys" in str(err.value) and "extra.weight" in str(err.value)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"state_dict": {}, "obj": _Payload()}, tmp_path / "evil.th")
    with pytest.raises(CheckpointError, match="weights_only"):
        vil.create_model("vil2_nano", checkpoint=str(tmp_path / "evil.th"))
    with pytest.raises(CheckpointError, match="not found"):
        vil.create_model("vil2_nano", checkpoint=str(tmp_path / "missing.th"))


def test_new_head_when_class_count_differs(reference_dir):
    with pytest.warns(UserWarning, match="freshly initialized head"):
        model = vil.create_model("vil2_nano", num_classes=7, checkpoint=str(reference_dir / "vil2_mini_raw.pt"))
    assert model.head.weight.shape == (7, 128)


class _Payload:
    """Stands for an arbitrary pickled object in a downloaded file."""


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'vil2_tinny'.*Did you mean vil2_tiny"):
        vil.create_model("vil2_tinny")


def test_bad_inputs_are_clear_errors():
    model = vil.create_model("vil2_nano", **{k: v for k, v in SMALL.items() if k != "img_size"})
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(1, 1, 16, 16\)"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="image size 18x16 is not divisible by the patch size 4"):
        model(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match="unknown traversal 'diagonal'"):
        vil.create_model("vil2_nano", traversal="diagonal")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_classes=-3), ValueError, r"num_classes must be an integer >= 0.*got -3"),
    (dict(drop_path_rate=1.5), ValueError, r"drop_path_rate must be in \[0, 1\).*got 1.5"),
    (dict(drop_path_rate=-0.5), ValueError, r"drop_path_rate must be in \[0, 1\).*got -0.5"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive integer, got 0"),
    (dict(depth=0), ValueError, "depth must be a positive integer, got 0"),
    (dict(mlstm_form="fast"), ValueError, "unknown mlstm_form 'fast'"),
])
def test_bad_model_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        vil.create_model("vil2_nano", **kwargs)


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(48), ValueError, r"expected images of shape \(B, 3, H, W\), got \(48,\)"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), TypeError, "images are torch.uint8; the model takes float images"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.float64), TypeError,
     r"images are torch.float64 but the model's weights are torch.float32"),
    (torch.zeros(0, 3, 16, 16), ValueError, r"empty batch: got images of shape \(0, 3, 16, 16\)"),
])
def test_bad_images_are_clear_errors(x, error, match):
    model = vil.create_model("vil2_nano", **SMALL)
    for call in (model, model.forward_features, lambda t: model.forward_intermediates(t, indices=[0])):
        with pytest.raises(error, match=match):
            call(x)


def test_triton_form_on_the_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = vil.create_model("vil2_nano", **SMALL, mlstm_form="triton")
    with pytest.raises(RuntimeError, match="mlstm_form='triton' runs GPU kernels, but the input is on cpu: use 'auto'"):
        model(torch.randn(1, 3, 16, 16))


def test_text_file_as_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n" * 10)
    with pytest.raises(CheckpointError, match=r"notes.txt is not a (readable )?torch checkpoint"):
        vil.create_model("vil2_nano", checkpoint=str(path))


def _token_jacobian_mask(model, grid):
    """[t, s]: does output token t depend on input patch s (autograd through the whole model)?"""
    p = model.patch_size
    x = torch.randn(1, 3, grid[0] * p, grid[1] * p, dtype=torch.float64, requires_grad=True)
    feats = model.double().forward_features(x)[0]
    N = grid[0] * grid[1]
    dep = torch.zeros(N, N, dtype=torch.bool)
    probe = torch.randn(feats.shape[-1], dtype=torch.float64)  # a plain sum is constant under the final LayerNorm
    for t in range(N):
        (g,) = torch.autograd.grad(feats[t] @ probe, x, retain_graph=True)
        per_patch = g[0].abs().sum(0).view(grid[0], p, grid[1], p).sum((1, 3)).flatten()
        dep[t] = per_patch > 0
    return dep


def test_causality_depends_on_traversal():
    kwargs = dict(dim=16, depth=1, patch_size=2, img_size=8, conv_kind="causal1d", conv_kernel_size=4)
    uni = _token_jacobian_mask(vil.create_model("vil2_nano", traversal="uni", **kwargs), (4, 4))
    assert not uni.triu(1).any(), "a uni-directional model must not see later tokens"
    assert uni[torch.ones_like(uni).tril()].all(), "each token sees every earlier token"
    bi = _token_jacobian_mask(vil.create_model("vil2_nano", traversal="bi", **kwargs), (4, 4))
    assert bi.all(), "a bi-directional model sees every token from every token"


@pytest.mark.parametrize("direction", TRAVERSALS["oct"])
def test_traversal_reordering_matches_the_token_order(direction):
    x = torch.randn(2, 3 * 5, 4)
    order, _ = traversal_order(direction, (3, 5))
    y = to_traversal(x, direction, (3, 5))
    assert torch.equal(y, x[:, order])
    assert torch.equal(from_traversal(y, direction, (3, 5)), x)


def test_flipping_is_exact():
    order, grid = traversal_order("rowwise_from_bot_right", (3, 5))
    assert order.tolist() == list(range(14, -1, -1)) and grid == (3, 5)
    order, grid = traversal_order("colwise_from_top_left", (3, 5))
    assert order[:4].tolist() == [0, 5, 10, 1] and grid == (5, 3)
    # Rotating the image by 180 degrees and reversing each block's direction (and the patch kernels) must
    # give exactly the reversed token sequence: the flip, its conv2d grid and the un-flip are exact.
    a = vil.create_model("vil2_nano", pos_embed=False, **SMALL).double().eval()
    b = vil.create_model("vil2_nano", pos_embed=False, **SMALL).double().eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.patch_embed.proj.weight.copy_(a.patch_embed.proj.weight.flip(-1, -2))
    for block in b.iter_blocks():
        block.direction = {"rowwise_from_top_left": "rowwise_from_bot_right",
                           "rowwise_from_bot_right": "rowwise_from_top_left"}[block.direction]
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    with torch.no_grad():
        fa = a.forward_features(x.flip(-1, -2))
        fb = b.forward_features(x)
    assert rel_err(fa, fb.flip(1)) < 1e-12


@pytest.mark.parametrize("variant", [
    dict(traversal="uni"), dict(traversal="quad"), dict(traversal="oct", depth=4),
    dict(conv_kind="none"), dict(conv_kind="1d"), dict(conv_kind="causal1d", conv_kernel_size=4),
    dict(pos_embed=False), dict(concurrency="parallel"),
    dict(pooling="bilateral_mean"), dict(pooling="avg"), dict(pooling="center_avg"),
    dict(cls_tokens="bilateral", pooling="cls"), dict(cls_tokens="mid", pooling="cls"),
    dict(cls_tokens="mid+bilateral", pooling="cls"), dict(cls_tokens="bilateral"),
    dict(drop_path_rate=0.2, drop_path_schedule="linear"), dict(num_classes=0),
])
def test_ablation_variants_run_at_any_size(variant):
    kwargs = {**SMALL, **variant}
    model = vil.create_model("vil2_nano", **kwargs)
    model.train()
    for hw in ((16, 16), (24, 12)):
        out = model(torch.randn(2, 3, *hw))
        assert out.shape == (2, kwargs["num_classes"] or model.head_hidden_size)
        assert torch.isfinite(out).all()
        out.sum().backward()
    maps = model.forward_intermediates(torch.randn(2, 3, 24, 12), indices=[0, -1], intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 32, 6, 3)] * 2


def test_linear_drop_path_schedule():
    model = vil.create_model("vil2_nano", drop_path_rate=0.3, drop_path_schedule="linear", depth=3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.iter_blocks()]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    const = vil.create_model("vil2_nano", drop_path_rate=0.1)
    assert {b.drop_path.drop_prob for b in const.iter_blocks()} == {0.1}


def test_conv2d_uses_the_grid_of_the_actual_input():
    # On a non-square grid the q/k convolution must see each token's true neighbours: the layer's convolution
    # equals F.conv2d on the (B, C, H, W) image of the tokens (on the transposed grid the values differ).
    layer = MLSTMLayer(dim=8, num_heads=2, conv_kind="2d").double()
    H, W = 3, 5
    x = torch.randn(2, H * W, layer.inner, dtype=torch.float64)
    image = x.transpose(1, 2).reshape(2, layer.inner, H, W)
    expected = F.conv2d(image, layer.conv.weight, layer.conv.bias, padding=1, groups=layer.inner)
    assert rel_err(layer._conv(x, (H, W), None), expected.flatten(2).transpose(1, 2)) < 1e-12
    # In the model, on a 2 x 6 token grid: after the first (causal, row-wise from the top left) block, token
    # (0, 0) depends on its own patch and, through the convolution, on its grid neighbours (0, 1), (1, 0) and
    # (1, 1) only; on a transposed 6 x 2 grid its neighbours would be the patches 1, 2 and 3.
    model = vil.create_model("vil2_nano", **SMALL).double().eval()
    img = torch.randn(1, 3, 8, 24, dtype=torch.float64, requires_grad=True)
    (first,) = model.forward_intermediates(img, indices=[0], intermediates_only=True)
    (grad,) = torch.autograd.grad(first[0, :, 0, 0] @ torch.randn(first.shape[1], dtype=torch.float64), img)
    per_patch = grad[0].abs().sum(0).view(2, 4, 6, 4).sum((1, 3)) > 0
    expected_mask = torch.zeros(2, 6, dtype=torch.bool)
    expected_mask[:2, :2] = True
    assert torch.equal(per_patch, expected_mask)


def test_intermediates_for_segmentation():
    model = vil.create_model("vil2_tiny", img_size=64, num_classes=0)
    maps = model.forward_intermediates(torch.randn(1, 3, 64, 96), indices=[7, 11, 15, 23], intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, 192, 4, 6)] * 4
    tokens = model.forward_features(torch.randn(1, 3, 64, 96))
    assert tokens.shape == (1, 24, 192)


def test_flops_helper():
    gmacs = {n: vil.count_flops(vil.create_model(n, mlstm_form="parallel"), 224) / 2e9
             for n in ("vil2_tiny", "vil2_small", "vil2_base")}
    # Linear layers alone give 1.11 / 4.23 / 16.7 GMACs; the parallel cell adds 2 * 24 * 196^2 * 2 * dim MACs
    # (the paper's 1.3 / 4.7 / 17.9 count only the causal half of a chunkwise cell).
    for name, linear, dim in (("vil2_tiny", 1.11, 192), ("vil2_small", 4.23, 384), ("vil2_base", 16.7, 768)):
        cell = 2 * 24 * 196**2 * 2 * dim / 1e9
        assert gmacs[name] == pytest.approx(linear + cell, rel=0.03), name


def test_training_flops_count_depthwise_convolutions_as_such():
    # torch's counter prices the depthwise convolutions' backward pass as dense (x64 channels here, which
    # would put the step above 5x the forward pass); counted as twice their forward pass, a step stays
    # below 3x (products with constants and the image need no input gradients).
    model = vil.create_model("vil2_nano", **SMALL, mlstm_form="chunkwise")
    forward, train = vil.count_flops(model, 16), vil.count_flops(model, 16, train=True)
    assert 2.5 * forward < train <= 3 * forward
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("variant", [dict(), dict(traversal="quad", cls_tokens="bilateral")])
def test_torch_compile_traces_without_graph_breaks(variant):
    model = vil.create_model("vil2_nano", dim=32, depth=2, img_size=16, mlstm_form="chunkwise", **variant)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("traversal,graphs", [("bi", 1), ("quad", 2)])
def test_compile_blocks_shares_one_graph_per_traversal_pattern(traversal, graphs):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = vil.create_model("vil2_nano", dim=32, depth=4, img_size=16, mlstm_form="chunkwise", traversal=traversal)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    model.compile_blocks(backend="eager", fullgraph=True)
    torch.testing.assert_close(model(x), expected)
    # quad alternates two pairs of directions over the pairs: one graph for each
    assert counters["stats"]["unique_graphs"] == graphs


def test_block_diagonal_dense_weight_equals_the_block_product():
    layer = BlockDiagonalLinear(12).double()
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    dense = layer.dense_weight()
    blocks = torch.block_diag(*layer.weight)
    assert torch.equal(dense, blocks)
    torch.testing.assert_close(torch.nn.functional.linear(x, dense, layer.bias), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proj_bias", [True, False])
def test_dense_projections_with_folded_weights_equal_the_blockwise_path(proj_bias):
    # The GPU path computes z, q, k, v and the gates in two dense matmuls, v's and the gates' weights
    # folded into others; the CPU path uses the up-projection, block products and a gate matmul on
    # concatenated q, k, v.
    layer = MLSTMLayer(8, num_heads=2, proj_bias=proj_bias).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    x_conv = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    x_mlstm, z = layer.proj_up(x).chunk(2, dim=-1)
    q, k, v = layer.q_proj(x_conv), layer.k_proj(x_conv), layer.v_proj(x_mlstm)
    qkv = torch.cat([q, k, v], dim=-1)
    expected = (z, q, k, v, layer.mlstm_cell.igate(qkv), layer.mlstm_cell.fgate(qkv))
    got = layer._projections_dense(x, x_conv)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    weights = list(layer.parameters())
    loss_got, loss_expected = (sum(t.square().sum() for t in ts) for ts in (got, expected))
    grads_got = torch.autograd.grad(loss_got, [x, x_conv, *weights], allow_unused=True)
    grads_expected = torch.autograd.grad(loss_expected, [x, x_conv, *weights], allow_unused=True)
    for a, b in zip(grads_got, grads_expected):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_model_matches_cpu_model(monkeypatch):
    # The CUDA path (dense fused projections, Triton cell) against the CPU path (block products, chunkwise).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = vil.create_model("vil2_nano", dim=64, depth=2, img_size=64, mlstm_form="auto")
    x = torch.randn(2, 3, 64, 64)
    out_cpu = model(x)
    grads_cpu = torch.autograd.grad(out_cpu.square().sum(), list(model.parameters()))
    model.cuda()
    out_gpu = model(x.cuda())
    grads_gpu = torch.autograd.grad(out_gpu.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
    for g_gpu, g_cpu in zip(grads_gpu, grads_cpu):
        assert ((g_gpu.cpu() - g_cpu).norm() / g_cpu.norm().clamp_min(1e-12)).item() < 1e-4


def test_patch_embed_is_the_strided_convolution():
    # The embedding applies its Conv2d weight as a matmul on patches: the same map, on a non-square grid.
    embed = PatchEmbed(patch_size=4, in_chans=3, dim=8).double()
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    out = embed(x)
    assert out.shape == (2, 2, 3, 8)
    torch.testing.assert_close(out, embed.proj(x).permute(0, 2, 3, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(embed(x.contiguous(memory_format=torch.channels_last)), out, rtol=0, atol=0)


@pytest.mark.parametrize("norm_bias,cell", [(True, "tiled"), (False, "tiled"), (True, "chunkwise")])
def test_triton_form_matches_parallel_form(norm_bias, cell, monkeypatch):
    # The Triton path in float32 (packed projections, cell kernels with head norm, skip and output gate
    # fused around them; on a CPU in Triton's interpreter) against the PyTorch parallel form in float64,
    # outputs and all parameter gradients. The chunkwise kernels run where sequences are long.
    pytest.importorskip("triton")
    size = 16
    if cell == "chunkwise":  # 64 tokens in chunks of 16
        monkeypatch.setattr(importlib.import_module("vil.mlstm"), "TILED_MAX_TOKENS", 32)
        size = 32
    model = vil.create_model("vil2_nano", **(SMALL | dict(img_size=size)), norm_bias=norm_bias, mlstm_form="parallel")
    for p in model.parameters():  # away from the init's zeros, so that every gradient path carries signal
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, size, size)
    reference = copy.deepcopy(model).double()
    runs = {}
    for name, m, form, inputs in (("float64", reference, "parallel", x.double()), ("parallel", model, "parallel", x),
                                  ("triton", model, "triton", x)):
        m.set_mlstm_form(form, chunk_size=16)
        out = m(inputs)
        runs[name] = (out, *torch.autograd.grad(out.square().sum(), list(m.parameters())))
    # Against float64: within 1e-5 (output) and 1e-4 (gradients), or 3x the error of the float32 PyTorch
    # forms where float32 rounding alone comes near that (sums of many cancelling terms).
    names = ["output"] + [name for name, _ in model.named_parameters()]
    for i, name in enumerate(names):
        floor = rel_err(runs["parallel"][i], runs["float64"][i])
        assert rel_err(runs["triton"][i], runs["float64"][i]) < max(1e-5 if i == 0 else 1e-4, 3 * floor), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_torch_compile_traces_the_kernel_path_without_graph_breaks():
    model = vil.create_model("vil2_nano", dim=64, depth=2, img_size=64, mlstm_form="auto").cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
