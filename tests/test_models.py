from pathlib import Path

import pytest
import torch

from histolite.errors import ModelError
from histolite.models import (
    BreakHisHead,
    NormalizedClassifier,
    count_parameters,
    create_model,
    model_size,
    model_source,
)


def test_resnet8_is_under_100k_parameters_and_any_input_size() -> None:
    model = create_model("resnet8", num_classes=8)
    assert count_parameters(model) < 100_000
    for size in (32, 112, 150):
        assert model(torch.rand(2, 3, size, size)).shape == (2, 8)


@pytest.mark.parametrize("name", ["resnet18", "mixnet_s", "densenet121"])
def test_timm_backbones_by_name(name: str) -> None:
    model = create_model(name, num_classes=3, pretrained=False)
    assert model_source(name) == "timm"
    model.eval()
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3)


def test_torchvision_fallback_and_breakhis_head() -> None:
    assert model_source("shufflenet_v2_x0_5") == "torchvision"
    model = create_model("shufflenet_v2_x0_5", num_classes=2, head="breakhis").eval()
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2)
    timm_model = create_model("resnet18", num_classes=2, head="breakhis")
    head = timm_model[-1]
    assert isinstance(head, BreakHisHead)
    layers = [type(m).__name__ for m in head]
    assert layers == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].out_features == 256 and head[3].out_features == 100 and head[2].p == 0.4


def test_published_sizes_match_the_papers() -> None:
    assert model_size("mixnet_s", 8).parameters == pytest.approx(2.6e6, rel=0.02)
    assert model_size("resnet50", 4).parameters == pytest.approx(23.5e6, rel=0.01)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnet9'.*did you mean.*resnet"):
        create_model("resnet9", num_classes=2)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("resnet8", num_classes=1)


def test_local_weights_are_loaded_without_pickle(tmp_path: Path) -> None:
    source = create_model("resnet8", num_classes=4)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = create_model("resnet8", num_classes=4, weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key])
    # a new head (different class count) keeps the backbone weights
    other = create_model("resnet8", num_classes=7, weights=str(path))
    assert torch.equal(other.stem[0].weight, source.stem[0].weight)
    with pytest.raises(ModelError, match="not found"):
        create_model("resnet8", num_classes=4, weights=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("resnet20", num_classes=4).state_dict(), wrong)
    torch.save({"layer.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ModelError, match="different architecture"):
        create_model("resnet8", num_classes=4, weights=str(wrong))


def test_normalized_classifier_applies_mean_std() -> None:
    net = torch.nn.Flatten()
    model = NormalizedClassifier(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = model(torch.full((1, 3, 1, 1), 0.75))
    assert torch.allclose(out, torch.ones(1, 3))
    assert {"mean", "std"} <= set(model.state_dict())
