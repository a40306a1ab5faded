"""Tests of asga_jax.data: tiny generated image folders and TFDS data, and the embedded sample."""

import hashlib
import importlib.resources
import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from asga_jax import data
from asga_jax.data import make_sample

CLASSES = ('ant', 'bee', 'cat')
SIZE = 16
COUNTS = {'train': 5, 'test': 2}  # Per class: 15 train and 6 test images.
CIFAR_MEAN = np.array((0.4914, 0.4822, 0.4465), np.float32)
CIFAR_STD = np.array((0.2470, 0.2435, 0.2616), np.float32)


def write_tree(root: pathlib.Path, counts=None, size=SIZE) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for split, n in (counts or COUNTS).items():
    for name in CLASSES:
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        tf.io.write_file(str(root / split / name / f'{i:04d}.jpg'), tf.io.encode_jpeg(pixels))
  return root


@pytest.fixture(scope='module')
def tree(tmp_path_factory) -> pathlib.Path:
  return write_tree(tmp_path_factory.mktemp('tree'))


def config(root=None, **fields):
  cfg = data.default_data_config()
  cfg.name = 'folder'
  if root is not None:
    cfg.folder = str(root)
  for k, v in fields.items():
    cfg[k] = v
  return cfg


def normalized_files(root, split):
  """Hand-normalized pixels and labels of every file of a split, in (class, name) order."""
  images, labels = [], []
  for label, name in enumerate(CLASSES):
    for path in sorted((root / split / name).iterdir()):
      pixels = tf.io.decode_jpeg(tf.io.read_file(str(path))).numpy().astype(np.float32)
      images.append((pixels / np.float32(255) - CIFAR_MEAN) / CIFAR_STD)
      labels.append(label)
  return np.stack(images), np.array(labels)


def train(cfg, **kw):
  kw = {'global_batch_size': 4, 'seed': 1, 'epoch': 0, **kw}
  return list(data.train_batches(cfg, **kw))


def stack(batches, field):
  return np.concatenate([b[field] for b in batches])


def test_folder_info(tree):
  info = data.get_info(config(tree))
  assert info == data.DatasetInfo('folder', 3, CLASSES, 15, 6, 32)
  assert data.steps_per_epoch(config(tree), 4) == 3


def test_eval_rows_are_the_normalized_files(tree):
  batches = list(data.eval_batches(config(tree, image_size=SIZE), global_batch_size=4))
  images, labels = normalized_files(tree, 'test')
  assert [b['image'].shape for b in batches] == [(4, SIZE, SIZE, 3)] * 2
  np.testing.assert_array_equal(stack(batches, 'mask'), [1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_allclose(stack(batches, 'image')[:6], images, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(stack(batches, 'label'), list(labels) + [0, 0])
  assert stack(batches, 'label').dtype == np.int32 and stack(batches, 'image').dtype == np.float32


def test_unaugmented_train_rows_are_distinct_files_with_their_labels(tree):
  batches = train(config(tree, image_size=SIZE, augment=False))
  images, labels = normalized_files(tree, 'train')
  got = stack(batches, 'image')
  match = [int(np.argmin(np.abs(images - row).max(axis=(1, 2, 3)))) for row in got]
  np.testing.assert_allclose(got, images[match], rtol=0, atol=1e-6)
  assert len(set(match)) == len(got) == 12  # 3 full batches of 4; 3 images dropped.
  np.testing.assert_array_equal(stack(batches, 'label'), labels[match])


def test_resume_and_determinism(tree):
  cfg = config(tree, image_size=SIZE)
  full = train(cfg)
  assert len(full) == 3 and full[0]['image'].shape == (4, SIZE, SIZE, 3)
  for start in (1, 2, 3):
    resumed = train(cfg, start_batch=start)
    assert len(resumed) == 3 - start
    for a, b in zip(full[start:], resumed):
      assert np.array_equal(a['image'], b['image']) and np.array_equal(a['label'], b['label'])
  again = train(cfg)
  assert all(np.array_equal(a['image'], b['image']) for a, b in zip(full, again))
  for other in (train(cfg, epoch=1), train(cfg, seed=2)):
    assert not np.array_equal(stack(full, 'image'), stack(other, 'image'))


def _digest(batches) -> str:
  return hashlib.sha256(stack(batches, 'image').tobytes() + stack(batches, 'label').tobytes()
                        ).hexdigest()


def test_same_batches_in_a_new_process(tree):
  code = ('import hashlib, sys, numpy as np; from asga_jax import data; '
          'cfg = data.default_data_config(); cfg.name = "folder"; cfg.folder = sys.argv[1]; '
          'cfg.image_size = 16; '
          'bs = list(data.train_batches(cfg, global_batch_size=4, seed=1, epoch=0)); '
          'print(hashlib.sha256(np.concatenate([b["image"] for b in bs]).tobytes() + '
          'np.concatenate([b["label"] for b in bs]).tobytes()).hexdigest())')
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, 'PYTHONPATH': str(root), 'PYTHONHASHSEED': '123'}
  out = subprocess.run([sys.executable, '-c', code, str(tree)], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.split()[-1] == _digest(train(config(tree, image_size=SIZE)))


def test_process_shards_union_is_the_global_batch(tree):
  cfg = config(tree, image_size=SIZE)
  single = train(cfg)
  shards = [train(cfg, process_index=p, process_count=2) for p in (0, 1)]
  assert [len(s) for s in shards] == [3, 3] and shards[0][0]['image'].shape[0] == 2
  for j, batch in enumerate(single):
    for field in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][j][field], shards[1][j][field]]), batch[field])
  resumed = train(cfg, process_index=1, process_count=2, start_batch=2)
  np.testing.assert_array_equal(resumed[0]['image'], shards[1][2]['image'])

  single = list(data.eval_batches(cfg, global_batch_size=4))
  shards = [list(data.eval_batches(cfg, global_batch_size=4, process_index=p, process_count=2))
            for p in (0, 1)]
  assert [len(s) for s in shards] == [2, 2]  # Same number of batches on every process.
  for j, batch in enumerate(single):
    for field in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][j][field], shards[1][j][field]]), batch[field])


