"""Benchmarks: step times and their ratios, memory, input pipeline, PyTorch reference.

  python -m benchmarks.run                 # ResNet-20 CIFAR, batch 128: the README table
  python -m benchmarks.run --quick         # a tiny model in a minute (what the test runs)
  python -m benchmarks.run --model resnet50 --size 224 --batch 64 --dtype bfloat16   # GPU
  python -m benchmarks.run --groups supernet --no-torch --no-input --dump-hlo /tmp/hlo

Times every step kind of :mod:`benchmarks.step_time` in one process (median of
``--rounds`` x ``--steps`` timed steps after warm-up, compile time apart), then
the training input pipeline on the real CIFAR-10 archive
(:mod:`benchmarks.input_pipeline`) and, when torch is installed
(``pip install torch==2.13.0``), the PyTorch steps of the same CIFAR ResNet
(full precision, QAT, supernet) on the same batch (:mod:`benchmarks.torch_reference`).
Prints Markdown tables and writes everything, with the machine, to
``benchmarks/results/<model>_<size>px_<device>.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asga_jax import cpu_flags, models, onednn
from asga_jax.files import write_json
from benchmarks import step_time, torch_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_ARCHIVE = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data',
                                              'cifar10-jpeg.tar.gz'))

# ratio name -> (numerator, denominator, comparison, target). Step ratios are
# slow / fast (lower is better); 'input/step' is a speed-up.
TARGETS = {
    'asga/supernet_sgd': ('asga', 'supernet_sgd', '<=', 2.05),
    'asga/optax_sam': ('asga', 'optax_sam', '<=', 1.03),
    'saq_et/qat_sgd': ('saq_et', 'qat_sgd', '<=', 1.15),
    'supernet_sgd/qat_sgd': ('supernet_sgd', 'qat_sgd', '<=', 1.25),
    # JAX over the PyTorch reference of the same network, step and batch.
    'fp_sgd/torch_sgd': ('fp_sgd', 'torch_sgd', '<=', 1.5),
    'fp_sam/torch_sam': ('fp_sam', 'torch_sam', '<=', 1.5),
    'qat_sgd/torch_qat_sgd': ('qat_sgd', 'torch_qat_sgd', '<=', 1.5),
    'supernet_sgd/torch_supernet_sgd': ('supernet_sgd', 'torch_supernet_sgd', '<=', 1.0),
    'asga/torch_asga': ('asga', 'torch_asga', '<=', 1.0),
}
INPUT_TARGET = 5.0  # pipeline images/s over the fastest step's consumption
# Dense bf16 peak TFLOP/s of known accelerators, for MFU (else --peak-tflops).
PEAK_TFLOPS = {'NVIDIA H100 80GB HBM3': 989.4, 'NVIDIA H200': 989.4, 'NVIDIA A100-SXM4-80GB': 312.0,
               'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5p': 459.0}
QUICK = {'model': 'resnet8', 'width': 4, 'size': 8, 'batch': 8, 'rounds': 2, 'steps': 4,
         'input_batches': 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog='\n'.join(__doc__.split('\n')[2:6]))
  parser.add_argument('--model', default='resnet20', choices=sorted(models.MODELS))
  parser.add_argument('--width', type=int, default=None, help="the model's width (its default)")
  parser.add_argument('--size', type=int, default=32,
                      help='image side; from 64 on, stem models use their ImageNet stem')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='computation dtype (quantizers stay float32)')
  parser.add_argument('--groups', default=','.join(step_time.GROUPS),
                      help=f'comma-separated step groups: {", ".join(step_time.GROUPS)}')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=8,
                      help='timed steps per variant and round (a multiple of --saq-tau)')
  parser.add_argument('--saq-tau', type=int, default=4,
                      help="SAQ-ET's period: the sharpness gradient every this many steps")
  parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
  parser.add_argument('--no-input', action='store_true', help='skip the input pipeline')
  parser.add_argument('--archive', default=CIFAR_ARCHIVE,
                      help='image-folder archive for the input pipeline (real CIFAR-10)')
  parser.add_argument('--input-batches', type=int, default=100)
  parser.add_argument('--peak-tflops', type=float, default=None,
                      help="the device's peak TFLOP/s for MFU (known GPUs/TPUs: bf16 dense)")
  parser.add_argument('--dump-hlo', default=None, help='write each compiled step here')
  parser.add_argument('--json', default=None, help='results file (default: benchmarks/results/)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny model, embedded data sample, few steps (a smoke test)')
  args = parser.parse_args(argv)
  if args.quick:
    for key, value in QUICK.items():
      setattr(args, key, value)
    args.archive = None
  groups = tuple(g for g in args.groups.split(',') if g)
  unknown = sorted(set(groups) - set(step_time.GROUPS))
  if unknown or not groups:
    parser.error(f'--groups: unknown {unknown}; choose from {list(step_time.GROUPS)}.')
  args.groups = groups
  if args.rounds * args.steps < 10 and not args.quick:
    print(f'warning: {args.rounds * args.steps} timed steps per variant; medians of fewer than '
          '10 are noisy (--rounds x --steps).', file=sys.stderr)
  if args.saq_tau < 2:
    parser.error(f'--saq-tau must be at least 2 (1 is the saq row), got {args.saq_tau}.')
  if args.steps % args.saq_tau and 'qat' in groups:
    parser.error(f'--steps ({args.steps}) must be a multiple of --saq-tau ({args.saq_tau}), so '
                 'that every round holds whole SAQ-ET periods.')
  return args


def _machine() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                 cpu)
  except OSError:
    pass
  device = jax.devices()[0]
  return {'device': device.device_kind, 'backend': jax.default_backend(),
          'device_count': jax.device_count(), 'cpu': cpu, 'cpu_count': os.cpu_count(),
          'machine': platform.machine(), 'python': platform.python_version(),
          'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          # float32 convolutions: asga_jax.onednn's (CPU default) or XLA's own.
          'convolutions': 'oneDNN' if onednn.enabled() else 'XLA'}


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  kwargs: dict[str, Any] = {'num_classes': 1000 if args.size >= 64 else 10,
                            'dtype': jnp.dtype(args.dtype)}
  if args.width is not None:
    kwargs['width'] = args.width
  if args.model in models.STEM_MODELS:
    kwargs['stem'] = 'imagenet' if args.size >= 64 else 'cifar'
  return kwargs


def _step_ratio(results: dict[str, dict[str, Any]], a: str, b: str) -> float:
  """a / b: the median of per-round ratios, or of the two medians for PyTorch (timed apart)."""
  if 'round_ms' in results[a] and 'round_ms' in results[b]:
    return statistics.median(x / y for x, y in zip(results[a]['round_ms'],
                                                   results[b]['round_ms']))
  return results[a]['median_ms'] / results[b]['median_ms']


def ratios(results: dict[str, dict[str, Any]], saq_tau: int = 4) -> dict[str, dict[str, Any]]:
  """The target ratios whose two sides were measured, and SAQ-ET's floor at ``saq_tau``."""
  out = {}
  for key, (a, b, comparison, target) in TARGETS.items():
    if a in results and b in results:
      value = _step_ratio(results, a, b)
      ok = value <= target if comparison == '<=' else value >= target
      out[key] = {'value': value, 'target': f'{comparison} {target}', 'met': ok}
  if {'saq', 'saq_et', 'qat_sgd'} <= set(results):
    # SAQ-ET pays one SAQ step every tau steps: its ratio cannot go below this.
    saq = _step_ratio(results, 'saq', 'qat_sgd')
    out['saq_et floor'] = {'value': 1 + (saq - 1) / saq_tau,
                           'target': f'1 + (saq/qat_sgd - 1) / {saq_tau}', 'met': None}
  if 'phase_round_ms' in results.get('saq_et', {}) and 'qat_sgd' in results:
    out.update(_saq_et_phases(results['saq_et']['phase_round_ms'], results['qat_sgd']['round_ms']))
  return out


