"""The LR-embedded start is noised to the level of the first timestep actually run (issue 13.5),
for every scheduler offered; and a batch's results do not depend on its neighbours' prompts
(issue 13.1: long-caption neighbour)."""
import pytest
import torch

from dalpsr.pipelines import Conditions, Denoiser, DenoisingLoop
from dalpsr.pipelines.schedulers import SCHEDULERS, alphas_cumprod, build_scheduler
from tests.test_denoising_loop import tiny_vae
from tests.unchanged_reference import LONG_PROMPT, SD21_SCHEDULER, tiny_sd


class FirstInput(Denoiser):
    def __init__(self):
        self.inputs = []

    def predict(self, x_t, t, c):
        self.inputs.append((int(t), x_t.clone()))
        return 0.1 * x_t


@pytest.fixture(scope='module')
def loop():
    return DenoisingLoop(tiny_vae(), SD21_SCHEDULER, scale=4, device='cpu')


def _run(loop, name, **kw):
    den = FirstInput()
    lq = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = {'num_steps': 4, 'scheduler': name, 'guidance_scale': 1.0, 'color_fix': 'none', **kw}
    lat = loop(lq, den, lambda lr: Conditions(cond={'x': lr.z_lr}), seeds=[3], settings=settings, output='latent')
    return den, lat


@pytest.mark.parametrize('name', list(SCHEDULERS))
def test_lr_start_is_noised_at_the_first_timestep_run(loop, name):
    den, _ = _run(loop, name)
    t0, x0 = den.inputs[0]
    assert loop.last_stats['start_noise_t'] == t0 == loop.last_stats['timesteps'][0]
    z_lr = loop.prepare(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))).z_lr
    eps = torch.randn((1,) + tuple(z_lr.shape[1:]), generator=torch.Generator().manual_seed(3))
    a = float(alphas_cumprod(build_scheduler(name, SD21_SCHEDULER))[t0])
    assert torch.allclose(x0, a ** 0.5 * z_lr + (1 - a) ** 0.5 * eps, atol=1e-5)
    # the level before the fix (t = start_step = 999) is a different start unless the schedule
    # begins at 999 (dpmsolver++ and unipc: linspace spacing)
    old, _ = _run(loop, name, start_noise='start_step')
    assert torch.allclose(old.inputs[0][1], x0, atol=1e-4) == (t0 == 999)
    assert (t0 < 999) == (name in ('ddpm', 'ddim'))


@pytest.mark.parametrize('name', list(SCHEDULERS))
def test_trailing_spacing_and_first_step_noise_agree(loop, name):
    """The two fixes of the issue agree: with trailing spacing the first timestep is 999, so
    noising at the first timestep run and at start_step give the same result."""
    kw = {'scheduler_overrides': {'timestep_spacing': 'trailing'}}
    a, lat_a = _run(loop, name, **kw)
    b, lat_b = _run(loop, name, start_noise='start_step', **kw)
    assert a.inputs[0][0] == 999 == loop.last_stats['timesteps'][0]
    assert torch.equal(lat_a, lat_b)


def test_truncated_schedule_noises_at_its_first_kept_timestep(loop):
    den, _ = _run(loop, 'ddim', num_steps=10, start_step=500)
    assert den.inputs[0][0] == loop.last_stats['start_noise_t'] == max(loop.last_stats['timesteps']) <= 500


def test_long_caption_neighbour_does_not_change_a_short_prompt_image():
    """Issue 13.1: a short prompt batched with a long (2-chunk) caption gives exactly what it gives
    alone; padding it to 2 chunks (what one shared encoding did) would change it."""
    from dalpsr.archs.text_encoding import count_chunks
    from dalpsr.pipelines import DaLPSRSampler
    comps, cn = tiny_sd('latent')
    sampler = DaLPSRSampler(comps, cn, device='cpu')
    assert count_chunks(sampler.tokenizer, ['a cat', LONG_PROMPT]) == [1, 2]
    g = torch.Generator().manual_seed(0)
    lq = torch.rand(2, 3, 8, 8, generator=g)
    kw = dict(num_steps=2, scheduler='ddim', negative_prompt='blur', color_fix='none')
    both = sampler(lq, ['a cat', LONG_PROMPT], seed=[1, 2], **kw)
    assert sampler.last_stats['groups'] == 2 and sampler.last_stats['unet_calls'] == 4
    alone = sampler(lq[:1], 'a cat', seed=1, **kw)
    assert torch.equal(both[:1], alone)
    assert torch.equal(both[1:], sampler(lq[1:], LONG_PROMPT, seed=2, **kw))
    # what one shared encoding of the batch did to the short prompt (padded to 2 chunks, empty
    # second chunk): a visibly different image
    from dalpsr.archs.text_encoding import encode_prompts
    emb = encode_prompts(sampler.tokenizer, sampler.text_encoder, ['blur', 'a cat'], max_chunks=3, min_chunks=2)
    assert emb.shape[1] == 2 * 77

    def conditions(lr):
        return Conditions(cond={'text': emb[1:]}, uncond={'text': emb[:1]}, spatial={'control': lr.z_lr})
    padded = sampler.loop(lq[:1], sampler.denoiser, conditions, seeds=[1],
                          settings={'num_steps': 2, 'scheduler': 'ddim', 'color_fix': 'none'})
    assert (padded - alone).abs().max() > 1e-3
