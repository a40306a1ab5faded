"""Command-line entry point.

  python -m asga_jax.main --config configs/resnet20_cifar.py:demo --workdir /tmp/asga_demo
  python -m asga_jax.main --config configs/resnet18_cifar.py --workdir DIR --config.search.epochs=2
"""

import logging as pylogging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from asga_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, policy, plots and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


class _OwnInfoFilter(pylogging.Filter):
  """Keeps asga_jax's INFO lines and every library's warnings and errors.

  Libraries (orbax, clu) log through the same absl logger at INFO level, many
  lines per checkpoint; ``--verbosity=1`` shows them again.
  """

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (record.levelno >= pylogging.WARNING or FLAGS.verbosity >= 1
            or f'{os.sep}asga_jax{os.sep}' in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  handler = logging.get_absl_handler()
  handler.setFormatter(pylogging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  handler.addFilter(_OwnInfoFilter())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
