"""Test plugin (``imports: [tests.deedsr_plugin]``): DeeDSRModel that records, at every
validation, the trained parameters of its process (``model.record_dir``), so the multi-process
test can compare the replicas."""
import os

import torch

from dalpsr.models.deedsr_model import DeeDSRModel
from dalpsr.utils.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class RecordingDeeDSRModel(DeeDSRModel):
    def __init__(self, opt, accelerator=None):
        opt = dict(opt, model=dict(opt['model']))
        self.record_dir = opt['model'].pop('record_dir')
        self.rank = accelerator.process_index if accelerator is not None else 0
        opt['model']['type'] = 'DeeDSRModel'
        super().__init__(opt, accelerator)

    @torch.no_grad()
    def validate(self, loader, step, writer=None):
        out = super().validate(loader, step, writer)
        state = {f'adapter.{k}': v.detach().cpu().clone() for k, v in self.unwrap(self.adapter).state_dict().items()}
        state.update({f'unet.{k}': v.detach().cpu().clone() for k, v in self.unwrap(self.unet).named_parameters()
                      if v.requires_grad})
        os.makedirs(self.record_dir, exist_ok=True)
        torch.save(state, os.path.join(self.record_dir, f'params_rank{self.rank}_step{step}.pth'))
        return out
