"""Tests for geo_contrast.augment against independent numpy re-derivations of torchvision's formulas."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from geo_contrast import augment

# torchvision's Normalize constants for ImageNet, written out independently of the module.
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ------------------------------------------------------------------------------------------------------------------
# numpy references (torchvision.transforms functional_tensor definitions, channels-last)


def np_gray(img):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return (0.299 * r + 0.587 * g + 0.114 * b)[..., None]


def np_blend(img1, img2, ratio):
    return np.clip(ratio * img1 + (1.0 - ratio) * img2, 0.0, 1.0)


def np_brightness(img, factor):
    return np_blend(img, np.zeros_like(img), factor)


def np_contrast(img, factor):
    return np_blend(img, np.mean(np_gray(img)), factor)


def np_saturation(img, factor):
    return np_blend(img, np_gray(img), factor)


def np_rgb2hsv(img):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc, minc = img.max(-1), img.min(-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / np.where(eqc, 1.0, maxc)
    cr_divisor = np.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = np.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return np.stack([h, s, maxc], -1)


def np_hsv2rgb(hsv):
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(np.int32) % 6
    p = np.clip(v * (1.0 - s), 0.0, 1.0)
    q = np.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = np.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


def np_hue(img, hue_factor):
    hsv = np_rgb2hsv(img)
    hsv[..., 0] = (hsv[..., 0] + hue_factor) % 1.0
    return np_hsv2rgb(hsv)


def np_gaussian_blur(img, sigma):
    radius = math.ceil(3 * sigma)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(img, [(radius, radius), (radius, radius), (0, 0)], mode="reflect")
    height, width = img.shape[:2]
    rows = sum(kernel[k] * padded[k : k + height] for k in range(2 * radius + 1))
    return sum(kernel[k] * rows[:, k : k + width] for k in range(2 * radius + 1))


def np_jitter(img, factors, order):
    ops = [np_brightness, np_contrast, np_saturation, np_hue]
    for index in order:
        img = ops[index](img, factors[index])
    return img


def torchvision_crop_windows(height, width, n, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params run n times (sequential-loop logic, vectorised over the n runs)."""
    area = height * width
    target = area * rng.uniform(scale[0], scale[1], (n, 10))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, 10)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(1)
    found = ok.any(1)
    pick = lambda a: a[np.arange(n), first]
    in_ratio = width / height
    fb_w = round(height * ratio[1]) if in_ratio > ratio[1] else width
    fb_h = round(width / ratio[0]) if in_ratio < ratio[0] else height
    return np.where(found, pick(h), fb_h), np.where(found, pick(w), fb_w), found


# ------------------------------------------------------------------------------------------------------------------
# helpers


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)


def smooth_uint8_image(height, width):
    """A smooth colourful image (JPEG-friendly, left-right asymmetric, no grey pixels)."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    rgb = np.stack([0.2 + 0.7 * x, 0.3 + 0.6 * y, 0.9 - 0.5 * x * y], -1)
    return np.round(rgb * 255).astype(np.uint8)


def jpeg_bytes(image, quality=95):
    return tf.io.encode_jpeg(image, quality=quality)


def seeds(n, salt=0):
    return [tf.constant([i, salt], tf.int64) for i in range(n)]


def mapped(fn, n, salt=0):
    """fn(seed) for seeds (i, salt), i < n, run as a tf.data map (graph mode, like the real pipeline)."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, tf.constant(salt, tf.int64)])))
    return next(iter(ds.batch(n)))


def binomial_bounds(n, p, sigmas=5.0):
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


def assert_binomial(count, n, p):
    low, high = binomial_bounds(n, p)
    assert low <= count <= high, f"count {count} of {n} outside 5-sigma bounds for p={p}: [{low:.1f}, {high:.1f}]"


def ks_distance(sample, reference):
    """Largest gap between the two empirical CDFs."""
    grid = np.union1d(sample, reference)
    cdf = lambda a: np.searchsorted(np.sort(a), grid, side="right") / len(a)
    return np.abs(cdf(sample) - cdf(reference)).max()


# ------------------------------------------------------------------------------------------------------------------
# normalisation


