"""The shared training loop (dalpsr/train.py) on the toy plugin model: learning, gradient
accumulation accounting, clipping, mixed precision, LR schedules, EMA, logs and outputs,
experiment-folder rules, signals."""
import copy
import json
import math
import os
import signal

import pytest
import torch
import yaml

from dalpsr.train import main, train
from dalpsr.training.folder import plan_experiment
from dalpsr.utils.ema import ModelEMA
from dalpsr.utils.optim import build_optimizer, build_scheduler, lr_factor
from dalpsr.utils.options import OptionError
from dalpsr.utils.registry import MODEL_REGISTRY
from tests.toy_plugin import ToyModel, toy_options


def _run(opt, **args):
    opt = copy.deepcopy(opt)
    opt['_args'] = {'resume': 'auto', 'force': False, **args}
    return train(opt)


def _params(result):
    net = result['model'].unwrap(result['model'].net)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_loss_drops_and_outputs_written(tmp_path):
    opt = toy_options(tmp_path, total_iter=80, batch_size=8, val_freq=40, print_freq=20, tensorboard=True,
                      scheduler={'type': 'constant'}, optimizer={'type': 'AdamW', 'lr': 1e-2})
    opt['model'].update(dropout=0.0, input_noise=0.0)
    res = _run(opt)
    losses = res['losses']
    assert len(losses) == 80
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.2 * first, (first, last)
    assert res['val']['mse'] < 0.2 * first
    exp = tmp_path / 'toy'
    log = (exp / 'train.log').read_text()
    assert '[step 80/80]' in log and '[val step 40] mse' in log and 'exported to' in log
    assert list((exp / 'tb').glob('events.out.tfevents.*'))
    dumped = (exp / 'options.yml').read_text()
    assert 'ToyModel' in dumped and '_args' not in dumped
    assert (exp / 'export' / 'toy.pth').is_file()
    state = json.loads((exp / 'checkpoints' / 'checkpoint-80' / 'trainer_state.json').read_text())
    assert state['step'] == 80 and state['samples_seen'] == 80 * 8
    # the frozen part of the model never changes, the trainable weights stay fp32
    p = _params(res)
    assert p['net.0.weight'].dtype == torch.float32
    init = _run(toy_options(tmp_path / 'b', total_iter=1, optimizer={'type': 'SGD', 'lr': 0.0}))
    assert torch.equal(_params(init)['frozen.weight'], p['frozen.weight'])
    assert not torch.equal(_params(init)['net.0.weight'], p['net.0.weight'])


def test_grad_accum_equals_large_batch(tmp_path):
    """2 micro-batches of 4 accumulate to exactly the step of one batch of 8 (same samples, the
    scheduler steps once per optimizer step)."""
    kw = dict(total_iter=6, optimizer={'type': 'SGD', 'lr': 0.05}, max_grad_norm=None,
              scheduler={'type': 'linear', 'warmup_iter': 2, 'min_lr_ratio': 0.1})
    a = toy_options(tmp_path / 'a', batch_size=8, grad_accum=1, **kw)
    b = toy_options(tmp_path / 'b', batch_size=4, grad_accum=2, **kw)
    for o in (a, b):
        o['model'].update(dropout=0.0, input_noise=0.0)
    ra, rb = _run(a), _run(b)
    for (k, va), vb in zip(_params(ra).items(), _params(rb).values()):
        assert torch.allclose(va, vb, atol=1e-6, rtol=1e-5), k
    assert torch.allclose(torch.tensor(ra['losses']), torch.tensor(rb['losses']), atol=1e-5)
    # both took 6 optimizer steps and ended on the schedule's last value
    for r in (ra, rb):
        sched = r['accelerator']._schedulers[0]
        assert sched.scheduler.last_epoch == 6
        assert math.isclose(sched.get_last_lr()[0], 0.05 * lr_factor(6, kw['scheduler'], 6))
    # and not the same as a run with grad_accum=2 that would step after every micro-batch
    c = toy_options(tmp_path / 'c', batch_size=4, grad_accum=1, **dict(kw, total_iter=12))
    c['model'].update(dropout=0.0, input_noise=0.0)
    rc = _run(c)
    assert not torch.allclose(_params(rc)['net.0.weight'], _params(rb)['net.0.weight'], atol=1e-6)


def test_max_grad_norm_clips(tmp_path):
    def step_size(max_norm):
        opt = toy_options(tmp_path / str(max_norm), total_iter=1, optimizer={'type': 'SGD', 'lr': 1.0},
                          max_grad_norm=max_norm, scheduler={'type': 'constant'})
        opt['model'].update(dropout=0.0, input_noise=0.0)
        init = _run(toy_options(tmp_path / f'i{max_norm}', total_iter=1,
                                optimizer={'type': 'SGD', 'lr': 0.0}))
        res = _run(opt)
        p0, p1 = _params(init), _params(res)
        return math.sqrt(sum(float(((p1[k] - p0[k]) ** 2).sum()) for k in p0))
    assert step_size(1e-3) == pytest.approx(1e-3, rel=1e-3)
    assert step_size(None) > 0.1


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_keeps_fp32_weights(tmp_path, precision):
    opt = toy_options(tmp_path, total_iter=30, batch_size=8, mixed_precision=precision,
                      scheduler={'type': 'constant'})
    opt['model'].update(dropout=0.0, input_noise=0.0)
    res = _run(opt)
    assert res['accelerator'].mixed_precision == precision
    p = _params(res)
    assert all(v.dtype == torch.float32 for v in p.values())
    assert sum(res['losses'][-5:]) < 0.6 * sum(res['losses'][:5])


