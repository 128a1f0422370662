"""ViL as a timm model: the contract of timm's own model tests, on small ViL-v2 and ViL-v1 models on the CPU."""
import ast
import copy
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

import vil
from reference_mlstm import rel_err

NAMES = ["vil2_tiny", "vil_tiny"]
SMALL = dict(depth=3, img_size=64, num_classes=7, mlstm_form="chunkwise")  # 4 x 4 tokens, 6 blocks
REPO = Path(__file__).resolve().parents[1]


def _model(name, **kwargs):
    return timm.create_model(name, pretrained=False, **{**SMALL, **kwargs}).eval()


@pytest.mark.parametrize("name", NAMES)
def test_create_forward_backward_and_head_contract(name):
    model = timm.create_model(name, pretrained=False, num_classes=7, img_size=64, drop_path_rate=0.1, depth=3)
    assert isinstance(model, vil.VisionLSTM) and model.pretrained_cfg["architecture"] == name
    assert model.num_features == 192 and model.head_hidden_size == {"vil2_tiny": 384, "vil_tiny": 192}[name]
    assert model.get_classifier() is model.head and model.head.out_features == 7
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 16, 192)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.get_classifier()(pre), model(x))
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)  # indices=None: every block
        assert len(maps) == len(model.feature_info) == 6
        assert all(m.shape == (2, 192, 4, 3) for m in maps)
        torch.testing.assert_close(final, model.forward_features(x))  # the final norm of the full stack
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        for a, b in zip(last2, maps[-2:]):
            torch.testing.assert_close(a, b)
        picked = model.forward_intermediates(x, indices=[1, -1], intermediates_only=True)
        torch.testing.assert_close(picked[0], maps[1])
        torch.testing.assert_close(picked[1], maps[5])
        nlc = model.forward_intermediates(x, indices=[1, 4], output_fmt="NLC", intermediates_only=True)
        for seq, m in zip(nlc, (maps[1], maps[4])):
            assert seq.shape == (2, 12, 192)
            torch.testing.assert_close(seq, m.flatten(2).transpose(1, 2))
        normed = model.forward_intermediates(x, indices=[5], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed.flatten(2).transpose(1, 2), model.forward_features(x))
        # stop_early: the final tokens are those of the last tap, normalized
        early, (tap,) = model.forward_intermediates(x, indices=[2], stop_early=True)
        torch.testing.assert_close(early, model._token_norm()(tap.flatten(2).transpose(1, 2)))
        with pytest.raises(ValueError, match=r"feature index 99 is out of range \(0 to 5\).*6 feature taps"):
            model.forward_intermediates(x, indices=[99])
        with pytest.raises(ValueError, match="indices is empty"):
            model.forward_intermediates(x, indices=[])
        with pytest.raises(ValueError, match=r"last-n \(7\) is out of range"):
            model.forward_intermediates(x, indices=7)
        with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
            model.forward_intermediates(x, output_fmt="NHWC")