def test_normalize_matches_imagenet_constants_and_round_trips():
    img = random_image(4, 5)
    out = augment.normalize(img).numpy()
    np.testing.assert_allclose(out, (img - MEAN) / STD, atol=1e-6)
    np.testing.assert_allclose(augment.denormalize(out).numpy(), img, atol=1e-6)
    np.testing.assert_allclose(augment.IMAGENET_MEAN, MEAN)
    np.testing.assert_allclose(augment.IMAGENET_STD, STD)


# ------------------------------------------------------------------------------------------------------------------
# colour operations with fixed factors


def colour_test_image():
    """Random pixels plus grey pixels and ties between channels (the HSV edge cases)."""
    img = random_image(6, 7, seed=1)
    img[0, 0] = [0.5, 0.5, 0.5]
    img[0, 1] = [0.7, 0.7, 0.2]
    img[0, 2] = [0.1, 0.6, 0.6]
    img[0, 3] = [0.0, 0.0, 0.0]
    img[0, 4] = [1.0, 1.0, 1.0]
    return img


def test_grayscale_matches_luma_formula():
    img = colour_test_image()
    np.testing.assert_allclose(augment.rgb_to_grayscale(img).numpy(), np_gray(img), atol=1e-6)


@pytest.mark.parametrize("factor", [0.6, 0.95, 1.4])
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blend_ops_match_torchvision(name, factor):
    img = colour_test_image()
    ours = getattr(augment, f"adjust_{name}")(img, factor).numpy()
    reference = {"brightness": np_brightness, "contrast": np_contrast, "saturation": np_saturation}[name]
    np.testing.assert_allclose(ours, reference(img.astype(np.float64), factor), atol=1e-5)


@pytest.mark.parametrize("hue", [-0.1, -0.03, 0.0, 0.07, 0.1, 0.45])
def test_hue_matches_torchvision_hsv_round_trip(hue):
    img = colour_test_image()
    np.testing.assert_allclose(
        augment.adjust_hue(img, hue).numpy(), np_hue(img.astype(np.float64), hue), atol=1e-5
    )


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2), (2, 3, 1, 0)])
def test_color_jitter_applies_ops_in_given_order(order):
    img = colour_test_image()
    factors = (1.3, 0.7, 1.25, 0.08)
    ours = augment.color_jitter(img, *factors, tf.constant(order, tf.int32)).numpy()
    np.testing.assert_allclose(ours, np_jitter(img.astype(np.float64), factors, order), atol=1e-5)


def test_color_jitter_order_matters():
    img = colour_test_image()
    factors = (1.3, 0.7, 1.25, 0.08)
    a = augment.color_jitter(img, *factors, tf.constant([0, 1, 2, 3])).numpy()
    b = augment.color_jitter(img, *factors, tf.constant([3, 2, 1, 0])).numpy()
    assert np.abs(a - b).max() > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# Gaussian blur


def test_blur_of_delta_is_normalised_gaussian_kernel():
    img = np.zeros((15, 15, 3), np.float32)
    img[7, 7] = 1.0
    sigma = 1.3
    out = augment.gaussian_blur(img, sigma, max_sigma=2.0).numpy()
    x = np.arange(-4, 5)  # radius ceil(3 * 1.3) = 4
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    expected = np.zeros((15, 15))
    expected[3:12, 3:12] = np.outer(kernel, kernel)
    for channel in range(3):
        np.testing.assert_allclose(out[..., channel], expected, atol=1e-6)
    assert out.sum() == pytest.approx(3.0, abs=1e-5)


@pytest.mark.parametrize("sigma", [0.1, 0.9, 2.0])
def test_blur_matches_reflect_padded_numpy(sigma):
    img = random_image(12, 16, seed=2)
    out = augment.gaussian_blur(img, sigma, max_sigma=2.0).numpy()
    np.testing.assert_allclose(out, np_gaussian_blur(img.astype(np.float64), sigma), atol=1e-5)


def test_blur_rejects_sigma_above_max_and_tiny_images():
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_sigma"):
        augment.gaussian_blur(random_image(12, 12), 2.5, max_sigma=2.0)
    with pytest.raises(ValueError, match="gaussian_blur"):
        augment.gaussian_blur(random_image(5, 5), 1.0, max_sigma=2.0)


# ------------------------------------------------------------------------------------------------------------------
# MoCo-v2 parameters and their application