def test_lr_schedules():
    cos = {'type': 'cosine', 'warmup_iter': 4, 'min_lr_ratio': 0.1}
    assert [lr_factor(s, cos, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cos, 104) == pytest.approx(1.0)
    assert lr_factor(54, cos, 104) == pytest.approx(0.55)
    assert lr_factor(104, cos, 104) == pytest.approx(0.1)
    lin = {'type': 'linear', 'warmup_iter': 0, 'min_lr_ratio': 0.0}
    assert lr_factor(50, lin, 100) == pytest.approx(0.5)
    ms = {'type': 'multistep', 'milestones': [10, 20], 'gamma': 0.1}
    assert [lr_factor(s, ms, 30) for s in (9, 10, 19, 20)] == pytest.approx([1, 0.1, 0.1, 0.01])
    net = torch.nn.Linear(2, 2)
    opt = build_optimizer(net.parameters(), {'type': 'Adam', 'lr': '2e-4', 'betas': [0.5, 0.9]})
    assert opt.param_groups[0]['lr'] == 2e-4 and opt.param_groups[0]['betas'] == (0.5, 0.9)
    sched = build_scheduler(opt, {'type': 'linear', 'warmup_iter': 2}, total_iter=10)
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-4)
    with pytest.raises(OptionError, match="unknown key 'gamma'"):
        build_scheduler(opt, {'type': 'cosine', 'gamma': 0.5}, 10)
    with pytest.raises(OptionError, match="unknown optimizer type 'Adamw'"):
        build_optimizer(net.parameters(), {'type': 'Adamw'})
    with pytest.raises(OptionError, match="unknown key 'momentum'"):
        build_optimizer(net.parameters(), {'type': 'Adam', 'momentum': 0.9})
    del sched


