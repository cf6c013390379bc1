"""DaLPSRModel.sample (training-time validation) is the one sampler on the model's networks."""
import copy
import types

import torch

from tests.test_dalpsr_model import _build, _fixed_batch, _opt


def test_model_sample_equals_the_sampler_and_leaves_training_state(tmp_path):
    from dalpsr.archs.sd_components import build_tiny_sd
    from dalpsr.pipelines import DaLPSRSampler
    sd = build_tiny_sd(tmp_path / 'sd', seed=0)
    model = _build(_opt(tmp_path / 'exp', sd))
    cn = model.unwrap(model.controlnet)
    cn.train()
    lq = _fixed_batch()['lq'][:2].float()
    sr = model.sample(lq, ['a kite', 'a red kite'], num_steps=2, guidance_scale=4.0, seed=4, start_step=800)
    assert sr.shape == (2, 3, lq.shape[-2] * 4, lq.shape[-1] * 4) and sr.min() >= 0 and sr.max() <= 1
    # the training state is untouched: the ControlNet still trains
    assert cn.training and all(p.requires_grad for p in cn.parameters())
    parts = types.SimpleNamespace(vae=copy.deepcopy(model.vae), unet=copy.deepcopy(model.unet),
                                  text_encoder=copy.deepcopy(model.text_encoder), tokenizer=model.tokenizer,
                                  scheduler_config=dict(model.components.scheduler_config))
    ref = DaLPSRSampler(parts, copy.deepcopy(cn), device='cpu', max_chunks=model.max_chunks)
    want = ref(lq, ['a kite', 'a red kite'], negative_prompt='', num_steps=2, guidance_scale=4.0, scheduler='ddim',
               start_step=800, seed=[4, 5], color_fix='none')
    assert torch.allclose(sr, want, atol=1e-6)
    assert max(ref.last_stats['timesteps']) <= 800 < 999