def _saq_et_phases(phase_round_ms: dict[str, list[float]], qat_round_ms: list[float]
                   ) -> dict[str, dict[str, Any]]:
  """SAQ-ET's two phases over the QAT step, and the tau its target needs.

  A period of tau steps is one sharpness step s and tau - 1 reuse steps r (in
  QAT steps), so SAQ-ET / QAT = (s + (tau - 1) r) / tau, at most the target
  from tau >= (s - r) / (target - r) on, and never when r is above it.
  """
  phase = {name: statistics.median(x / y for x, y in zip(ms, qat_round_ms))
           for name, ms in phase_round_ms.items()}
  symbols = {'sharpness': 's', 'reuse': 'r'}
  out = {f'saq_et {name} step/qat_sgd': {'value': value, 'target': f'({symbols[name]})',
                                         'met': None} for name, value in phase.items()}
  if {'sharpness', 'reuse'} <= set(phase):
    s, r, target = phase['sharpness'], phase['reuse'], TARGETS['saq_et/qat_sgd'][3]
    tau = math.ceil((s - r) / (target - r) - 1e-9) if r < target else None  # 4.0000001 is 4
    out[f'saq_et tau for <= {target}'] = {
        'value': tau, 'target': f'smallest tau with (s + (tau - 1) r) / tau <= {target}',
        'met': None}
  return out


