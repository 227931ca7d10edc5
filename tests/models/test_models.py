from pathlib import Path

import pytest
import torch

from histolite.errors import ModelError
from histolite.models import (
    BreakHisHead,
    NormalizedClassifier,
    count_macs,
    count_parameters,
    create_model,
    model_cost,
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
    assert model_cost("mixnet_s", 8).parameters == pytest.approx(2.6e6, rel=0.02)
    assert model_cost("resnet50", 4).parameters == pytest.approx(23.5e6, rel=0.01)
    # ResNet-50 at 224 px: 4.1 G multiply-accumulates (He et al. 2016 report 3.8 GFLOPs, which
    # leaves out the stem's pooling and the classifier, as most tables do)
    assert model_cost("resnet50", 1000, 224).macs == pytest.approx(4.1e9, rel=0.02)


def test_macs_are_counted_per_layer_by_hand() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8 x 16 x 16 outputs, 27 MACs each
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8 x 16 x 16 x 9
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),  # 40
    )
    assert count_macs(model, 32) == 8 * 16 * 16 * 27 + 8 * 16 * 16 * 9 + 40
    with torch.device("meta"):
        meta = create_model("resnet8", 8)
    assert count_macs(meta, 112) == count_macs(create_model("resnet8", 8), 112)


@pytest.mark.parametrize("name", ["mobile_student_s", "mobile_student_xs"])
def test_mobile_students_are_small_in_parameters_and_compute(name: str) -> None:
    cost = model_cost(name, num_classes=8, input_size=112)
    assert cost.parameters <= 100_000
    assert cost.macs <= 20_000_000
    # a tenth of ResNet-8's compute at the same size, with more parameters
    assert cost.macs < model_cost("resnet8", 8, 112).macs / 7
    model = create_model(name, num_classes=8).eval()
    for size in (64, 112, 150):
        assert model(torch.rand(2, 3, size, size)).shape == (2, 8)


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
