"""The penultimate embedding of every registered classifier, read by a hook on its final linear layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from leukoscope.models import create_model, list_models
from leukoscope.models.classic import ClassicModel
from leukoscope.models.embedding import (DEFAULT_STAGES, EmbeddingError, embedding_stages, embedding_widths,
                                         final_linear, logits_and_embeddings, set_embedding_stages)
from leukoscope.models.jabeena import JabeenaCNN
from leukoscope.preprocessing import Preprocessing, batched_outputs


# Two classes change the head only of system C's CNN (one sigmoid unit).
@pytest.mark.parametrize(("name", "num_classes"),
                         [(name, 3) for name in list_models(kind="classifier")] + [("jabeena_cnn", 2)])
def test_every_classifier_gives_the_input_of_its_head(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes).eval()
    x = torch.randn(2, 3, 64, 64)  # 64 px: the smallest size every architecture runs at (AlexNet's pools)
    logits, embeddings = logits_and_embeddings(model, x)
    head = final_linear(model)
    assert logits.shape == (2, num_classes) and embeddings.shape == (2, head.in_features)
    with torch.no_grad():
        out = head(embeddings)
    if isinstance(model, JabeenaCNN) and model.binary:  # one sigmoid unit z, as the logits [-z/2, z/2]
        out = torch.cat([-out / 2, out / 2], dim=1)
    # the hooked layer is the one that makes the logits: its output from the captured input is them
    assert torch.allclose(out, logits, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # no hook left behind that changes anything


def test_a_model_without_a_linear_layer_is_named() -> None:
    with pytest.raises(EmbeddingError, match="no linear layer"):
        final_linear(nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))


def test_a_head_used_twice_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.head(x))

    with pytest.raises(EmbeddingError, match="ran 2 times"):
        logits_and_embeddings(Twice(), torch.randn(2, 4))


def test_batched_outputs_match_batched_logits_for_torch_and_classical_models(synthetic_root) -> None:
    from leukoscope.classic import FeatureSpec
    from leukoscope.models.registry import create_model as build
    from leukoscope.preprocessing import batched_logits

    preprocessing = Preprocessing(32)
    pixels = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8)
    model = create_model("abas_cnn", 3).eval()
    logits, embeddings = batched_outputs(model, pixels, preprocessing, batch_size=2)
    assert np.allclose(logits, batched_logits(model, pixels, preprocessing), atol=1e-5)
    assert embeddings.shape == (5, 60)

    spec = FeatureSpec(histogram_bins=8, lbp_radii=[1], glcm_distances=[1])
    classic = ClassicModel(build("logistic_regression", num_classes=3), spec, 3)
    features = classic.features(pixels)
    classic.fit_features(np.r_[features, features], np.array([0, 1, 2, 0, 1] * 2))
    logits, embeddings = batched_outputs(classic, pixels, preprocessing)
    assert np.allclose(logits, batched_logits(classic, pixels, preprocessing))
    assert embeddings.shape == (5, features.shape[1])  # k_best all: every standardised feature


def test_stages_come_before_the_penultimate_embedding_each_averaged_over_the_image() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    plain_logits, penultimate = logits_and_embeddings(model, x)
    set_embedding_stages(model, ["features.3", "features.16"])
    logits, embeddings = logits_and_embeddings(model, x)
    with torch.no_grad():  # the same parts by hand: run the trunk block by block
        h, pooled = x, {}
        for index, block in enumerate(model.features):
            h = block(h)
            pooled[index] = h.mean(dim=(2, 3))
    assert embedding_widths(model, x) == (24, 160, 1280) and embeddings.shape == (2, 24 + 160 + 1280)
    assert torch.allclose(embeddings, torch.cat([pooled[3], pooled[16], penultimate], dim=1), atol=1e-5)
    assert torch.equal(logits, plain_logits)  # reading the stages changes no answer
    set_embedding_stages(model, [])
    assert logits_and_embeddings(model, x)[1].shape == (2, 1280)  # back to the penultimate embedding alone


def test_stages_named_out_of_run_order_keep_the_named_order() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    set_embedding_stages(model, ["features.16", "features.3"])
    _, embeddings = logits_and_embeddings(model, x)
    with torch.no_grad():
        early = model.features[:4](x)
        late = model.features[4:17](early)
    assert embedding_widths(model, x) == (160, 24, 1280)
    assert torch.allclose(embeddings[:, :160], late.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(embeddings[:, 160:184], early.mean(dim=(2, 3)), atol=1e-5)


def test_a_stage_the_model_lacks_a_repeat_or_a_stage_inside_another_is_named() -> None:
    model = create_model("mobilenet_v2", num_classes=3)
    with pytest.raises(EmbeddingError, match="no submodule 'features.99'"):
        set_embedding_stages(model, ["features.3", "features.99"])
    for stages in (["features.3", "features.3"], ["features", "features.3"]):
        with pytest.raises(EmbeddingError, match="named twice or holds another stage"):
            set_embedding_stages(model, stages)
    assert embedding_stages(model) == ()  # nothing half set


def test_every_default_stage_exists_in_its_architecture() -> None:
    for name, stages in DEFAULT_STAGES.items():
        model = create_model(name, num_classes=3)
        set_embedding_stages(model, stages)
        assert embedding_stages(model) == stages


def test_threads_sharing_one_model_each_get_their_own_embeddings() -> None:
    """The service analyses smear fields on worker threads through one classifier: each forward
    pass's hooks must record that pass only (before, a pass of another thread landed in the list)."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=3).eval()
    set_embedding_stages(model, DEFAULT_STAGES["mobilenet_v2"])
    batches = [torch.randn(2, 3, 64, 64) for _ in range(8)]
    expected = [logits_and_embeddings(model, x)[1] for x in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            found = list(pool.map(lambda x: logits_and_embeddings(model, x)[1], batches))
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(found, expected))


def test_an_unknown_stage_is_named_with_what_could_have_been_meant() -> None:
    """A stage typed by hand (calibrate-ood --stages) that is no submodule: said with the names beside it."""
    model = create_model("mobilenet_v2", num_classes=3)
    with pytest.raises(EmbeddingError, match=r"'features.30' .*\(did you mean 'features.3'\?\); under 'features': "
                                             r"features.0, features.1, "):
        set_embedding_stages(model, ["features.30"])
    with pytest.raises(EmbeddingError, match=r"'layer2' to read as an embedding stage; at its top: features, "
                                             r"classifier$"):
        set_embedding_stages(model, ["layer2"])