def _step_table(results: dict[str, dict[str, Any]], batch: int) -> str:
  mfu = any('mfu' in r for r in results.values())
  lines = ['| step | ms/step (median) | min-max ms | img/s | compile s | model GFLOP | XLA GFLOP '
           '| GB accessed | XLA memory MB |' + (' MFU |' if mfu else ''),
           '|---' * (10 if mfu else 9) + '|']
  for name, r in results.items():
    xla = (f'{r["compile_s"]:.1f} | {r["model_gflops"]:.1f} | {r["gflops"]:.2f} | '
           f'{r["gbytes_accessed"]:.2f} | {r["xla_memory_mb"]:.0f}'
           ) if 'gflops' in r else '- | - | - | - | -'
    if mfu:
      xla += f' | {100 * r["mfu"]:.1f}%' if 'mfu' in r else ' | -'
    lines.append(f'| {name} | {r["median_ms"]:.1f} | {r["min_ms"]:.0f}-{r["max_ms"]:.0f} | '
                 f'{batch / r["median_ms"] * 1e3:.0f} | {xla} |')
  return '\n'.join(lines)


def _ratio_table(table: dict[str, dict[str, Any]]) -> str:
  lines = ['| ratio | value | target | |', '|---|---|---|---|']
  for key, r in table.items():
    verdict = '' if r['met'] is None else ('met' if r['met'] else 'MISSED')
    value = r['value'] if isinstance(r['value'], (int, type(None))) else f'{r["value"]:.3f}'
    lines.append(f'| {key} | {value} | {r["target"]} | {verdict} |')
  return '\n'.join(lines)


