"""Input pipeline of asga_jax: TFDS data sets read offline, image folders, an embedded sample.

Batches are numpy dicts {'image': float32 [b, S, S, 3] normalized, 'label': int32 [b]} (+ 'mask'
for eval), deterministic in (seed, epoch), resumable at any batch and sharded across processes.
"""

from asga_jax.data.archive import extract_archive
from asga_jax.data.base import DataError, DatasetInfo
from asga_jax.data.config import SAMPLE_DIR, default_data_config
from asga_jax.data.pipeline import eval_batches, get_info, steps_per_epoch, train_batches

__all__ = [
    'DataError',
    'DatasetInfo',
    'SAMPLE_DIR',
    'default_data_config',
    'eval_batches',
    'extract_archive',
    'get_info',
    'steps_per_epoch',
    'train_batches',
]
