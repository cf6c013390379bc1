"""The sampler equals diffusers' StableDiffusionControlNetPipeline where it claims to (issue 13.6):
noise start, image conditioning, DDIM, classifier-free guidance, same tiny modules and seed."""
import pytest
import torch

from dalpsr.pipelines import DaLPSRSampler
from dalpsr.pipelines.schedulers import build_scheduler
from tests.unchanged_reference import SD21_SCHEDULER, tiny_sd


@pytest.mark.parametrize('guidance,steps', [(5.5, 3), (1.0, 2)])
def test_equals_stable_diffusion_controlnet_pipeline(guidance, steps):
    from diffusers import StableDiffusionControlNetPipeline
    comps, cn = tiny_sd('image')
    sampler = DaLPSRSampler(comps, cn, device='cpu', condition_mode='image')
    lq = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(0))  # -> 64 x 128: no padding
    prompt, negative, seed = 'a photo of a red kite', 'blurry, lowres', 11
    ours = sampler(lq, prompt, negative_prompt=negative, num_steps=steps, guidance_scale=guidance, scheduler='ddim',
                   start='noise', seed=seed, color_fix='none')
    pipe = StableDiffusionControlNetPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                             unet=comps.unet, controlnet=cn,
                                             scheduler=build_scheduler('ddim', SD21_SCHEDULER), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, image=sampler.upsample(lq), height=64, width=128, num_inference_steps=steps,
               guidance_scale=guidance, negative_prompt=negative, generator=torch.Generator().manual_seed(seed),
               output_type='pt').images
    assert ours.shape == ref.shape == (1, 3, 64, 128)
    assert sampler.last_stats['unet_calls'] == steps
    assert (ours - ref.float()).abs().max() <= 1e-5
    # and it is not trivially equal: another seed differs
    other = sampler(lq, prompt, negative_prompt=negative, num_steps=steps, guidance_scale=guidance, scheduler='ddim',
                    start='noise', seed=seed + 1, color_fix='none')
    assert (other - ref.float()).abs().max() > 1e-3
