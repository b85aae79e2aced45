"""The Hallo3 reference network: a plain CogVideoX-5B-I2V transformer that encodes the face image.

It runs once per job on the latent of the face-masked reference image, with timestep 0, the image
latent also as its conditioning latent ([ref, ref] on channels), and all-zero text. In every block
it records the modulated, layer-normed video tokens that would enter self-attention; those
per-block tokens are what the main transformer appends to its keys and values.

Only what the recorded tokens depend on is built and run: the last block's attention and MLP,
the final norm and the output layer of the original network never influence them and are left
out (the checkpoint mapping lists their keys as intentionally unused).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from hallo3_worker.models.layers import BackboneConfig, DiTBackbone, DiTBlock


@dataclasses.dataclass(frozen=True)
class ReferenceNetConfig(BackboneConfig):
    """Same hyper-parameters as the main transformer's backbone; defaults are the checkpoint's."""


class ReferenceNet(DiTBackbone):
    def __init__(self, config: ReferenceNetConfig) -> None:
        super().__init__(config)
        last = config.num_layers - 1
        self.blocks = nn.ModuleList(
            [DiTBlock(config, attention_and_mlp=i < last) for i in range(config.num_layers)]
        )

    def forward(self, reference_latent: torch.Tensor) -> list[torch.Tensor]:
        """reference_latent: (B, T_ref, C, H, W), normally one latent frame.

        Returns one (B, T_ref*h*w, D) tensor per block, in the weights' dtype.
        """
        c = self.config
        b, frames = reference_latent.shape[:2]
        param = self.pos_embedding
        latents = torch.cat([reference_latent, reference_latent], dim=2)  # (B, T_ref, 2C, H, W)
        timesteps = torch.zeros(b, device=param.device)
        text = torch.zeros(b, c.text_length, c.text_dim, device=param.device, dtype=param.dtype)

        emb, text_tokens, video_tokens = self.embed(latents, timesteps, text)
        rope = self.rope(frames, param.device)
        tokens = []
        for block in self.blocks:
            mod = block.modulation(emb)
            text_in, video_in = block.attention_input(text_tokens, video_tokens, mod)
            tokens.append(video_in)
            if not block.has_attention_and_mlp:
                break
            text_tokens, video_tokens = block.attention_residual(
                text_tokens, video_tokens, text_in, video_in, mod, rope
            )
            text_tokens, video_tokens = block.mlp_residual(text_tokens, video_tokens, mod)
        return tokens