@pytest.mark.parametrize('batch,processes', [(3, 1), (4, 2), (6, 3), (12, 2)])
def test_eval_covers_every_example_once(tree, batch, processes):
  cfg = config(tree, image_size=SIZE)
  batches = [b for p in range(processes) for b in data.eval_batches(
      cfg, global_batch_size=batch, process_index=p, process_count=processes)]
  real = stack(batches, 'image')[stack(batches, 'mask') == 1]
  images, _ = normalized_files(tree, 'test')
  assert len(real) == len(images)
  assert sorted(int(np.argmin(np.abs(images - r).max(axis=(1, 2, 3)))) for r in real) == list(
      range(len(images)))


def test_augmentation_changes_images_not_shapes_or_order(tree):
  plain = train(config(tree, image_size=SIZE, augment=False))
  augmented = train(config(tree, image_size=SIZE))
  np.testing.assert_array_equal(stack(plain, 'label'), stack(augmented, 'label'))
  assert stack(plain, 'image').shape == stack(augmented, 'image').shape
  changed = np.abs(stack(plain, 'image') - stack(augmented, 'image')).max(axis=(1, 2, 3)) > 0
  assert changed.sum() >= 6


def test_cache_does_not_change_batches(tree):
  cached = train(config(tree, image_size=SIZE, cache=True))
  streamed = train(config(tree, image_size=SIZE, cache=False))
  assert _digest(cached) == _digest(streamed)


def test_subset_is_balanced_and_independent_of_seed(tree):
  cfg = config(tree, image_size=SIZE, subset=6, augment=False)
  assert data.get_info(cfg).num_train == 6
  epochs = [train(cfg, global_batch_size=6, seed=s) for s in (0, 1)]
  for batches in epochs:
    assert sorted(stack(batches, 'label')) == [0, 0, 1, 1, 2, 2]
  assert {r.tobytes() for r in stack(epochs[0], 'image')} == {
      r.tobytes() for r in stack(epochs[1], 'image')}


def test_resizing_and_imagenet_recipe(tree):
  small = train(config(tree, image_size=8))
  assert small[0]['image'].shape == (4, 8, 8, 3)
  cfg = config(tree, image_size=64)  # ImageNet recipe: random resized crop; resize + center crop.
  assert train(cfg)[0]['image'].shape == (4, 64, 64, 3)
  batch = next(data.eval_batches(cfg, global_batch_size=4))
  assert batch['image'].shape == (4, 64, 64, 3) and np.isfinite(batch['image']).all()
  with pytest.raises(data.DataError, match='cache'):
    data.get_info(config(tree, image_size=64, cache=True))


def test_unreadable_image_is_skipped_and_counted_or_raises(tmp_path, caplog):
  root = write_tree(tmp_path, {'train': 2, 'test': 1}, size=8)
  bad = root / 'train' / 'bee' / 'zz_bad.jpg'
  bad.write_bytes(b'<html>not an image</html>')
  info = data.get_info(config(root, image_size=8))
  assert info.num_train == 6
  assert 'Skipped 1 unreadable' in caplog.text and 'zz_bad.jpg' in caplog.text
  assert len(train(config(root, image_size=8), global_batch_size=6)) == 1
  with pytest.raises(data.DataError, match='zz_bad.jpg'):
    data.get_info(config(root, image_size=8, on_bad_image='error'))