def test_intermediates_with_cls_tokens_and_parallel_pairs():
    model = _model("vil2_tiny", cls_tokens="mid+bilateral", pooling="cls")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (patches, prefix), = model.forward_intermediates(x, indices=[-1], intermediates_only=True,
                                                          return_prefix_tokens=True)
        assert patches.shape == (1, 192, 4, 4) and prefix.shape == (1, 3, 192)
        final = model.forward_features(x)  # 19 tokens, [CLS] at slots 0, 9 and 18
        torch.testing.assert_close(model._token_norm()(prefix), final[:, [0, 9, 18]])
    parallel = _model("vil2_tiny", concurrency="parallel")
    assert len(parallel.feature_info) == 3 and parallel.default_out_indices() == (0, 1, 2)
    with torch.no_grad():
        final, maps = parallel.forward_intermediates(x)
        torch.testing.assert_close(final, parallel.forward_features(x))
    assert len(maps) == 3


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name):
    model = _model(name, drop_path_rate=0.2).train()  # drop path: the recomputation must replay the same masks
    ref = copy.deepcopy(model)
    model.set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    outs, grads = [], []
    for m in (ref, model):
        torch.manual_seed(1)
        out = m(x)
        _, maps = m.forward_intermediates(x, indices=[1, 4])
        (out.square().sum() + sum(t.square().sum() for t in maps)).backward()
        outs.append([out, *maps])
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name, indices, pairs_left, blocks_left", [
    ("vil2_tiny", [1, 2], 2, 3),   # tap 2 is the first block of pair 1: its second block goes too
    ("vil_tiny", (0, 3), 2, 4),
])
def test_prune_keeps_the_requested_intermediates(name, indices, pairs_left, blocks_left):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        n_params = sum(p.numel() for p in model.parameters())
        taken = model.prune_intermediate_layers(indices)
        after = model.forward_intermediates(x, indices=taken, intermediates_only=True)
    assert taken == list(indices)
    assert len(model.blocks) == pairs_left and len(list(model.iter_blocks())) == blocks_left
    assert isinstance(model.head, torch.nn.Identity) and sum(p.numel() for p in model.parameters()) < n_params
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_maps_equal_forward_intermediates(name):
    x = torch.randn(2, 3, 64, 80)
    full = _model(name, depth=12)
    feats = timm.create_model(name, pretrained=False, features_only=True, **{**SMALL, "depth": 12}).eval()
    missing, _ = feats.model.load_state_dict(full.state_dict(), strict=False)  # pruned: blocks 24.., head
    assert not missing
    assert feats.feature_info.reduction() == [16] * 4 and feats.feature_info.channels() == [192] * 4
    assert feats.feature_info.module_name()[0] == "blocks.3." + full.blocks[3].names[1]
    with torch.no_grad():
        maps = feats(x)
        ref = full.forward_intermediates(x, indices=[7, 11, 15, 23], intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 192, 4, 5)] * 4
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b)
    picked = timm.create_model(name, features_only=True, out_indices=(1, -1), **SMALL)
    assert [m.shape for m in picked(x)] == [(2, 192, 4, 5)] * 2
    # every block has its feature_info entry at reduction 16
    assert [f["reduction"] for f in full.feature_info] == [16] * 24


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_matches_the_evaluation_transform(name):
    model = timm.create_model(name, pretrained=False, depth=1)
    cfg = resolve_data_config({}, model=model)
    assert cfg == dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225), crop_pct=1.0, crop_mode="center")
    ops = create_transform(**cfg).transforms
    assert isinstance(ops[0], T.Resize) and ops[0].size == 224
    assert ops[0].interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(ops[1], T.CenterCrop) and ops[1].size == (224, 224)
    assert isinstance(ops[-1], T.Normalize)
    tagged = timm.get_pretrained_cfg(f"{name}.e800_in1k")
    assert tagged.url == f"https://ml.jku.at/research/vision_lstm/download/{name}16_e800_in1k.th"
    assert tagged.notes == ({"vil2_tiny": "ImageNet-1K top-1 78.3", "vil_tiny": "ImageNet-1K top-1 78.1"}[name]
                            + " (224, crop ratio 1.0)",)
    assert timm.get_pretrained_cfg("vil2_base.e400_in1k").url.endswith("vil2_base16_e400_in1k.th")
    assert set(vil.list_models(pretrained=True)) == {
        "vil2_tiny.e800_in1k", "vil2_tiny.e400_in1k", "vil2_small.e400_in1k", "vil2_base.e400_in1k",
        "vil_tiny.e800_in1k", "vil_small.e400_in1k", "vil_base.e400_in1k"}


FIXTURE_SIZE = dict(dim=64, depth=2, patch_size=4, img_size=32, num_classes=10)


