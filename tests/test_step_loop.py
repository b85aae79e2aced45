"""The denoising step loop never makes the host wait for the device.

On a GPU, reading a value back (``.item()``, ``bool(t)``, ``nonzero``) or copying from ordinary
host memory without ``non_blocking`` stalls the host until the GPU's queue drains, which leaves
the GPU idle between kernels. Here the pipeline's own ``denoise_segment`` runs on the ``meta``
device, which stands in for an accelerator (no value can be read back from it), under a dispatch
mode that counts every operation that would wait. None may occur.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hallo3_worker.denoiser import SegmentConditions
from hallo3_worker.models.loading import build_on_meta
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.vae import TINY_VAE, Hallo3VAE, build_vae
from hallo3_worker.pipeline import Hallo3Components, Hallo3Pipeline, JobConditions, Placement, SeededNoise
from hallo3_worker.sampling import SamplerConfig
from hallo3_worker.tiny import tiny_reference_net_config, tiny_transformer_config
from hallo3_worker.models.transformer import Hallo3Transformer

META = torch.device("meta")
READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"}


class WaitCounter(TorchDispatchMode):
    """Counts reads of device values and blocking host-to-device copies."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[str] = []
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in READS:
            self.waits.append(name)
        if name in ("aten::to", "aten::_to_copy") and args[0].device.type == "cpu" and kwargs.get("device", args[0].device).type != "cpu":
            self.copies += 1
            if not kwargs.get("non_blocking", False):
                self.waits.append(f"blocking host-to-device copy of {tuple(args[0].shape)}")
        return func(*args, **kwargs)


def test_denoise_segment_never_waits_for_the_device() -> None:
    transformer = build_on_meta(lambda: Hallo3Transformer(tiny_transformer_config()))
    components = Hallo3Components(
        transformer=transformer,
        reference_net=build_on_meta(lambda: ReferenceNet(tiny_reference_net_config())),
        vae=Hallo3VAE(build_vae(TINY_VAE, device="meta")),
        text_encoder=None,
        audio_encoder=None,
        face_analyzer=None,
    )
    pipeline = Hallo3Pipeline(components, Placement(device=META, offload=False), canvas=(64, 96))
    c = transformer.config
    frames = 4 * (c.latent_frames - 1) + 1
    empty = lambda *shape: torch.empty(*shape, device=META)  # noqa: E731
    shared = JobConditions(
        features=None,
        text=empty(1, c.text_length, c.text_dim),
        face=empty(1, c.face.embed_dim),
        image=empty(1, 3, 1, 64, 96),
        reference=[empty(1, c.tokens_per_frame, c.hidden_size) for _ in range(c.num_layers)],
        plan_crop=(0, 0, 64, 96),
        output_size=(64, 96),
        sampler=SamplerConfig(num_steps=4),
    )
    conditions = SegmentConditions(
        concat=empty(1, c.latent_frames, c.out_channels, c.latent_height, c.latent_width),
        text=shared.text,
        audio_features=empty(1, frames, c.audio.window, c.audio.feature_layers, c.audio.feature_dim),
        face_embedding=shared.face,
    )
    steps: list[int] = []
    counter = WaitCounter()
    noise = SeededNoise(1)
    with torch.inference_mode():
        # Segment 0 also makes what a job makes once (the sampler's tables, the reference keys and values).
        pipeline.denoise_segment(shared, 0, conditions, noise, lambda i, n: None)
        with counter:
            latents = pipeline.denoise_segment(shared, 1, conditions, noise, lambda i, n: steps.append(i))
    assert steps == [0, 1, 2, 3]
    assert latents.device == META and latents.shape == (1, c.latent_frames, c.out_channels, c.latent_height, c.latent_width)
    assert counter.copies >= 4  # the initial noise and each step's noise really went to the device
    assert counter.waits == []
