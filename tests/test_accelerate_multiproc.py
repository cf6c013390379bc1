"""Two CPU processes through ``accelerate launch --multi_gpu`` (gloo): the replicas stay
identical, the processes see disjoint samples that together follow the deterministic
stream. (One launch: starting the processes dominates the run time.)"""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from dalpsr.data.loader import InfiniteSampler
from tests.toy_plugin import toy_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(opt_file, *extra):
    accel = shutil.which('accelerate', path=os.path.dirname(sys.executable)) or shutil.which('accelerate')
    if accel is None:
        pytest.fail('the accelerate command is not installed next to the python running the tests')
    cmd = [accel, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
           os.path.join(REPO, 'dalpsr', 'train.py'), '-opt', str(opt_file), *extra]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1', PYTHONPATH=REPO,
               HF_HUB_OFFLINE='1')
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def test_two_process_cpu_run(tmp_path):
    rec = tmp_path / 'rec'
    opt = toy_options(tmp_path / 'exp', name='mp', total_iter=6, batch_size=3, grad_accum=2, val_freq=3,
                      checkpoint_freq=4)
    opt['model']['record_dir'] = str(rec)
    opt.pop('_source')
    opt_file = tmp_path / 'mp.yml'
    opt_file.write_text(yaml.safe_dump(opt))
    r = _launch(opt_file)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert '2 process(es)' in out, out[-2000:]
    ckpt = tmp_path / 'exp' / 'mp' / 'checkpoints'
    assert sorted(p.name for p in ckpt.iterdir()) == ['checkpoint-4', 'checkpoint-6']
    # every process stored its own RNG state in the checkpoint
    assert {p.name for p in (ckpt / 'checkpoint-6').glob('random_states_*.pkl')} == \
        {'random_states_0.pkl', 'random_states_1.pkl'}

    # replicas identical at every validation (steps 3 and 6), and they did train
    p3 = [torch.load(rec / f'params_rank{r}_step3.pth') for r in (0, 1)]
    p6 = [torch.load(rec / f'params_rank{r}_step6.pth') for r in (0, 1)]
    for k in p6[0]:
        assert torch.equal(p6[0][k], p6[1][k]), k
        assert torch.equal(p3[0][k], p3[1][k]), k
    assert not torch.equal(p3[0]['net.0.weight'], p6[0]['net.0.weight'])
    # export written once, by the main process, with the final weights
    exported = torch.load(tmp_path / 'exp' / 'mp' / 'export' / 'toy.pth')
    assert torch.equal(exported['net.0.weight'], p6[0]['net.0.weight'])

    # samples: disjoint between ranks, together the single stream (6 steps x 2 micro x 2 ranks x 3)
    seen = {}
    for r in (0, 1):
        lines = (rec / f'rank{r}.txt').read_text().split('\n')
        seen[r] = [int(v) for ln in lines if ln for v in ln.split()]
        assert len(seen[r]) == 6 * 2 * 3
    assert not set(seen[0]) & set(seen[1])
    ref = InfiniteSampler(20, batch_size=6, seed=7)
    expected = [i for k in range(12) for i in ref.micro_step_indices(k)]
    merged = [i for k in range(12) for r in (0, 1) for i in seen[r][3 * k:3 * k + 3]]
    assert merged == expected