def test_ema_math_and_state():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = ModelEMA({'n': net}, decay=0.5, start_iter=1)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(1)  # step <= start_iter: copy
    assert ema.shadow['n.weight'].item() == 3.0
    with torch.no_grad():
        net.weight.fill_(5.0)
    ema.update(2)
    assert ema.shadow['n.weight'].item() == 4.0
    with ema.swap():
        assert net.weight.item() == 4.0
    assert net.weight.item() == 5.0
    other = ModelEMA({'n': net}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.shadow['n.weight'].item() == 4.0 and other.num_updates == 2
    with pytest.raises(OptionError):
        ModelEMA({'n': net}, decay=1.0)


def test_validation_does_not_change_training(tmp_path):
    """Validation runs in an isolated RNG context: val_freq does not alter the trained weights."""
    a = _run(toy_options(tmp_path / 'a', total_iter=6, val_freq=0))
    b = _run(toy_options(tmp_path / 'b', total_iter=6, val_freq=1))
    for k, v in _params(a).items():
        assert torch.equal(v, _params(b)[k]), k


def test_experiment_folder_rules(tmp_path):
    opt = toy_options(tmp_path, total_iter=2)
    exp = tmp_path / 'toy'
    _run(opt)
    marker = exp / 'notes.txt'
    marker.write_text('mine')
    # --resume no with an existing folder refuses and leaves it untouched
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        _run(opt, resume='no')
    assert marker.read_text() == 'mine'
    # --force archives it with a timestamp (nothing deleted) and starts afresh
    res = _run(opt, resume='no', force=True)
    assert res['step'] == 2 and len(res['losses']) == 2
    archived = [p for p in tmp_path.iterdir() if p.name.startswith('toy_archived_')]
    assert len(archived) == 1 and (archived[0] / 'notes.txt').read_text() == 'mine'
    assert not marker.exists()
    # a folder without any checkpoint (a run that died early) is archived, not overwritten
    (exp / 'checkpoints' / 'checkpoint-2').rename(exp / 'checkpoints' / 'old-2')
    assert plan_experiment(exp, 'auto', False) == ('archive', None)
    # resuming from an explicit checkpoint folder
    res2 = _run(toy_options(tmp_path, name='other', total_iter=4),
                resume=str(archived[0] / 'checkpoints' / 'checkpoint-2'))
    assert res2['step'] == 4 and len(res2['losses']) == 2


def test_sigterm_checkpoints_and_stops(tmp_path):
    opt = toy_options(tmp_path, total_iter=10)
    opt['model']['signal_at_step'] = 3
    res = _run(opt)
    assert res['step'] == 4  # the step in flight completes, then checkpoint + stop
    assert (tmp_path / 'toy' / 'checkpoints' / 'checkpoint-4').is_dir() and res['export'] is None
    res = _run(opt)  # the same options resume (the signal step lies behind)
    assert res['step'] == 10 and len(res['losses']) == 6


@MODEL_REGISTRY.register()
class SigintToyModel(ToyModel):
    """ToyModel that sends itself SIGINT (Ctrl-C) ``sigints`` times during step ``sigint_at``."""

    KEYS = ToyModel.KEYS | {'sigint_at', 'sigints'}

    def __init__(self, opt, accelerator=None):
        super().__init__(opt, accelerator)
        self.sigint_at, self.sigints = int(opt['model']['sigint_at']), int(opt['model'].get('sigints', 1))

    def training_step(self, batch, step):
        if step == self.sigint_at:
            for _ in range(self.sigints):
                os.kill(os.getpid(), signal.SIGINT)
        return super().training_step(batch, step)


def test_sigint_checkpoints_and_stops_as_train_py_says(tmp_path, capsys):
    """Ctrl-C (SIGINT): the step in flight finishes, a checkpoint is written, the command exits
    with 130 and the same command resumes; a second Ctrl-C stops at once without a checkpoint;
    the previous SIGINT handler is back afterwards; handle_signals: false leaves Ctrl-C alone."""
    before = signal.getsignal(signal.SIGINT)
    try:  # Python's own handler, as in a terminal (a background shell starts Python with SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _sigint_cases(tmp_path, capsys)
    finally:
        signal.signal(signal.SIGINT, before)


def _sigint_cases(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    opt = toy_options(tmp_path, total_iter=10)
    opt['model'].update(type='SigintToyModel', sigint_at=3)
    opt.pop('_source')
    f = tmp_path / 'sigint.yml'
    f.write_text(yaml.safe_dump(opt))
    assert main(['-opt', str(f)]) == 130
    assert signal.getsignal(signal.SIGINT) is before
    exp = tmp_path / 'toy'
    assert [p.name for p in (exp / 'checkpoints').iterdir()] == ['checkpoint-4'] and not (exp / 'export').exists()
    log = (exp / 'train.log').read_text()
    assert 'SIGINT received' in log and 'stop requested by SIGINT: checkpoint written at step 4' in log
    res = _run(opt)  # the same options resume (the signal step lies behind)
    assert res['step'] == 10 and len(res['losses']) == 6 and res['stopped_by'] is None
    # twice: KeyboardInterrupt at once, no checkpoint of that step, the handler restored
    opt2 = toy_options(tmp_path, name='twice', total_iter=10)
    opt2['model'].update(type='SigintToyModel', sigint_at=2, sigints=2)
    with pytest.raises(KeyboardInterrupt):
        _run(opt2)
    assert not list((tmp_path / 'twice' / 'checkpoints').iterdir())
    assert signal.getsignal(signal.SIGINT) is before
    # off: the loop leaves SIGINT to Python's own handler
    opt3 = toy_options(tmp_path, name='off', total_iter=10, handle_signals=False)
    opt3['model'].update(type='SigintToyModel', sigint_at=2)
    with pytest.raises(KeyboardInterrupt):
        _run(opt3)
    # a process started with SIGINT ignored (a background job of a script) keeps ignoring it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    res = _run(dict(opt3, name='ignored', train=dict(opt3['train'], handle_signals=True)))
    assert res['step'] == 10 and res['stopped_by'] is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_bad_options_fail_clearly(tmp_path, capsys):
    opt = toy_options(tmp_path, total_iter=2)
    bad = copy.deepcopy(opt)
    bad['train']['totl_iter'] = 3
    with pytest.raises(OptionError, match=r"train block of <toy options>: unknown key 'totl_iter' \(did you mean 'total_iter'"):
        _run(bad)
    bad = copy.deepcopy(opt)
    bad['model']['hiden'] = 3
    with pytest.raises(OptionError, match="unknown key 'hiden'"):
        _run(bad)
    bad = copy.deepcopy(opt)
    bad['datasets']['train']['lenght'] = 3
    with pytest.raises(OptionError, match="datasets.train in <toy options>.*unknown key 'lenght'"):
        _run(bad)
    bad = copy.deepcopy(opt)
    bad['train']['mixed_precision'] = 'fp8'
    with pytest.raises(OptionError, match='mixed_precision'):
        _run(bad)
    bad = copy.deepcopy(opt)
    bad['imports'] = ['no_such_plugin_module']
    with pytest.raises(OptionError, match="cannot import 'no_such_plugin_module'"):
        _run(bad)
    assert not (tmp_path / 'toy').exists()  # nothing created for a run that could not start
    # the command line prints one line and exits 2
    yml = tmp_path / 'bad.yml'
    yml.write_text('name: x\nmodel: {type: ToyModel}\nbogus_key: 1\n')
    assert main(['-opt', str(yml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'bogus_key'" in err[0] and str(yml) in err[0]
