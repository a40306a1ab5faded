"""``train_and_evaluate(config, workdir)``: the whole pipeline of one run."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import ml_collections
from absl import logging

from asga_jax import data
from asga_jax.files import write_json
from asga_jax.train.config import stage_data_config, stage_list, validate_config
from asga_jax.train.loop import StopRequested, stop_on_signals
from asga_jax.train.stages import BITS_PLOT, POLICY_FILE, STAGE_FNS, load_finetune_policy

RESULTS_FILE = 'results.json'
CONFIG_FILE = 'config.json'


def _write_json(path: str, content: Any) -> None:
  write_json(path, content, sort_keys=True, default=str)


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise PermissionError(f'workdir {workdir!r} is not writable ({e.strerror}); pass a '
                          'directory you can write to with --workdir.') from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the configured stages in order; resumes whatever is already in ``workdir``.

  Everything a run depends on (config values, data sets, workdir) is checked
  before any compute. Returns the per-stage summaries, also in results.json.
  """
  validate_config(config)
  stages = stage_list(config)
  for stage in stages:  # data problems surface now, not after hours of training
    data.get_info(stage_data_config(config, stage if stage != 'eval' else 'finetune'))
  workdir = os.path.abspath(workdir)
  if 'finetune' in stages and (config.finetune.policy or 'search' not in stages):
    # The policy exists already: check it against the model before anything trains.
    load_finetune_policy(config, workdir,
                         data.get_info(stage_data_config(config, 'finetune')))
  _check_workdir(workdir)
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
  logging.info('asga_jax: stages %s in %s on %d %s device(s)', ', '.join(stages), workdir,
               jax.device_count(), jax.default_backend())
  results_path = os.path.join(workdir, RESULTS_FILE)
  results = {}
  if os.path.isfile(results_path):
    with open(results_path) as f:
      results = json.load(f)
  with stop_on_signals():
    for stage in stages:
      try:
        results[stage] = STAGE_FNS[stage](config, workdir)
      except StopRequested as stop:
        logging.warning('%s', stop)
        return {**results, 'stopped': {'stage': stop.stage, 'step': stop.step}}
      if jax.process_index() == 0:
        _write_json(results_path, results)
  outputs = [os.path.join(workdir, name)
             for name in (RESULTS_FILE, CONFIG_FILE, POLICY_FILE, BITS_PLOT, 'tensorboard')]
  logging.info('done. Outputs in %s:\n  %s', workdir,
               '\n  '.join(path for path in outputs if os.path.exists(path)))
  return results
