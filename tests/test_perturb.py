"""core.perturb: identity at 0, reference formulas, determinism, batch independence, geometry of boxes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from core import perturb as P
from core.errors import EvalError


def _images(n: int = 3, height: int = 40, width: int = 56, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.9, width).view(1, 1, 1, width)
    return (0.6 * ramp + 0.4 * torch.rand((n, 3, height, width), generator=generator)).clamp(0, 1)


def test_every_kind_is_the_identity_at_zero_bit_for_bit():
    x = _images()
    assert torch.equal(P.perturb(x, {name: 0.0 for name in P.KINDS}), x)
    assert torch.equal(P.perturb(x, P.table([P.Settings()] * 3)), x)


@pytest.mark.parametrize("name", list(P.KINDS))
def test_each_kind_changes_the_image_and_stays_in_range(name):
    x = _images()
    strength = P.KINDS[name].levels[2]
    y = P.perturb(x, {name: strength})
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert float((y - x).abs().mean()) > 1e-3


def test_mixed_rows_equal_rows_alone():
    x = _images(4)
    strengths = {"blur": [0.0, 2.5, 0.7, 1.0], "noise": [0.1, 0.0, 0.05, 0.2], "jpeg": [60.0, 0.0, 90.0, 10.0],
                 "rotation": [0.0, 15.0, -40.0, 0.0], "contrast": [0.0, -0.5, 0.3, 0.2]}
    together = P.perturb(x, strengths, keys=[7, 8, 9, 10], seed=3)
    for row in range(4):
        alone = P.perturb(x[row:row + 1], {k: [v[row]] for k, v in strengths.items()}, keys=[7 + row], seed=3)
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-6, rtol=0)


def test_brightness_and_contrast_match_their_formulas():
    x = _images()
    np.testing.assert_allclose(P.perturb(x, {"brightness": -0.3}).numpy(), np.clip(x.numpy() - 0.3, 0, 1),
                               atol=1e-6)
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), x.numpy(), axes=([0], [1]))  # (B, H, W)
    grey = luma.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)
    expected = np.clip(grey + 1.5 * (x.numpy() - grey), 0, 1)
    np.testing.assert_allclose(P.perturb(x, {"contrast": 0.5}).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_equals_scipy_gaussian_filter(sigma):
    x = _images(2)
    ours = P.perturb(x, {"blur": sigma}).numpy()
    # scipy cuts at int(truncate * sigma + 0.5): the same radius as ceil(3 sigma) for these sigmas.
    reference = ndimage.gaussian_filter(x.numpy().astype(np.float64), sigma=(0, 0, sigma, sigma), mode="nearest",
                                        truncate=3.0)
    np.testing.assert_allclose(ours, reference, atol=2e-6)


def test_noise_is_seeded_keyed_and_standard_normal():
    field = P.noise_field(torch.tensor([5, 5, 6]), (3, 64, 64), seed=1)
    assert torch.equal(field[0], field[1]) and not torch.equal(field[0], field[2])
    assert not torch.equal(field[0], P.noise_field(torch.tensor([5]), (3, 64, 64), seed=2)[0])
    big = P.noise_field(torch.arange(8), (3, 64, 64)).numpy().ravel()
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1.0) < 0.01
    x = torch.full((1, 3, 64, 64), 0.5)
    noisy = P.perturb(x, {"noise": 0.1}, keys=[5], seed=1)
    torch.testing.assert_close(noisy, (0.5 + 0.1 * field[0:1]).clamp(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("quality", [90, 50, 10])
def test_jpeg_is_close_to_libjpeg(quality):
    array = (_images(1, 64, 64)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float64) / 255
    ours = P.perturb(x, {"jpeg": 100.0 - quality})[0].permute(1, 2, 0).numpy()
    # Same tables, sampling and transform; libjpeg's integer DCT rounds a few coefficients differently.
    assert np.abs(ours - decoded).mean() < 0.01
    assert np.abs(np.abs(ours - array / 255).mean() - np.abs(decoded - array / 255).mean()) < 0.002


def test_quantisation_tables_follow_libjpeg_scaling():
    luma, chroma = P.quantisation_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert luma[0, 0, 0] == 16 and chroma[0, 0, 0] == 17  # quality 50: the Annex K tables
    assert float(luma[1].max()) == 1.0  # quality 100: all ones
    assert luma[2, 0, 0] == 80  # quality 10: scale 500 %, (16 * 500 + 50) // 100


def test_rotation_by_90_degrees_is_a_counter_clockwise_quarter_turn():
    x = _images(2, 32, 32)
    turned = P.perturb(x, {"rotation": 90.0})
    torch.testing.assert_close(turned, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rotation,scale", [(30.0, 0.0), (0.0, 0.5), (-20.0, -0.3)])
def test_boxes_follow_the_geometry(rotation, scale):
    x = torch.zeros((1, 3, 60, 80))
    box = np.array([[30.0, 20.0, 46.0, 32.0]])
    x[:, :, 20:32, 30:46] = 1.0
    moved = P.perturb(x, {"rotation": rotation, "scale": scale})[0, 0].numpy()
    ys, xs = np.nonzero(moved > 0.5)
    (new_box,), kept = P.transform_boxes(box, rotation, scale, 80, 60)
    assert kept.all()
    assert xs.min() >= new_box[0] - 1 and xs.max() + 1 <= new_box[2] + 1
    assert ys.min() >= new_box[1] - 1 and ys.max() + 1 <= new_box[3] + 1
    if rotation == 0:  # a zoom maps the box exactly
        assert abs(xs.min() - new_box[0]) <= 1 and abs(xs.max() + 1 - new_box[2]) <= 1


def test_boxes_leaving_the_image_are_dropped_and_unmoved_rows_kept():
    boxes = np.array([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 20.0, 20.0]])
    out, kept = P.transform_boxes(boxes, np.array([0.0, 0.0]), np.array([1.0, 0.0]), 40, 40)
    assert kept.tolist() == [False, True]
    np.testing.assert_array_equal(out[1], boxes[1])


def test_occlusion_paints_a_grey_square_where_asked():
    x = torch.zeros((1, 3, 40, 60))
    y = P.perturb(x, {"occlusion": 0.25, "occlusion_x": 0.25, "occlusion_y": 0.5})
    painted = (y[0, 0] == P.OCCLUSION_FILL).nonzero()
    assert len(painted) == 10 * 10
    assert painted[:, 1].min() == 10 and painted[:, 1].max() == 19  # x centre 15, side 10
    assert painted[:, 0].min() == 15 and painted[:, 0].max() == 24


def test_bad_settings_name_the_field():
    with pytest.raises(EvalError, match="blur strength 9") as error:
        P.Settings(blur=9)
    assert error.value.field == "blur"
    with pytest.raises(EvalError, match="unknown what-if setting"):
        P.Settings.from_mapping({"sharpen": 1})
    with pytest.raises(EvalError, match="unknown perturbation"):
        P.perturb(_images(), {"sharpen": 1.0})
    with pytest.raises(EvalError, match="outside"):
        P.perturb(_images(), {"scale": [-0.9, 0.0, 0.0]})


def test_settings_round_trip_and_describe():
    settings = P.Settings.from_mapping({"blur": "2", "occlusion": 0.2, "occlusion_x": 0.1})
    assert settings.changed() == {"blur": 2.0, "occlusion": 0.2, "occlusion_x": 0.1}
    assert P.Settings.from_mapping(settings.changed()) == settings
    assert "blur 2" in settings.describe() and P.Settings().describe() == "no perturbation"
    assert P.Settings().is_identity and not settings.is_identity


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _images(4, 48, 64)
    strengths = {"blur": [0.0, 1.5, 3.0, 0.5], "noise": [0.1, 0.0, 0.2, 0.05], "jpeg": [50.0, 0.0, 80.0, 20.0],
                 "rotation": [10.0, 0.0, -30.0, 5.0], "scale": [0.0, 0.2, -0.2, 0.0], "brightness": [0.1, -0.2, 0, 0],
                 "contrast": [0.0, 0.3, -0.3, 0.0], "occlusion": [0.2, 0.0, 0.3, 0.0]}
    cpu = P.perturb(x, strengths, keys=[1, 2, 3, 4])
    gpu = P.perturb(x.cuda(), strengths, keys=[1, 2, 3, 4]).cpu()
    # JPEG rounds to 8 bits: a coefficient at a rounding boundary may land one level apart.
    assert float((cpu - gpu).abs().mean()) < 1e-4
    assert float((cpu - gpu).abs().max()) <= 3 / 255 + 1e-6
