"""Per-image TensorFlow ops: decoding, augmentation and normalization.

All randomness is stateless and keyed by (seed, epoch, position in epoch), so an example's
augmentation does not depend on the order it is processed in, on parallelism, on the number of
processes or on where an epoch was resumed.
"""

from __future__ import annotations

import tensorflow as tf

from asga_jax.data.config import LARGE_IMAGE_SIZE

_EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize the shorter side to size / 0.875, center crop.


def is_small(image_size: int) -> bool:
  """Whether `image_size` uses the CIFAR recipe (pad + crop) rather than the ImageNet one."""
  return image_size < LARGE_IMAGE_SIZE


def decode(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes a JPEG/PNG/GIF/BMP/WebP image to uint8 [h, w, 3].

  Small images are also brought to image_size x image_size here (stretched if the native size
  differs), so that cached and streamed images are identical and the cache has one shape.

  Args:
    encoded: scalar string tensor with the file contents.
    image_size: output side length of the pipeline.

  Returns:
    uint8 [h, w, 3]; [image_size, image_size, 3] for small image sizes.
  """
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  if not is_small(image_size):
    return image
  shape = tf.shape(image)
  same = tf.logical_and(shape[0] == image_size, shape[1] == image_size)
  image = tf.cond(same, lambda: image, lambda: _resize_uint8(image, image_size))
  return tf.ensure_shape(image, [image_size, image_size, 3])


def _resize_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
  resized = tf.image.resize(image, [image_size, image_size], antialias=True)
  return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def augmentation_key(seed: int, epoch: int, position: tf.Tensor) -> tf.Tensor:
  """The stateless RNG key of the example at `position` (0-based) of epoch `epoch`."""
  base = tf.constant([seed, epoch], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def normalize(image: tf.Tensor, mean: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
  """Maps pixels in [0, 255] to (x / 255 - mean) / std, float32."""
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def augment(image: tf.Tensor, key: tf.Tensor, image_size: int) -> tf.Tensor:
  """Training augmentation of a decoded uint8 image.

  Small sizes: zero-pad image_size // 8 pixels (4 at 32) on each side of the uint8 image, i.e.
  black borders as with torchvision's RandomCrop(32, padding=4) before Normalize, random crop back
  to image_size, random horizontal flip. Large sizes: random resized crop (area 8-100 %, aspect
  3/4-4/3) resized to image_size, random horizontal flip.

  Args:
    image: uint8 [h, w, 3] from `decode`.
    key: int64 [2] key from `augmentation_key`.
    image_size: output side length.

  Returns:
    [image_size, image_size, 3]: uint8 for small sizes, float32 in [0, 255] for large ones.
  """
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  if is_small(image_size):
    pad = image_size // 8
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_key)
  else:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_key,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.image.resize(tf.slice(image, begin, crop_size), [image_size, image_size],
                            antialias=True)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def eval_view(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Eval view of a decoded uint8 image.

  Small sizes: unchanged (`decode` already fitted it). Large sizes: resize the shorter side to
  image_size / 0.875, then crop the central image_size x image_size (float32 in [0, 255]).
  """
  if is_small(image_size):
    return image
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(image_size / _EVAL_CROP_FRACTION) / tf.reduce_min(shape)
  new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
  image = tf.image.resize(image, new_shape, antialias=True)
  top, left = (new_shape[0] - image_size) // 2, (new_shape[1] - image_size) // 2
  return tf.ensure_shape(image[top:top + image_size, left:left + image_size],
                         [image_size, image_size, 3])