def params(**overrides):
    base = dict(
        jitter=False,
        brightness=1.0,
        contrast=1.0,
        saturation=1.0,
        hue=0.0,
        order=[0, 1, 2, 3],
        grayscale=False,
        blur=False,
        blur_sigma=1.0,
        flip=False,
    )
    base.update(overrides)
    return augment.MocoV2Params(**{k: tf.constant(v) for k, v in base.items()})


def test_apply_params_matches_numpy_composition():
    img = random_image(32, 32, seed=3)
    p = params(
        jitter=True,
        brightness=1.3,
        contrast=0.7,
        saturation=1.2,
        hue=0.05,
        order=[3, 1, 0, 2],
        blur=True,
        blur_sigma=1.5,
        flip=True,
    )
    # blur_reference_size 64 on a 32 px image: sigma is halved to 0.75 px.
    out = augment.apply_moco_v2_params(img, p, max_blur_sigma=2.0, blur_reference_size=64).numpy()
    expected = np_jitter(img.astype(np.float64), (1.3, 0.7, 1.2, 0.05), (3, 1, 0, 2))
    expected = np_gaussian_blur(expected, 0.75)[:, ::-1]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_apply_params_grayscale_only():
    img = random_image(16, 16, seed=4)
    out = augment.apply_moco_v2_params(img, params(grayscale=True)).numpy()
    np.testing.assert_allclose(out, np.repeat(np_gray(img), 3, -1), atol=1e-6)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_apply_params_identity_when_nothing_drawn():
    img = random_image(16, 16, seed=5)
    np.testing.assert_array_equal(augment.apply_moco_v2_params(img, params()).numpy(), img)


def test_sampled_decisions_have_moco_v2_probabilities_and_ranges():
    n = 1000
    p = mapped(augment.sample_moco_v2_params, n, salt=11)
    jitter, gray, blur, flip = (p.jitter.numpy(), p.grayscale.numpy(), p.blur.numpy(), p.flip.numpy())
    assert_binomial(jitter.sum(), n, 0.8)
    assert_binomial(gray.sum(), n, 0.2)
    assert_binomial(blur.sum(), n, 0.5)
    assert_binomial(flip.sum(), n, 0.5)
    # Independent sub-seeds: joint frequencies factorise (one shared seed would give P(gray & flip) = 0.2).
    assert_binomial((gray & flip).sum(), n, 0.1)
    assert_binomial((jitter & blur).sum(), n, 0.4)
    for factor in (p.brightness, p.contrast, p.saturation):
        assert 0.6 <= factor.numpy().min() and factor.numpy().max() <= 1.4
        assert abs(factor.numpy().mean() - 1.0) < 5 * 0.8 / math.sqrt(12 * n)
    assert -0.1 <= p.hue.numpy().min() and p.hue.numpy().max() <= 0.1
    assert 0.1 <= p.blur_sigma.numpy().min() and p.blur_sigma.numpy().max() <= 2.0
    assert abs(p.blur_sigma.numpy().mean() - 1.05) < 5 * 1.9 / math.sqrt(12 * n)
    orders = p.order.numpy()
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    assert len({tuple(o) for o in orders}) == 24


def test_compiled_augmentation_equals_eager_ops():
    """`moco_v2_augment` runs under XLA; its pixels must be those of the eager TF ops tested above."""
    img = tf.constant(random_image(32, 32, seed=8))
    for seed in seeds(16, salt=9):
        params = augment.sample_moco_v2_params(seed)
        eager = augment.apply_moco_v2_params(img, params, blur_reference_size=32).numpy() * 255
        compiled = augment.moco_v2_augment(img, seed, blur_reference_size=32).numpy()
        assert compiled.dtype == np.uint8
        # Rounded to whole grey levels: float round-off may tip a value lying at *.5 to the other side.
        assert np.abs(compiled - eager).max() <= 0.5 + 1e-3


def test_augment_uses_sampled_grayscale_decision():
    img = tf.constant(random_image(16, 16, seed=6))
    n = 200
    out = mapped(lambda s: augment.moco_v2_augment(img, s, blur_reference_size=16), n).numpy()
    gray_drawn = mapped(augment.sample_moco_v2_params, n).grayscale.numpy()
    channels_equal = (out[..., 0] == out[..., 1]).all((1, 2)) & (out[..., 0] == out[..., 2]).all((1, 2))
    np.testing.assert_array_equal(channels_equal, gray_drawn)
    assert_binomial(channels_equal.sum(), n, 0.2)


