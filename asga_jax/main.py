"""Command-line entry point.

  python -m asga_jax.main --config configs/resnet20_cifar.py:demo --workdir /tmp/asga_demo
  python -m asga_jax.main --config configs/resnet18_cifar.py --workdir DIR --config.search.epochs=2

Several processes (one per host) join through --coordinator_address,
--num_processes and --process_id, or, under SLURM, Open MPI or on a TPU-VM pod,
automatically; only process 0 logs and writes plots and JSON files.
"""

import logging as pylogging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from asga_jax import cpu_flags, train
from asga_jax.train import sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, policy, plots and logs.')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1.')
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
  cpu_flags.apply()  # before anything creates JAX's backends
  handler = logging.get_absl_handler()
  handler.setFormatter(pylogging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  handler.addFilter(_OwnInfoFilter())
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one log for the run: process 0's
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