def _torch_reference(args: argparse.Namespace, kwargs: dict[str, Any],
                     batch: dict[str, jax.Array], variants: dict[str, step_time.Variant],
                     results: dict[str, dict[str, Any]], log: Any) -> str | None:
  """Adds the PyTorch rows to ``results``; returns why they were skipped, or None."""
  if args.no_torch:
    return 'skipped (--no-torch)'
  if not torch_reference.available():
    return 'skipped: torch is not installed (pip install torch==2.13.0)'
  if not args.model.startswith('resnet') or args.model in models.STEM_MODELS:
    return f'skipped: the PyTorch reference is the CIFAR ResNet, not {args.model}'
  if args.dtype != 'float32':
    return 'skipped: the PyTorch reference runs in float32'
  log('timing the PyTorch reference')
  first = {'fp': 'fp_sgd', 'qat': 'qat_sgd', 'supernet': 'supernet_sgd'}
  num_params = {group: sum(x.size for x in jax.tree.leaves(variants[name].variables['params']))
                for group, name in first.items() if name in variants}
  results.update(torch_reference.time_steps_apart(
      np.asarray(batch['image']), np.asarray(batch['label']),
      depth=int(args.model.removeprefix('resnet')), width=args.width or 16,
      num_classes=kwargs['num_classes'], num_params=num_params, groups=args.groups,
      bits=models.DEFAULT_BITS[args.model], warmup=3, steps=args.rounds * args.steps))
  return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  cpu_flags.apply()  # the program's CPU defaults, before JAX creates its backends
  machine = _machine()
  log(f'{args.model} {args.size}px batch {args.batch} {args.dtype} on {machine["device"]} '
      f'({machine["cpu_count"]} CPUs): groups {", ".join(args.groups)}')
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)),
                                jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
  pipeline = None
  if not args.no_input:  # first: a bad archive fails before minutes of timing
    # Imported here: the pipeline needs TensorFlow, which a GPU box's image may lack.
    from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
    if args.archive is not None and not os.path.exists(args.archive):
      raise SystemExit(f'input pipeline: {args.archive} not found; pass --archive PATH to the '
                       'CIFAR-10 JPEG archive, or --no-input.')
    log('timing the input pipeline')
    pipeline = input_pipeline.measure(input_pipeline.data_config(args.archive, args.size),
                                      args.batch, args.input_batches)
  kwargs = _model_kwargs(args)
  variants = step_time.build_variants(args.model, batch, args.groups, saq_tau=args.saq_tau,
                                      **kwargs)
  results = step_time.time_variants(variants, batch, rounds=args.rounds,
                                    steps_per_round=args.steps, log=log)
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
    for name, variant in variants.items():
      for phase, compiled in variant.compiled.items():
        suffix = '' if phase is None else f'_{step_time.PHASE_NAMES[phase]}'
        with open(os.path.join(args.dump_hlo, f'{name}{suffix}.hlo.txt'), 'w') as f:
          f.write(compiled.as_text())
    log(f'wrote the compiled steps to {args.dump_hlo}')
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  if 'peak_bytes_in_use' in stats:
    machine['peak_device_memory_mb'] = stats['peak_bytes_in_use'] / 2**20  # over all variants
  peak = args.peak_tflops or PEAK_TFLOPS.get(machine['device'])
  if peak and machine['backend'] != 'cpu':
    for r in results.values():  # model FLOPs: XLA's count leaves out cuDNN's convolutions
      r['mfu'] = r['model_gflops'] / (r['median_ms'] / 1e3) / (peak * 1e3)

  torch_note = _torch_reference(args, kwargs, batch, variants, results, log)
  table = ratios(results, args.saq_tau)

  if pipeline:
    consumption = args.batch / (min(r['median_ms'] for r in results.values()
                                    if 'gflops' in r) / 1e3)  # JAX steps only
    pipeline['fastest_step_images_per_s'] = consumption
    value = pipeline['decode']['images_per_s'] / consumption
    table['input/step'] = {'value': value, 'target': f'>= {INPUT_TARGET}',
                           'met': value >= INPUT_TARGET}

  print(f'\n{args.model}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}; '
        f'{machine["device"]} ({machine["cpu"]}, {machine["cpu_count"]} CPUs), jax '
        f'{machine["jax"]}; {machine["convolutions"]} convolutions; XLA_FLAGS: '
        f'{machine["xla_flags"] or "(none)"}\n')
  print(_step_table(results, args.batch))
  print()
  print(_ratio_table(table))
  if pipeline:
    print(f'\ninput pipeline ({"embedded sample" if args.archive is None else args.archive}): '
          f'{pipeline["decode"]["images_per_s"]:.0f} img/s decoding'
          + (f', {pipeline["cached"]["images_per_s"]:.0f} img/s from the cache'
             if 'cached' in pipeline else '')
          + f'; the fastest step consumes {pipeline["fastest_step_images_per_s"]:.0f} img/s')
  if 'peak_device_memory_mb' in machine:
    print(f'\npeak device memory: {machine["peak_device_memory_mb"]:.0f} MB')
  if torch_note:
    print(f'\nPyTorch reference: {torch_note}')
  report = {'args': dict(vars(args)), 'machine': machine,
            'results': results, 'ratios': table, 'input_pipeline': pipeline,
            'torch': torch_note or 'measured'}
  path = args.json
  if path is None and not args.quick:
    device = machine['device'].replace(' ', '_').lower()
    path = os.path.join(REPO, 'benchmarks', 'results',
                        f'{args.model}_{args.size}px_{args.dtype}_{device}.json')
  if path:
    write_json(path, report)
    print(f'\nwrote {path}')
  return report


if __name__ == '__main__':
  main()