# ------------------------------------------------------------------------------------------------------------------
# RandomResizedCrop


def crop_windows(height, width, n, salt=0):
    return mapped(lambda s: augment.random_resized_crop_window(s, height, width), n, salt).numpy()


@pytest.mark.parametrize("height,width", [(200, 300), (256, 256)])
def test_crop_window_statistics_match_torchvision(height, width):
    n = 4000
    y, x, h, w = crop_windows(height, width, n, salt=3).T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
    area = h * w / (height * width)
    log_ratio = np.log(w / h)
    rounding = 0.5 / h.min() + 0.5 / w.min()  # sides are rounded to whole pixels
    assert area.min() >= 0.2 - 2 * rounding and area.max() <= 1.0
    assert log_ratio.min() >= math.log(3 / 4) - rounding and log_ratio.max() <= math.log(4 / 3) + rounding
    assert area.min() < 0.25 and area.max() > 0.85  # the whole range is reached

    # Same distributions as torchvision's algorithm (Kolmogorov-Smirnov distance; the bound is the two-sided
    # critical value for p ~ 1e-4, conservative for these discrete distributions).
    ref_h, ref_w, _ = torchvision_crop_windows(height, width, 200_000, np.random.default_rng(0))
    ref_area, ref_log_ratio = ref_h * ref_w / (height * width), np.log(ref_w / ref_h)
    for ours, ref in ((area, ref_area), (log_ratio, ref_log_ratio)):
        assert ks_distance(ours, ref) < 2.3 / math.sqrt(n)
    # Offsets are uniform over the valid positions: (x + 0.5) / (#positions) has mean 1/2, variance ~1/12.
    movable = w < width
    unit_x = (x[movable] + 0.5) / (width - w[movable] + 1)
    assert abs(unit_x.mean() - 0.5) < 5 / math.sqrt(12 * movable.sum())


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (10, 1000, [0, 493, 10, 13]),  # too wide: h = 10, w = round(10 * 4/3), centred
        (1000, 10, [493, 0, 13, 10]),  # too tall: w = 10, h = round(10 / (3/4)), centred
    ],
)
def test_crop_window_falls_back_to_clamped_centre_crop(height, width, expected):
    ref_h, ref_w, found = torchvision_crop_windows(height, width, 1000, np.random.default_rng(1))
    assert not found.any() and (ref_h == expected[2]).all() and (ref_w == expected[3]).all()
    for window in crop_windows(height, width, 5):
        np.testing.assert_array_equal(window, expected)


def test_crop_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        augment.random_resized_crop_window(tf.constant([1, 2]), 10, 10, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        augment.random_resized_crop_window(tf.constant([1, 2]), 10, 10, ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="seed"):
        augment.random_resized_crop_window(tf.constant([1, 2, 3]), 10, 10)
    with pytest.raises(ValueError, match="seed"):
        augment.random_resized_crop_window(tf.constant([1.0, 2.0]), 10, 10)


# 40: every crop shrinks (antialiased resize); 112: most crops are enlarged (plain bilinear), where PIL's 8-bit
# fixed-point interpolation weights add up to one more grey level on a few pixels.
@pytest.mark.parametrize("size,grey_levels", [(40, 1.5), (112, 2.5)])
def test_decode_and_crop_equals_full_decode_then_crop_and_pil_resize(size, grey_levels):
    image = smooth_uint8_image(96, 128)
    encoded = jpeg_bytes(image)
    decoded = tf.io.decode_jpeg(encoded).numpy()
    enlarged = 0
    for seed in seeds(8, salt=5):
        y, x, h, w = augment.random_resized_crop_window(seed, 96, 128).numpy()
        enlarged += max(h, w) <= size
        out = augment.decode_random_resized_crop(encoded, seed, size).numpy()
        assert out.shape == (size, size, 3) and out.dtype == np.float32
        crop = decoded[y : y + h, x : x + w]
        pil = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)) / 255.0
        # PIL rounds its output to uint8; the rest is the JPEG decoder's block-edge differences.
        np.testing.assert_allclose(out, pil, atol=grey_levels / 255)
    assert enlarged == 0 if size == 40 else enlarged >= 6  # both paths are exercised


# ------------------------------------------------------------------------------------------------------------------
# regions: the part of the stored image a view is cut from


