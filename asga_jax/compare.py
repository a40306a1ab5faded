"""Compare finished runs, like the ASGA paper's Table 3 (sharpness and accuracy).

  python -m asga_jax.compare /tmp/edmips /tmp/asga --labels EdMIPS,ASGA
  python -m asga_jax.compare /tmp/edmips /tmp/asga --json /tmp/table3.json

Reads each workdir's results.json and search/metrics.jsonl; prints a Markdown
table (average sigma_max and h over the search, lambda_max at its end, top-1
after search and finetune, GBOPs) with the change of the last run against the
first.
"""

import dataclasses
import sys

from absl import app, flags

from asga_jax.files import write_json
from asga_jax.train.summary import format_table, summarize_run

FLAGS = flags.FLAGS
flags.DEFINE_list('labels', None, 'Names of the runs, in order (default: directory names).')
flags.DEFINE_string('json', None, 'Also write the summaries to this JSON file.')


def main(argv):
  workdirs = argv[1:]
  if len(workdirs) < 1:
    raise app.UsageError('pass one or more workdirs of finished runs.')
  labels = FLAGS.labels or [None] * len(workdirs)
  if len(labels) != len(workdirs):
    raise app.UsageError(f'{len(labels)} labels for {len(workdirs)} workdirs.')
  try:
    runs = [summarize_run(w, l) for w, l in zip(workdirs, labels)]
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  print(format_table(runs))
  if FLAGS.json:
    write_json(FLAGS.json, [dataclasses.asdict(r) for r in runs])


if __name__ == '__main__':
  app.run(main)