@pytest.mark.parametrize('cache', [True, False])
def test_damaged_image_is_named(tmp_path, cache):
  root = write_tree(tmp_path, {'train': 2, 'test': 1}, size=8)
  path = root / 'train' / 'ant' / '0001.jpg'
  path.write_bytes(path.read_bytes()[:40])  # Valid JPEG header, truncated body.
  with pytest.raises(data.DataError, match='0001.jpg'):
    train(config(root, image_size=8, cache=cache), global_batch_size=6)


def test_folder_errors(tmp_path):
  with pytest.raises(data.DataError, match='does not exist'):
    data.get_info(config(tmp_path / 'missing'))
  with pytest.raises(data.DataError, match="no 'train' split folder"):
    data.get_info(config(tmp_path))
  (tmp_path / 'train').mkdir()
  with pytest.raises(data.DataError, match='no class folders'):
    data.get_info(config(tmp_path))
  (tmp_path / 'train' / 'ant').mkdir()
  with pytest.raises(data.DataError, match='No images'):
    data.get_info(config(tmp_path))
  with pytest.raises(data.DataError, match='archive'):
    data.get_info(config())


def test_batch_arguments_are_checked(tree):
  cfg = config(tree, image_size=SIZE)
  with pytest.raises(data.DataError, match='exceeds the 15 training examples'):
    data.steps_per_epoch(cfg, 16)
  with pytest.raises(data.DataError, match='multiple of process_count'):
    train(cfg, global_batch_size=5, process_count=2)
  with pytest.raises(data.DataError, match='start_batch'):
    train(cfg, start_batch=4)
  with pytest.raises(data.DataError, match='Unknown data config field'):
    data.get_info({'name': 'folder', 'folders': 'x'})


def test_unknown_name_lists_valid_names():
  with pytest.raises(data.DataError, match='cifar10, cifar100, .*imagenet2012.*folder'):
    data.get_info({'name': 'cifar11'})


@pytest.mark.parametrize('cache', [True, False])
def test_tfds_by_name_under_mock_data(cache):
  cfg = data.default_data_config()  # name='cifar10'
  cfg.cache = cache
  with tfds.testing.mock_data(num_examples=20):
    info = data.get_info(cfg)
    batches = train(cfg, global_batch_size=8)
    evals = list(data.eval_batches(cfg, global_batch_size=8))
  assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (10, 20, 20, 32)
  assert len(batches) == 2 and batches[0]['image'].shape == (8, 32, 32, 3)
  images, labels = stack(batches, 'image'), stack(batches, 'label')
  assert images.dtype == np.float32 and labels.dtype == np.int32
  assert (labels >= 0).all() and (labels < 10).all()
  assert (images >= -CIFAR_MEAN / CIFAR_STD - 1e-5).all()
  assert (images <= (1 - CIFAR_MEAN) / CIFAR_STD + 1e-5).all() and images.std() > 0.1
  assert len(evals) == 3 and stack(evals, 'mask').sum() == 20


@pytest.fixture(scope='module')
def prepared_cifar10(tmp_path_factory) -> str:
  """data_dir of a real, tiny prepared TFDS 'cifar10' (40 train, 12 test random images)."""
  root = tmp_path_factory.mktemp('tfds')
  bins = root / 'src' / 'cifar-10-batches-bin'
  bins.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name, n in [(f'data_batch_{i}.bin', 8) for i in range(1, 6)] + [('test_batch.bin', 12)]:
    records = np.concatenate([np.arange(n)[:, None] % 10, rng.integers(0, 256, (n, 3072))], 1)
    (bins / name).write_bytes(records.astype(np.uint8).tobytes())
  (bins / 'batches.meta.txt').write_text('\n'.join(
      'airplane automobile bird cat deer dog frog horse ship truck'.split()))
  with pytest.MonkeyPatch.context() as patch:
    # Preparing (which asga_jax.data never does) imports importlib_resources, a package tfds does
    # not install; the standard library's importlib.resources serves.
    if importlib.util.find_spec('importlib_resources') is None:
      patch.setitem(sys.modules, 'importlib_resources', importlib.resources)
    patch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                  lambda self, url: str(root / 'src'))
    tfds.builder('cifar10', data_dir=str(root / 'tfds')).download_and_prepare()
  return str(root / 'tfds')


