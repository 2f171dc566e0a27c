"""The exact stand-in for adaptive average pools the ONNX exporter cannot write (no onnx needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leukoscope.inference.export import FixedAdaptiveAvgPool, exportable_copy
from leukoscope.models import create_model


@pytest.mark.parametrize(("size_in", "size_out"), [((13, 13), (4, 4)), ((2, 3), (7, 7)), ((9, 16), (5, 3)),
                                                   ((8, 8), (4, 4))])
def test_fixed_pool_equals_adaptive_pool(size_in, size_out) -> None:
    x = torch.randn(2, 3, *size_in)
    expected = nn.AdaptiveAvgPool2d(size_out)(x)
    assert torch.allclose(FixedAdaptiveAvgPool(size_in, size_out)(x), expected, atol=1e-6)


def test_exportable_copy_replaces_only_the_pools_that_need_it() -> None:
    torch.manual_seed(0)
    model = create_model("abas_cnn", 3).eval()  # 48 px -> a 3x3 map pooled to 16x16
    x = torch.randn(2, 3, 48, 48)
    copy = exportable_copy(model, x)
    assert isinstance(copy.pool, FixedAdaptiveAvgPool) and isinstance(model.pool, nn.AdaptiveAvgPool2d)
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x), atol=1e-5)
    divisible = exportable_copy(create_model("mobilenet_v3_small", 3), x)  # pools to 1x1: kept
    assert not any(isinstance(m, FixedAdaptiveAvgPool) for m in divisible.modules())