def test_pretrained_from_a_local_raw_file_gives_the_authors_logits(reference_dir):
    expected = torch.load(reference_dir / "vil2_mini_raw.expected.pt", weights_only=True)
    file = str(reference_dir / "vil2_mini_raw.pt")
    model = timm.create_model("vil2_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=file),
                              **FIXTURE_SIZE).eval()
    same = vil.create_model("vil2_tiny.e800_in1k", checkpoint=file, **FIXTURE_SIZE).eval()
    feats = timm.create_model("vil2_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=file),
                              features_only=True, out_indices=[-1], **FIXTURE_SIZE).eval()
    with torch.no_grad():
        for key in ("32x32", "48x40"):
            x = expected["inputs"][key]
            assert rel_err(model(x), expected["logits"][key]) < 1e-4
            assert rel_err(same(x), expected["logits"][key]) < 1e-4
            assert rel_err(model.forward_feature_maps(x), expected["features"][key]) < 1e-4
            (last,) = feats(x)  # before the final norm
            tokens = model._token_norm()(last.flatten(2).transpose(1, 2))
            assert rel_err(tokens.transpose(1, 2).reshape(last.shape), expected["features"][key]) < 1e-4


def test_pretrained_offline_names_the_url_and_the_file_option(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    url = "http://127.0.0.1:9/vil2_tiny16_e800_in1k.th"  # nothing listens there: fails at once, like offline
    with pytest.raises(RuntimeError) as err:
        timm.create_model("vil2_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=url), depth=1)
    message = str(err.value)
    assert url in message and "pretrained_cfg_overlay=dict(file='/path/to/vil2_tiny16_e800_in1k.th')" in message
    assert "checkpoint=" in message
    with pytest.raises(RuntimeError, match=r"vil2_nano has no released weights.*dict\(file=PATH\)"):
        timm.create_model("vil2_nano", pretrained=True)


def test_vil_create_model_takes_timm_arguments():
    feats = vil.create_model("vil2_nano", features_only=True, out_indices=[0, 3], pretrained=False)
    assert [m.shape for m in feats(torch.randn(1, 3, 32, 32))] == [(1, 64, 8, 8)] * 2
    assert vil.create_model("vil2_tiny.e400_in1k", depth=1).pretrained_cfg["tag"] == "e400_in1k"
    with pytest.raises(ValueError, match="checkpoint is given but pretrained=False"):
        vil.create_model("vil2_nano", checkpoint="x.th", pretrained=False)


def test_layer_decay_groups_of_timm_count_block_pairs():
    from timm.optim import param_groups_layer_decay

    model = _model("vil2_tiny")
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    per_layer = {}
    for name, s in scale.items():
        per_layer.setdefault(model.lr_layer_id(name) if name.startswith(("patch", "pos", "blocks")) else -1,
                             set()).add(s)
    # one scale per pair (both blocks), decaying from the last pair to the embeddings
    pairs = [per_layer[i] for i in range(model.depth + 1)]
    assert all(len(v) == 1 for v in pairs)
    assert [v.pop() for v in pairs] == [0.5 ** (model.depth - i) for i in range(model.depth + 1)]
    assert not any(scale[k] != 1.0 for k in scale if k.startswith("blocks.2."))


def test_torch_hub_loads_from_the_checkout():
    model = torch.hub.load(str(REPO), "vil2_nano", source="local", pretrained=False, num_classes=3)
    assert isinstance(model, vil.VisionLSTM) and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    v1 = torch.hub.load(str(REPO), "vil_tiny", source="local", depth=1)
    assert v1.version == 1 and v1.pretrained_cfg["architecture"] == "vil_tiny"


def test_import_graph_of_vil_has_no_cycle():
    """Module-level imports between vil's modules (imports inside functions load lazily and are left out)."""
    root = REPO / "vil"
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vil":
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                deps |= subs or ({node.module} & set(modules))
        graph[name] = deps - {name}
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        assert state.get(n) != "open", "import loop: " + " -> ".join(path + [n])
        state[n] = "open"
        for d in graph[n]:
            if d != "vil":  # a submodule's import of the package itself runs vil/__init__ first anyway
                visit(d, path + [n])
        state[n] = "done"

    for n in graph:
        visit(n, [])
    assert "vil.vision_lstm" in graph["vil.registry"] and "vil.layers" in graph["vil.checkpoint"]