def _box(x, y, w, h, width, height):
    """A pixel box (x, y, w, h) as the builder stores it: (ymin, xmin, ymax, xmax) fractions of the image."""
    return [y / height, x / width, (y + h) / height, (x + w) / width]


# (box x, y, w, h; image width, height; context) -> (left, top, side), worked out by hand from the rule the fMoW
# builder cropped with before it stored whole images (and the README states).
@pytest.mark.parametrize("box,width,height,context,expected", [
    ((40, 50, 20, 10), 200, 100, 2.0, (30, 35, 40)),     # Fits: centred on (50, 55).
    ((2, 90, 10, 8), 200, 100, 3.0, (0, 70, 30)),        # At a corner: shifted inside.
    ((10, 10, 60, 20), 200, 50, 2.0, (0, -35, 120)),     # Taller than the image: centred, padded.
    ((0, 0, 90, 90), 100, 60, 2.0, (0, -20, 100)),       # Capped at the image's longer side.
    ((5, 5, 0, 0), 100, 100, 2.0, (4, 4, 2)),            # Degenerate box: still >= 1 px (here 2).
])
def test_box_square_follows_the_documented_rule(box, width, height, context, expected):
    window = augment.region_window("box_square", height, width, tf.constant(_box(*box, width, height)), context)
    left, top, side = expected
    assert window.numpy().tolist() == [top, left, side, side]


@pytest.mark.parametrize("height,width,expected", [(60, 100, [0, 20, 60, 60]), (101, 40, [30, 0, 40, 40]),
                                                   (50, 50, [0, 0, 50, 50]), (61, 60, [0, 0, 60, 60])])
def test_centre_square_is_torchvisions_center_crop(height, width, expected):
    # torchvision: top = int(round((h - side) / 2)), half to even: (61 - 60) / 2 = 0.5 -> 0.
    assert augment.region_window("center_square", height, width).numpy().tolist() == expected
    assert augment.region_window("whole", height, width).numpy().tolist() == [0, 0, height, width]


def test_decode_window_pads_what_lies_outside_the_image_with_black():
    image = smooth_uint8_image(30, 40)
    decoded = tf.io.decode_jpeg(jpeg_bytes(image)).numpy() / 255.0
    window = tf.constant([-5, 10, 40, 20])  # 5 rows above the image, 5 below it.
    out = augment.decode_window(jpeg_bytes(image), window, tf.constant([30, 40])).numpy()
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out[:5], 0.0)
    np.testing.assert_array_equal(out[35:], 0.0)
    # The decoder's block edges differ by a grey level or two between a cropped and a whole decode.
    np.testing.assert_allclose(out[5:35], decoded[:, 10:30], atol=3 / 255)
    region = augment.decode_region(jpeg_bytes(image), "box_square", tf.constant(_box(15, 10, 10, 10, 40, 30)))
    np.testing.assert_allclose(region.numpy(), decoded[5:25, 10:30], atol=3 / 255)  # Inside: no padding.


def test_random_crop_of_a_region_lies_inside_it():
    """A crop of the centre square of a wide image never reaches its left or right margins."""
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, 30:70] = 255  # The centre square is white, the margins black.
    encoded = jpeg_bytes(image)
    reached_margins = 0
    for seed in seeds(20, salt=7):
        centre = augment.decode_random_resized_crop(encoded, seed, 16, (0.08, 1.0), region="center_square").numpy()
        assert centre.min() > 0.9, "a crop of the centre square took pixels of the margins"
        whole = augment.decode_random_resized_crop(encoded, seed, 16, (0.08, 1.0), region="whole").numpy()
        reached_margins += whole.min() < 0.5
    assert reached_margins >= 5  # The same seeds on the whole image do reach them.