@pytest.mark.parametrize('cache', [True, False])
def test_prepared_tfds_data(prepared_cifar10, cache):
  cfg = {'name': 'cifar10', 'data_dir': prepared_cifar10, 'cache': cache}
  info = data.get_info(cfg)
  assert (info.class_names[0], info.num_train, info.num_eval) == ('airplane', 40, 12)
  full = train(cfg)
  assert len(full) == 10 and _digest(full) == _digest(train(cfg))
  assert _digest(full[7:]) == _digest(train(cfg, start_batch=7))
  assert _digest(full) != _digest(train(cfg, epoch=1))
  shards = [train(cfg, process_index=p, process_count=2) for p in (0, 1)]
  for j, batch in enumerate(full):
    np.testing.assert_array_equal(
        np.concatenate([shards[0][j]['image'], shards[1][j]['image']]), batch['image'])
  evals = list(data.eval_batches(cfg, global_batch_size=5))
  assert stack(evals, 'mask').sum() == 12
  assert sorted(stack(evals, 'label')[:12]) == sorted(np.arange(12) % 10)
  assert _digest(evals) == _digest(list(data.eval_batches({**cfg, 'cache': not cache},
                                                          global_batch_size=5)))
  subset = {**cfg, 'subset': 10}
  assert data.get_info(subset).num_train == 10 and len(train(subset)) == 2
  if not cache:  # The ImageNet recipe on streamed data.
    assert train({**cfg, 'image_size': 64})[0]['image'].shape == (4, 64, 64, 3)
  with pytest.raises(data.DataError, match="no split 'validation'.*'test', 'train'"):
    data.get_info({**cfg, 'eval_split': 'validation'})


def test_missing_tfds_data_fails_fast_with_directions(tmp_path):
  start = time.time()
  with pytest.raises(data.DataError) as error:
    data.get_info({'name': 'cifar10', 'data_dir': str(tmp_path)})
  assert time.time() - start < 5
  assert str(tmp_path) in str(error.value) and 'folder' in str(error.value)
  assert not list(tmp_path.iterdir())  # No download started.


def test_embedded_sample():
  info = data.get_info({'name': 'cifar10_sample'})
  assert (info.num_classes, info.num_train, info.num_eval) == (10, 1000, 200)
  assert info.class_names[0] == 'airplane' and data.SAMPLE_DIR.is_dir()
  batch = next(data.train_batches({'name': 'cifar10_sample'}, global_batch_size=32, seed=0,
                                  epoch=0))
  assert batch['image'].shape == (32, 32, 32, 3) and batch['image'].std() > 0.5


def _archive(tree, path, top=''):
  with tarfile.open(path, 'w:gz') as tar:
    for split in COUNTS:
      tar.add(tree / split, arcname=os.path.join(top, split))
  return str(path)


def test_extract_archive(tree, tmp_path, monkeypatch):
  archive = _archive(tree, tmp_path / 'tiny.tar.gz', top='tiny')
  cache = tmp_path / 'cache'
  root = data.extract_archive(archive, str(cache))
  assert sorted(os.listdir(root)) == ['test', 'train']
  assert len(list(pathlib.Path(root).glob('train/*/*.jpg'))) == 15
  monkeypatch.setattr(tarfile, 'open', lambda *a, **k: pytest.fail('extracted twice'))
  assert data.extract_archive(archive, str(cache)) == root
  monkeypatch.undo()
  info = data.get_info({'name': 'folder', 'archive': archive, 'cache_dir': str(cache)})
  assert (info.num_train, info.num_eval) == (15, 6)

  corrupt = tmp_path / 'corrupt.tar.gz'
  corrupt.write_bytes(b'\x1f\x8b' + os.urandom(100))
  with pytest.raises(data.DataError, match='corrupt'):
    data.extract_archive(str(corrupt), str(cache))
  assert sorted(os.listdir(cache)) == [os.path.basename(os.path.dirname(root))]  # No leftovers.
  with pytest.raises(data.DataError, match='does not exist'):
    data.extract_archive(str(tmp_path / 'nothing.tar.gz'), str(cache))


def test_make_sample_copies_first_files(tree, tmp_path):
  archive = _archive(tree, tmp_path / 'tiny.tar.gz')
  out = tmp_path / 'sample'
  assert make_sample.make_sample(archive, str(out), {'train': 2, 'test': 1}) == 9
  assert sorted(p.name for p in (out / 'train' / 'bee').iterdir()) == ['0000.jpg', '0001.jpg']
  assert (out / 'test' / 'cat' / '0000.jpg').read_bytes() == (
      tree / 'test' / 'cat' / '0000.jpg').read_bytes()
