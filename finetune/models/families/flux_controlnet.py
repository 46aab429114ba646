"""FLUX.1 with a ControlNet: a `FluxControlNetModel` beside the frozen transformer, driven exactly as
`FluxControlNetPipeline` drives them:

- the ControlNet takes the same packed tokens, ids, timestep, guidance and text as the transformer, plus the
  control image's latents packed alike (`controlnet_cond`); its block outputs are added inside the transformer
  (`controlnet_block_samples`, `controlnet_single_block_samples`);
- it starts as diffusers' train_controlnet_flux.py makes it: `FluxControlNetModel.from_transformer`, the first
  blocks copied from the base and the control input projection zero, so training starts from the base's output.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from finetune.models.families.flux import FLUX, FluxFamily
from finetune.models.families.flux_control import ControlPipelineCalls

PIPELINE = "FluxControlNetPipeline"


@dataclass(frozen=True)
class FluxControlNetFamily(ControlPipelineCalls, FluxFamily):
    #: the diffusers class of its ControlNet (what an exported one loads as)
    controlnet_class = "FluxControlNetModel"

    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        return False  # a base with a ControlNet is its base's family; a controlnet method makes this one

    def make_controlnet(self, denoiser, vae, layers: int | None, single_layers: int | None):
        """A ControlNet initialised from the base's own embedders and first blocks (`layers` double-stream,
        `single_layers` single-stream; None: as many as the base has)."""
        from diffusers import FluxControlNetModel

        c = denoiser.config
        return FluxControlNetModel.from_transformer(
            denoiser, num_layers=min(layers or c.num_layers, c.num_layers),
            num_single_layers=min(single_layers if single_layers is not None else c.num_single_layers,
                                  c.num_single_layers),
            attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads)

    def references(self, batch) -> list:
        return []  # the control image goes to the ControlNet

    def control_residuals(self, inputs: dict, batch) -> dict:
        from diffusers import FluxControlNetPipeline

        (control,) = batch["references"]
        noisy = inputs["hidden_states"]
        cond = FluxControlNetPipeline._pack_latents(control.to(noisy.dtype), *control.shape)
        net = batch["modules"]["controlnet"]
        blocks, singles = net(**inputs, controlnet_cond=cond, controlnet_mode=None, conditioning_scale=1.0,
                              return_dict=False)
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles}


FLUX_CONTROLNET = FluxControlNetFamily(**{
    **{f.name: getattr(FLUX, f.name) for f in fields(FLUX)},
    "name": "flux_controlnet",
    "pipeline_class": PIPELINE,
    "edit_pipeline_class": PIPELINE,
    "control_family": None,
    "controlnet_family": None,  # it is one
    "single_file_signs": (),
})