def test_resize_without_antialiasing_only_where_it_changes_nothing():
    """`resize_bilinear` skips antialiasing on enlargements; TF's antialiased kernel must equal the plain one there,
    and differ (blur) where a side shrinks, so the shrink test is the one that matters."""
    image = tf.constant(random_image(30, 50, seed=10))
    plain = lambda x: augment.resize_bilinear(x, 60, shrinks=tf.constant(False)).numpy()
    smooth = lambda x: tf.image.resize(x, [60, 60], method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(plain(image), smooth(image), atol=1e-6)
    wide = tf.constant(random_image(30, 90, seed=11))  # 90 -> 60 shrinks
    assert np.abs(plain(wide) - smooth(wide)).max() > 0.05
    np.testing.assert_allclose(augment.resize_bilinear(wide, 60, shrinks=tf.constant(True)).numpy(), smooth(wide))


# ------------------------------------------------------------------------------------------------------------------
# full MoCo-v2 view


def test_view_is_deterministic_in_seed_and_graph_equals_eager():
    encoded = jpeg_bytes(smooth_uint8_image(64, 80))
    view = lambda s: augment.moco_v2_view(encoded, s, 24)
    a = view(tf.constant([3, 4], tf.int64)).numpy()
    np.testing.assert_array_equal(a, view(tf.constant([3, 4], tf.int64)).numpy())
    np.testing.assert_array_equal(a, view(tf.constant([3, 4], tf.int32)).numpy())
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    batch = mapped(view, 6).numpy().astype(np.int32)
    for i in range(6):
        np.testing.assert_array_equal(batch[i], view(tf.constant([i, 0], tf.int64)).numpy())
        for j in range(i):
            assert np.abs(batch[i] - batch[j]).max() > 2


# ------------------------------------------------------------------------------------------------------------------
# linear-evaluation views


def np_normalize(img):
    return (img - MEAN) / STD


@pytest.mark.parametrize(
    "height,width,top,left",
    [
        (80, 121, 8, 28),  # (121 - 64) / 2 = 28.5 rounds half to even, like torchvision's round()
        (121, 80, 28, 8),
        (80, 123, 8, 30),  # 29.5 -> 30
    ],
)
def test_eval_view_centre_crop_without_resampling(height, width, top, left):
    img = (random_image(height, width, seed=7) * 255).astype(np.uint8)
    out = augment.eval_view(img, 64, 80).numpy()
    np.testing.assert_allclose(out, np_normalize(img[top : top + 64, left : left + 64] / 255.0), atol=1e-5)


def test_eval_view_known_layout_after_downscale():
    # 200 x 300 red image with a green 100 x 100 square in the middle. Resize to 100 x 150 (factor 2), centre crop
    # 64 at (18, 43): the square covers crop rows/cols 7..56, the border is red.
    img = np.zeros((200, 300, 3), np.uint8)
    img[..., 0] = 255
    img[50:150, 100:200] = [0, 255, 0]
    out = augment.denormalize(augment.eval_view(img, 64, 100)).numpy()
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(out[10:54, 10:54], np.broadcast_to([0, 1, 0], (44, 44, 3)), atol=1e-5)
    for corner in (out[:5, :5], out[-5:, -5:], out[:5, -5:], out[-5:, :5]):
        np.testing.assert_allclose(corner, np.broadcast_to([1, 0, 0], corner.shape), atol=1e-5)


def test_eval_view_accepts_encoded_and_float_images():
    img = smooth_uint8_image(50, 70)
    from_uint8 = augment.eval_view(img, 32, 40).numpy()
    np.testing.assert_allclose(augment.eval_view(tf.io.encode_png(img), 32, 40).numpy(), from_uint8, atol=1e-6)
    np.testing.assert_allclose(augment.eval_view(img / np.float32(255), 32, 40).numpy(), from_uint8, atol=1e-5)
    np.testing.assert_allclose(augment.eval_view(jpeg_bytes(img), 32, 40).numpy(), from_uint8, atol=0.1)
    with pytest.raises(ValueError, match="size <= resize_size"):
        augment.eval_view(img, 48, 40)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        augment.eval_view(img[..., :2], 32, 40)


def test_train_view_lincls_is_a_random_crop_of_the_resized_image():
    img = (random_image(64, 96, seed=8) * 255).astype(np.uint8)
    encoded = tf.io.encode_png(img)
    offsets = set()
    for seed in seeds(12, salt=9):
        out = augment.train_view_lincls(encoded, seed, 48, 64).numpy()
        np.testing.assert_array_equal(out, augment.train_view_lincls(encoded, seed, 48, 64).numpy())
        pixels = np.round(augment.denormalize(out).numpy() * 255)
        matches = [
            (y, x) for y in range(17) for x in range(49) if np.array_equal(pixels, img[y : y + 48, x : x + 48])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 6
    assert augment.train_view_lincls(encoded, seeds(1)[0], 24, 32).shape == (24, 24, 3)
