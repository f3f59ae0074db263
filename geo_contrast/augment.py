"""Image augmentations for MoCo-v2 pretraining and linear evaluation, as pure TensorFlow ops.

Everything here runs inside `tf.data.Dataset.map`, so it is written for graph mode: no Python control flow on
tensor values (`tf.cond` / `tf.switch_case` / `tf.where` instead) and static output shapes where the caller fixes
them.

Randomness is *stateless*: every random function takes an explicit `seed` tensor (shape [2], int32 or int64) and is
a deterministic function of it. An input pipeline that derives the seed from (base seed, epoch, element index) is
therefore reproducible regardless of parallelism, prefetching, or restarts, which the TF global RNG and Python's
`random` cannot guarantee. Each random decision uses its own sub-seed from `tf.random.experimental.stateless_split`
so decisions are independent (reusing one seed for, say, the grayscale and flip coins would correlate them).

Semantics follow torchvision's transforms as used by MoCo-v2 (RandomResizedCrop, ColorJitter, RandomGrayscale,
GaussianBlur, RandomHorizontalFlip, Normalize) and the released linear-evaluation script (Resize + RandomCrop /
CenterCrop). The fixed-parameter operations are public so tests can compare them with independent re-derivations
of torchvision's formulas. Two deliberate differences from MoCo-v2's PIL pipeline are documented where they occur:
colour ops work on float32 (no uint8 rounding between ops, as torchvision does on float tensors; a pretraining view
is rounded to uint8 once, at the end) and the Gaussian blur is an exact separable Gaussian rather than PIL's box-blur
approximation.
"""

import math
from typing import NamedTuple

import tensorflow as tf

# The pretraining views end as uint8 pixels, standardised on the accelerator (`pixels.standardize`); the
# linear-evaluation views, decoded once and cached, are normalised here with the same statistics.
from geo_contrast.pixels import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601-2 luma weights (what PIL's convert("L") uses, and hence MoCo-v2's RandomGrayscale on PIL images;
# torchvision's tensor path truncates the red weight to 0.2989).
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# torchvision.transforms.RandomResizedCrop tries this many random windows before falling back.
_CROP_ATTEMPTS = 10

# MoCo-v2's ColorJitter(0.4, 0.4, 0.4, 0.1) and the probabilities of its augmentation list.
_JITTER_STRENGTH = 0.4
_HUE_STRENGTH = 0.1
_P_JITTER = 0.8
_P_GRAYSCALE = 0.2
_P_BLUR = 0.5
_P_FLIP = 0.5


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers


def _check_seed(seed, where):
    """Checks `seed` is a [2] int32/int64 seed (naming the caller on error) and returns it as int64.

    The cast matters: `stateless_split` draws its sub-seeds in the seed's dtype, so without it the same seed values
    given as int32 and as int64 would produce different augmentations.
    """
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"{where}: seed must be int32 or int64, got {seed.dtype.name}")
    if seed.shape.rank is not None and seed.shape.as_list() != [2]:
        raise ValueError(f"{where}: seed must have shape [2], got {seed.shape}")
    return tf.cast(seed, tf.int64)


def _check_rgb(image, where):
    """Returns `image` as a tensor after checking it is [H, W, 3] (static rank and channels)."""
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3 or image.shape[-1] != 3:
        raise ValueError(f"{where}: image must have shape [H, W, 3], got {image.shape}")
    return image


def _check_range(name, bounds, where, *, upper=None):
    """Checks `bounds` is a (low, high) pair with 0 < low <= high (<= upper)."""
    low, high = bounds
    if not 0 < low <= high or (upper is not None and high > upper):
        limit = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{where}: {name} must satisfy 0 < low <= high{limit}, got {tuple(bounds)}")


# --------------------------------------------------------------------------------------------------------------------
# Normalisation


def normalize(image):
    """Maps a [0, 1] RGB image to ImageNet-standardised values, (x - mean) / std per channel."""
    image = tf.convert_to_tensor(image, tf.float32)
    return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def denormalize(image):
    """Inverse of `normalize`: back to [0, 1]-scale RGB (for plots and checks)."""
    image = tf.convert_to_tensor(image, tf.float32)
    return image * tf.constant(IMAGENET_STD) + tf.constant(IMAGENET_MEAN)


