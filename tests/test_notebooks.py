"""The notebooks run top to bottom, in quick mode (a few steps, small landscape grids).

Each notebook checks its own numbers (the policy's BOPs against the per-layer report, a
non-empty comparison table, finite lambda_max, the landscape's center at the trained loss);
here it must run without error and write its figures.
"""

import os
import pathlib
import re
import sys

import nbclient
import nbformat
import pytest

from asga_jax import quant

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = {
    '01_asga_on_your_model.ipynb': ('notebook01_sharpness.png', 'policy.json'),
    '02_sharpness_and_landscape.ipynb': (
        'notebook02_landscape.png', 'notebook02_landscape_2d_edmips.png',
        'notebook02_landscape_2d_asga.png', 'notebook02_bits_edmips.png',
        'notebook02_bits_asga.png'),
}
CELL_TIMEOUT_S = 300
ANSI_COLOR = re.compile(r'\x1b\[[0-9;]*m')


def test_every_notebook_is_tested():
  assert sorted(p.name for p in (ROOT / 'notebooks').glob('*.ipynb')) == sorted(NOTEBOOKS)


@pytest.mark.parametrize('name', sorted(NOTEBOOKS), ids=lambda n: n.split('_')[0])
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(ROOT / 'notebooks' / name, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'
           and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, f'{name}: cells {dirty} carry outputs; clear them before committing.'


@pytest.mark.parametrize('name', sorted(NOTEBOOKS), ids=lambda n: n.split('_')[0])
def test_notebook_runs(name, monkeypatch, tmp_path):
  monkeypatch.setenv('ASGA_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('ASGA_NOTEBOOK_OUT', str(tmp_path))
  # The kernel spec starts `python`: make it this interpreter, whatever PATH says.
  monkeypatch.setenv('PATH', os.pathsep.join([os.path.dirname(sys.executable),
                                              os.environ.get('PATH', '')]))
  nb = nbformat.read(ROOT / 'notebooks' / name, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(ROOT)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{name} failed in a cell:\n{ANSI_COLOR.sub("", str(e))}', pytrace=False)
  missing = [f for f in NOTEBOOKS[name] if not (tmp_path / f).is_file()]
  assert not missing, f'{name} did not write {missing}'
  if (tmp_path / 'policy.json').exists():
    policy, _ = quant.load_policy(tmp_path / 'policy.json')
    assert policy.paths() == ('conv2', 'conv3', 'conv4')