# --------------------------------------------------------------------------------------------------------------------
# RandomResizedCrop


def random_resized_crop_window(seed, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Samples a crop window with torchvision `RandomResizedCrop.get_params` semantics.

    Up to 10 candidates: area fraction ~ U[scale], aspect ratio (w/h) log-uniform in `ratio`, sides rounded
    (half to even, like Python's `round`). The first candidate that fits the image is used, at a uniformly random
    offset. If none fits, the fallback is torchvision's: the largest centred crop whose aspect ratio is clamped to
    `ratio` (the whole image when its own ratio is inside `ratio`). All 10 candidates are drawn at once and the
    first valid one selected, which has the same distribution as the sequential loop and needs no while loop.

    Depends only on (seed, height, width), so a caller can recompute the window (tests use this).

    Args:
      seed: [2] int32/int64 stateless seed.
      height, width: image size (scalar int tensors or ints).
      scale: (low, high) range of the crop area as a fraction of the image area.
      ratio: (low, high) range of the crop aspect ratio width / height.

    Returns:
      int32 [4] tensor (offset_y, offset_x, crop_height, crop_width), the layout `tf.image.decode_and_crop_jpeg`
      expects.
    """
    where = "random_resized_crop_window"
    seed = _check_seed(seed, where)
    _check_range("scale", scale, where, upper=1.0)
    _check_range("ratio", ratio, where)
    area_seed, ratio_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))

    # float64 mirrors torchvision's Python-float arithmetic, so rounding ties land the same way.
    height = tf.cast(height, tf.float64)
    width = tf.cast(width, tf.float64)
    area = height * width
    target_area = area * tf.random.stateless_uniform(
        [_CROP_ATTEMPTS], area_seed, minval=scale[0], maxval=scale[1], dtype=tf.float64
    )
    aspect = tf.exp(
        tf.random.stateless_uniform(
            [_CROP_ATTEMPTS], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1]), dtype=tf.float64
        )
    )
    crop_w = tf.round(tf.sqrt(target_area * aspect))
    crop_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index 0 when nothing fits; then `found` is False.
    found = tf.reduce_any(fits)

    # Fallback: centre crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)

    crop_h = tf.where(found, tf.gather(crop_h, first), fallback_h)
    crop_w = tf.where(found, tf.gather(crop_w, first), fallback_w)
    offset_u = tf.random.stateless_uniform([2], offset_seed, dtype=tf.float64)
    random_y = tf.floor(offset_u[0] * (height - crop_h + 1))
    random_x = tf.floor(offset_u[1] * (width - crop_w + 1))
    offset_y = tf.where(found, random_y, tf.floor((height - crop_h) / 2))
    offset_x = tf.where(found, random_x, tf.floor((width - crop_w) / 2))
    return tf.cast(tf.stack([offset_y, offset_x, crop_h, crop_w]), tf.int32)


# --------------------------------------------------------------------------------------------------------------------
# Regions: the part of a stored image a view is cut from


# "whole": the whole image, as the released non-temporal path crops it (Resize(448), then RandomResizedCrop);
# "center_square": its centre square, as the released temporal path (Resize(448), CenterCrop(448), then RRC);
# "box_square": a square around the labelled box (side = box_context x the box's longer side), MoCo-v2's recipe
# on object-centred crops. The first two are scale-free (a crop's area fraction and aspect ratio do not change
# when the image is resized first), so the stored image's resolution stands in for the released Resize(448).
REGIONS = ("whole", "center_square", "box_square")


def region_window(region, height, width, box=None, box_context=2.0):
    """The region of an image of `height` x `width` as int32 [4] (top, left, region height, region width).

    `box`: the labelled box as (ymin, xmin, ymax, xmax) fractions of the image, for "box_square". Its square
    follows the rule the fMoW builder used to crop at build time: side = round(box_context * the box's longer
    side), at least 1 and at most the image's longer side; centred on the box (its centre clamped into the image);
    along an axis where the image is at least that long, shifted to lie inside it; along a shorter axis, centred
    on the image, the overhang (negative top/left) read as zero padding (`decode_window`).
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    if region == "whole":
        return tf.stack([0, 0, height, width])
    if region == "center_square":
        side = tf.minimum(height, width)
        # torchvision CenterCrop: int(round((extent - side) / 2)), half to even.
        top = tf.cast(tf.round(tf.cast(height - side, tf.float64) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(width - side, tf.float64) / 2), tf.int32)
        return tf.stack([top, left, side, side])
    box = tf.cast(box, tf.float64)
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    box_h, box_w = (box[2] - box[0]) * h, (box[3] - box[1]) * w
    side = tf.round(box_context * tf.maximum(tf.maximum(box_h, box_w), 1.0))
    side = tf.clip_by_value(side, 1.0, tf.maximum(h, w))

    def place(centre, extent):
        inside = tf.clip_by_value(tf.round(centre - side / 2), 0.0, extent - side)
        return tf.where(side <= extent, inside, -tf.math.floordiv(side - extent, 2.0))

    top = place(tf.clip_by_value((box[0] + box[2]) / 2 * h, 0.0, h), h)
    left = place(tf.clip_by_value((box[1] + box[3]) / 2 * w, 0.0, w), w)
    return tf.cast(tf.stack([top, left, side, side]), tf.int32)


def decode_window(jpeg_bytes, window, image_shape, may_overhang=True):
    """Decodes `window` (top, left, height, width) of a JPEG as float32 [0, 1]; the part of the window outside
    the image ([height, width] `image_shape`) is zero (black) padding. Only the window's pixels inside the image
    are decoded (`tf.image.decode_and_crop_jpeg`): for large images much cheaper than decoding them whole.
    `may_overhang=False` (a window known to lie inside the image) skips the padding's ops."""
    if not may_overhang:
        return tf.image.convert_image_dtype(tf.image.decode_and_crop_jpeg(jpeg_bytes, window, channels=3),
                                            tf.float32)
    top, left, height, width = tf.unstack(window)
    inner_top, inner_left = tf.maximum(top, 0), tf.maximum(left, 0)
    inner_bottom = tf.minimum(top + height, image_shape[0])
    inner_right = tf.minimum(left + width, image_shape[1])
    inner = tf.stack([inner_top, inner_left, inner_bottom - inner_top, inner_right - inner_left])
    pixels = tf.image.convert_image_dtype(tf.image.decode_and_crop_jpeg(jpeg_bytes, inner, channels=3), tf.float32)
    padding = [[inner_top - top, top + height - inner_bottom], [inner_left - left, left + width - inner_right],
               [0, 0]]
    return tf.pad(pixels, padding)


def decode_region(jpeg_bytes, region, box=None, box_context=2.0):
    """The `region` of an encoded JPEG (see `region_window`), decoded as float32 [H, W, 3] in [0, 1]."""
    shape = tf.image.extract_jpeg_shape(jpeg_bytes)
    return decode_window(jpeg_bytes, region_window(region, shape[0], shape[1], box, box_context), shape,
                         may_overhang=region == "box_square")


def decode_random_resized_crop(jpeg_bytes, seed, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), *, region="whole",
                               box=None, box_context=2.0):
    """Decodes a random crop of a region of a JPEG and resizes it to `size` x `size` (torchvision
    RandomResizedCrop applied to the region: `region_window`).

    Only the crop window is decoded (`decode_window`), which for large satellite images is much cheaper than
    decoding the whole image and then cropping. The window comes from `random_resized_crop_window` on the
    region's size, from the header-only shape (`tf.image.extract_jpeg_shape`). The resize is bilinear with
    antialiasing, matching PIL's bilinear resize that torchvision applies to PIL images when downscaling.

    Returns:
      float32 [size, size, 3] in [0, 1].
    """
    seed = _check_seed(seed, "decode_random_resized_crop")
    shape = tf.image.extract_jpeg_shape(jpeg_bytes)
    top, left, height, width = tf.unstack(region_window(region, shape[0], shape[1], box, box_context))
    crop_top, crop_left, crop_height, crop_width = tf.unstack(
        random_resized_crop_window(seed, height, width, scale, ratio))
    window = tf.stack([top + crop_top, left + crop_left, crop_height, crop_width])
    crop = decode_window(jpeg_bytes, window, shape, may_overhang=region == "box_square")
    return resize_bilinear(crop, size, shrinks=tf.maximum(crop_height, crop_width) > size)


def resize_bilinear(image, size, shrinks):
    """Bilinear resize to `size` x `size`, antialiased (PIL's bilinear) only where it `shrinks` a side.

    When no side shrinks, the antialiasing kernel is the plain bilinear one and both give the same pixels, but the
    antialiased kernel costs ~3x as much; with MoCo-v2's crop scales most random crops are enlarged.
    """
    resized = tf.cond(
        shrinks,
        lambda: tf.image.resize(image, [size, size], method="bilinear", antialias=True),
        lambda: tf.image.resize(image, [size, size], method="bilinear"),
    )
    return tf.ensure_shape(resized, [size, size, image.shape[-1]])


# --------------------------------------------------------------------------------------------------------------------
# Fixed-parameter colour and blur operations (torchvision's float-tensor formulas)


def rgb_to_grayscale(image):
    """ITU-R 601-2 luma of an RGB image, [..., 3] -> [..., 1]."""
    image = tf.convert_to_tensor(image)
    return tf.tensordot(image, tf.constant(_LUMA_WEIGHTS, image.dtype), axes=[[-1], [0]])[..., None]


def _blend(image, other, factor):
    """torchvision `_blend` for float images: factor * image + (1 - factor) * other, clipped to [0, 1]."""
    return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
    """Scales intensities by `factor` (blend with black), clipped to [0, 1]."""
    return _blend(image, tf.zeros_like(image), factor)


def adjust_contrast(image, factor):
    """Blends with the mean grey level of the image (a scalar over all pixels), clipped to [0, 1].

    Note `tf.image.adjust_contrast` uses per-channel means instead, which shifts colours; torchvision does not.
    """
    return _blend(image, tf.reduce_mean(rgb_to_grayscale(image)), factor)


def adjust_saturation(image, factor):
    """Blends with the image's grayscale version, clipped to [0, 1].

    Note `tf.image.adjust_saturation` scales the HSV saturation instead, a different operation.
    """
    return _blend(image, rgb_to_grayscale(image), factor)


def adjust_hue(image, hue_shift):
    """Rotates the HSV hue by `hue_shift` turns (torchvision's hue_factor), wrapping around.

    `tf.image.adjust_hue` performs the same RGB -> HSV -> RGB round trip with the same hexcone model (the tests
    check it against torchvision's `_rgb2hsv` / `_hsv2rgb` formulas); the clip only removes float round-off.
    """
    return tf.clip_by_value(tf.image.adjust_hue(image, hue_shift), 0.0, 1.0)


def color_jitter(image, brightness, contrast, saturation, hue, order):
    """Applies the four ColorJitter operations with fixed factors in the given order.

    Args:
      image: [H, W, 3] float in [0, 1].
      brightness, contrast, saturation: blend factors (1 = identity).
      hue: hue shift in turns (0 = identity).
      order: int32 [4], a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue); torchvision applies the
        operations in a random order (`torch.randperm(4)`), so the order is an input here.
    """

    def apply_op(image, op_index):
        return tf.switch_case(
            op_index,
            [
                lambda: adjust_brightness(image, brightness),
                lambda: adjust_contrast(image, contrast),
                lambda: adjust_saturation(image, saturation),
                lambda: adjust_hue(image, hue),
            ],
        )

    for position in range(4):  # Static loop over positions; the operation at each position is a runtime switch.
        image = apply_op(image, order[position])
    return image


def gaussian_blur(image, sigma, max_sigma):
    """Separable Gaussian blur with reflect padding; radius ceil(3 * sigma).

    The kernel is exp(-x^2 / (2 sigma^2)) for |x| <= ceil(3 sigma), normalised to sum 1 (torchvision's
    `_get_gaussian_kernel1d` with kernel size 2 ceil(3 sigma) + 1). `sigma` is a runtime value but graph shapes must
    be static, so the kernel always spans the radius for `max_sigma` and the taps beyond ceil(3 sigma) are zero.
    Padding is 'reflect' (edge pixel not repeated), as torchvision's gaussian_blur.

    Each pass is a weighted sum of shifted slices rather than a depthwise convolution: under XLA (see
    `moco_v2_augment`) the sum fuses into one loop, while XLA's CPU depthwise convolution is ~40x slower.

    Args:
      image: [H, W, 3] float with static H, W larger than ceil(3 * max_sigma).
      sigma: scalar float tensor, blur standard deviation in pixels, 0 < sigma <= max_sigma.
      max_sigma: Python float, the largest sigma this call may receive.
    """
    where = "gaussian_blur"
    image = _check_rgb(image, where)
    if max_sigma <= 0:
        raise ValueError(f"{where}: max_sigma must be positive, got {max_sigma}")
    max_radius = math.ceil(3 * max_sigma)
    height, width = image.shape[0], image.shape[1]
    if height is None or width is None or min(height, width) <= max_radius:
        raise ValueError(
            f"{where}: image must have static height and width > {max_radius} (3 * max_sigma) for "
            f"reflect padding, got {image.shape}"
        )
    sigma = tf.cast(sigma, tf.float32)
    if tf.executing_eagerly():  # XLA drops Assert ops, with a warning on the console; its caller (the compiled
        # `_apply_to_uint8`) draws sigma <= max_sigma by construction.
        tf.debugging.assert_less_equal(
            sigma, tf.constant(max_sigma, tf.float32), message=f"{where}: sigma exceeds max_sigma={max_sigma}"
        )
    taps = tf.range(-max_radius, max_radius + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(taps / sigma))
    weights = tf.where(tf.abs(taps) <= tf.math.ceil(3 * sigma), weights, 0.0)
    weights /= tf.reduce_sum(weights)

    def blur_axis(x, axis):
        pad = [[0, 0]] * 3
        pad[axis] = [max_radius, max_radius]
        padded = tf.pad(x, pad, mode="REFLECT")
        length = x.shape[axis]
        shifted = lambda k: padded[k : k + length] if axis == 0 else padded[:, k : k + length]
        return tf.add_n([weights[k] * shifted(k) for k in range(2 * max_radius + 1)])

    return blur_axis(blur_axis(tf.cast(image, tf.float32), 0), 1)


# --------------------------------------------------------------------------------------------------------------------
# MoCo-v2 augmentation: sample the decisions, then apply them


class MocoV2Params(NamedTuple):
    """The random decisions of one MoCo-v2 augmentation (all scalar tensors unless noted)."""

    jitter: tf.Tensor  # bool: apply ColorJitter (p = 0.8).
    brightness: tf.Tensor  # float32 in [0.6, 1.4].
    contrast: tf.Tensor  # float32 in [0.6, 1.4].
    saturation: tf.Tensor  # float32 in [0.6, 1.4].
    hue: tf.Tensor  # float32 in [-0.1, 0.1] turns.
    order: tf.Tensor  # int32 [4], uniform random permutation of the four jitter operations.
    grayscale: tf.Tensor  # bool: convert to grayscale (p = 0.2).
    blur: tf.Tensor  # bool: apply Gaussian blur (p = 0.5).
    blur_sigma: tf.Tensor  # float32, sigma in pixels at the reference size, ~ U[blur_sigma range].
    flip: tf.Tensor  # bool: horizontal flip (p = 0.5).


def sample_moco_v2_params(seed, blur_sigma=(0.1, 2.0)):
    """Draws the MoCo-v2 augmentation decisions, each from its own sub-seed (so they are independent)."""
    where = "sample_moco_v2_params"
    seed = _check_seed(seed, where)
    _check_range("blur_sigma", blur_sigma, where)
    (jitter_seed, factor_seed, order_seed, gray_seed, blur_seed, sigma_seed, flip_seed) = tf.unstack(
        tf.random.experimental.stateless_split(seed, 7)
    )

    def coin(coin_seed, probability):
        return tf.random.stateless_uniform([], coin_seed) < probability

    # Four independent U[0, 1) draws: brightness, contrast, saturation factors and the hue shift.
    unit = tf.random.stateless_uniform([4], factor_seed)
    factors = (1 - _JITTER_STRENGTH) + 2 * _JITTER_STRENGTH * unit[:3]
    return MocoV2Params(
        jitter=coin(jitter_seed, _P_JITTER),
        brightness=factors[0],
        contrast=factors[1],
        saturation=factors[2],
        hue=-_HUE_STRENGTH + 2 * _HUE_STRENGTH * unit[3],
        # argsort of i.i.d. uniforms is a uniformly random permutation, like torch.randperm.
        order=tf.argsort(tf.random.stateless_uniform([4], order_seed)),
        grayscale=coin(gray_seed, _P_GRAYSCALE),
        blur=coin(blur_seed, _P_BLUR),
        blur_sigma=tf.random.stateless_uniform([], sigma_seed, blur_sigma[0], blur_sigma[1]),
        flip=coin(flip_seed, _P_FLIP),
    )


def apply_moco_v2_params(image, params, *, max_blur_sigma=2.0, blur_reference_size=224):
    """Applies MoCo-v2's augmentation list with the given decisions: jitter, grayscale, blur, flip.

    The blur sigma in `params` is in pixels of a `blur_reference_size` image (MoCo-v2's 224 px crops) and is scaled
    by (shorter image side / blur_reference_size). Reason: the project trains on smaller crops than 224 px when
    compute is short, and an unscaled sigma of 2 px would blur a 64 px crop about 3.5x more, relative to its
    content, than MoCo-v2 blurred its 224 px crops. Scaling keeps the blur the same fraction of the image; at
    224 px it is exactly MoCo-v2's sigma.

    Args:
      image: [H, W, 3] float32 in [0, 1], static H and W.
      params: a `MocoV2Params`.
      max_blur_sigma: upper end of the sigma range the params were drawn from (fixes the static kernel size).
      blur_reference_size: image side at which `params.blur_sigma` is measured in pixels.

    Returns:
      [H, W, 3] float32 in [0, 1] (not normalised).
    """
    where = "apply_moco_v2_params"
    image = _check_rgb(image, where)
    if image.shape[0] is None or image.shape[1] is None:
        raise ValueError(
            f"{where}: image height and width must be static (they set the blur scale), got {image.shape}"
        )
    image = tf.cast(image, tf.float32)
    blur_scale = min(image.shape[0], image.shape[1]) / blur_reference_size

    image = tf.cond(
        params.jitter,
        lambda: color_jitter(
            image, params.brightness, params.contrast, params.saturation, params.hue, params.order
        ),
        lambda: image,
    )
    image = tf.cond(params.grayscale, lambda: tf.tile(rgb_to_grayscale(image), [1, 1, 3]), lambda: image)
    image = tf.cond(
        params.blur,
        lambda: gaussian_blur(image, params.blur_sigma * blur_scale, max_blur_sigma * blur_scale),
        lambda: image,
    )
    return tf.cond(params.flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def moco_v2_augment(image, seed, *, blur_sigma=(0.1, 2.0), blur_reference_size=224):
    """MoCo-v2's post-crop augmentations with random decisions from `seed`, as uint8 pixels.

    ColorJitter(0.4, 0.4, 0.4, 0.1) in random order with p=0.8, RandomGrayscale p=0.2, Gaussian blur with
    sigma ~ U[blur_sigma] (pixels at `blur_reference_size`, see `apply_moco_v2_params`) with p=0.5, horizontal
    flip p=0.5, then rounding to uint8 as MoCo-v2's PIL images are before `ToTensor`. `Normalize` is
    `pixels.standardize`, on the accelerator.

    Args:
      image: [H, W, 3] float32 in [0, 1] with static H, W (a crop from `decode_random_resized_crop`).
      seed: [2] int32/int64 stateless seed.

    Returns:
      [H, W, 3] uint8.
    """
    params = sample_moco_v2_params(seed, blur_sigma)
    return _apply_to_uint8(image, params, max_blur_sigma=blur_sigma[1], blur_reference_size=blur_reference_size)


@tf.function(jit_compile=True)
def _apply_to_uint8(image, params, max_blur_sigma, blur_reference_size):
    """`apply_moco_v2_params`, rounded to uint8, compiled by XLA into a few fused loops.

    Eager TensorFlow runs each of the ~40 elementwise ops as its own pass over the image; fused, the augmentations
    cost ~3x less, which is most of the input pipeline's time. The random decisions are drawn outside (TF's
    stateless kernels), because XLA's random number generator gives other values for the same seed.
    """
    image = apply_moco_v2_params(
        image, params, max_blur_sigma=max_blur_sigma, blur_reference_size=blur_reference_size
    )
    return tf.cast(tf.round(image * 255.0), tf.uint8)


def moco_v2_view(jpeg_bytes, seed, size, scale=(0.2, 1.0), *, region="whole", box=None, box_context=2.0):
    """One MoCo-v2 view of an encoded JPEG: random resized crop of the `region` (see `region_window`), then the
    augmentations.

    The crop and the augmentations get independent sub-seeds of `seed`; two views of the same image need two
    different seeds.

    Returns:
      uint8 [size, size, 3] (standardised on the accelerator by `pixels.standardize`).
    """
    seed = _check_seed(seed, "moco_v2_view")
    crop_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    crop = decode_random_resized_crop(jpeg_bytes, crop_seed, size, scale, region=region, box=box,
                                      box_context=box_context)
    return moco_v2_augment(crop, augment_seed)


def supervised_view(jpeg_bytes, crop_seed, flip_seed, size, scale=(0.08, 1.0), *, region="whole", box=None,
                    box_context=2.0):
    """A supervised training view (fine-tuning): torchvision's RandomResizedCrop(size, scale) of the `region`,
    then RandomHorizontalFlip, as uint8 [size, size, 3] (standardised on the accelerator)."""
    crop = decode_random_resized_crop(jpeg_bytes, _check_seed(crop_seed, "supervised_view"), size, scale,
                                      region=region, box=box, box_context=box_context)
    flip = tf.random.stateless_uniform([], _check_seed(flip_seed, "supervised_view")) < _P_FLIP
    crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    return tf.cast(tf.round(crop * 255.0), tf.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Linear evaluation (released main_lincls.py): Resize(resize_size) + RandomCrop / CenterCrop(size)


def _to_float_image(image_or_bytes, where):
    """Decodes encoded bytes (JPEG, PNG, ...) or converts a uint8/float image to float32 [H, W, 3] in [0, 1]."""
    image = tf.convert_to_tensor(image_or_bytes)
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    image = _check_rgb(image, where)
    if image.dtype not in (tf.uint8, tf.float32):
        raise ValueError(f"{where}: expected encoded bytes, uint8 or float32 [0, 1] image, got {image.dtype.name}")
    return tf.image.convert_image_dtype(image, tf.float32)


def _check_crop_sizes(size, resize_size, where):
    if not 0 < size <= resize_size:
        raise ValueError(f"{where}: need 0 < size <= resize_size, got size={size}, resize_size={resize_size}")


def resize_shorter_side(image, resize_size):
    """Resizes so the shorter side is `resize_size`, keeping the aspect ratio (torchvision `Resize(int)`).

    The longer side is int(resize_size * long / short), truncated as torchvision does; bilinear with antialiasing.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    short, long = tf.reduce_min(shape), tf.reduce_max(shape)
    new_long = tf.floor(resize_size * long / short)
    new_shape = tf.where(
        shape[0] <= shape[1], tf.stack([resize_size, new_long]), tf.stack([new_long, resize_size])
    )
    return tf.image.resize(image, tf.cast(new_shape, tf.int32), method="bilinear", antialias=True)


def eval_view(image_or_bytes, size, resize_size):
    """Evaluation view: resize the shorter side to `resize_size`, centre crop `size`, normalise.

    The crop offset is round((side - size) / 2) with half-to-even rounding, as torchvision's CenterCrop.

    Args:
      image_or_bytes: encoded image bytes, or a [H, W, 3] uint8 / float32-in-[0, 1] image.

    Returns:
      float32 [size, size, 3], normalised.
    """
    where = "eval_view"
    _check_crop_sizes(size, resize_size, where)
    image = resize_shorter_side(_to_float_image(image_or_bytes, where), resize_size)
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    top, left = tf.unstack(tf.cast(tf.round((shape - size) / 2), tf.int32))
    crop = image[top : top + size, left : left + size]
    return normalize(tf.ensure_shape(crop, [size, size, 3]))


def train_view_lincls(image_or_bytes, seed, size, resize_size):
    """Linear-classifier training view: resize the shorter side to `resize_size`, random crop `size`, normalise.

    Exactly the paper's "resize 224 + random crop 224" (no flip): the crop offset is uniform over all positions.

    Args:
      image_or_bytes: encoded image bytes, or a [H, W, 3] uint8 / float32-in-[0, 1] image.
      seed: [2] int32/int64 stateless seed.

    Returns:
      float32 [size, size, 3], normalised.
    """
    where = "train_view_lincls"
    _check_crop_sizes(size, resize_size, where)
    seed = _check_seed(seed, where)
    image = resize_shorter_side(_to_float_image(image_or_bytes, where), resize_size)
    return normalize(tf.image.stateless_random_crop(image, [size, size, 3], seed))
