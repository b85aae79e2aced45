"""How much device memory each stage of the pipeline needs, computed from tensor sizes alone.

:class:`TensorMemoryTracker` is a dispatch mode that follows every tensor storage an operation
creates until it is freed, and keeps the running and peak byte counts. Under
``torch._subclasses.fake_tensor.FakeTensorMode`` the operations only compute shapes, so the
full-size networks can be "run" on any machine in seconds without allocating their memory:
:func:`estimate_stage_memory` does that for every stage of a Hallo3 job at 480x720.

What this counts: the bytes of live tensors, as an exact function of the code. What it does not:
the CUDA context, library workspaces (cuBLAS, cuDNN, flash-attention scratch) and the caching
allocator's rounding and fragmentation; :data:`hallo3_worker.fitness.CUDA_OVERHEAD_BYTES` stands in for
those. Kernel choice can differ between devices; attention here is counted as
``scaled_dot_product_attention`` returning only its output, which is what the flash and
memory-efficient kernels allocate (plus a small log-sum-exp). A test recomputes the numbers that
:mod:`hallo3_worker.fitness` uses, so they cannot drift from the code unnoticed.

    python scripts/estimate_memory.py      # prints the table
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GIB = 1024**3


@dataclasses.dataclass
class PeakMemory:
    """The measured peak of the device's allocator over a block (see :func:`device_peak_memory`)."""

    bytes: int | None = None  # None where the device keeps no statistics (the CPU)


@contextlib.contextmanager
def device_peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak bytes PyTorch allocates on an accelerator ``device`` during the block.

    Resets the device's peak statistics at entry; on the CPU (or a device type other than the
    current accelerator) ``bytes`` stays None.
    """
    peak = PeakMemory()
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    measured = device.type != "cpu" and accelerator is not None and accelerator.type == device.type
    index = 0
    if measured:
        index = device.index if device.index is not None else torch.accelerator.current_device_index()
        torch.accelerator.reset_peak_memory_stats(index)
    yield peak
    if measured:
        peak.bytes = int(torch.accelerator.max_memory_allocated(index))


class TensorMemoryTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages alive at each moment (``current``) and the maximum (``peak``).

    Storages created by operations inside the mode are tracked automatically; tensors that exist
    before (weights, inputs) are counted once :meth:`track` is called on them. A storage is counted
    once however many tensors view it, and uncounted when Python frees it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._finalizers: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, *objects: Any) -> int:
        """Count the storages of every tensor in ``objects`` (nested containers and modules too); returns the bytes added."""
        added = 0
        for obj in tree_flatten(list(objects))[0]:
            tensors: Iterable[Any]
            if isinstance(obj, nn.Module):
                tensors = [*obj.parameters(), *obj.buffers()]
            else:
                tensors = [obj]
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor):
                    added += self._add(tensor)
        return added

    def _add(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return 0
        size = storage.nbytes()
        self._sizes[storage] = size
        key = id(storage)

        def release(_: object, key: int = key, size: int = size) -> None:
            self.current -= size
            self._finalizers.pop(key, None)

        self._finalizers[key] = weakref.ref(storage, release)
        self.current += size
        self.peak = max(self.peak, self.current)
        return size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes of one stage: the weights it runs and the peak of everything else it holds at once."""

    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def measure(fn: Callable[[], Any], weights: Iterable[Any], inputs: Iterable[Any] = ()) -> StageMemory:
    """Run ``fn`` under a tracker; activations = peak minus the weights and pre-existing inputs."""
    tracker = TensorMemoryTracker()
    weight_bytes = tracker.track(*weights)
    input_bytes = tracker.track(*inputs)
    with torch.inference_mode(), tracker:
        result = fn()
    del result
    return StageMemory(weights=weight_bytes, activations=tracker.peak - weight_bytes - input_bytes)


def estimate_stage_memory(
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_duration_s: float = 60.0,
    stages: Iterable[str] | None = None,
    feed_forward_chunk: int | None = None,
    sliced_vae_decode: bool = True,
) -> dict[str, StageMemory]:
    """Weights and activation peaks of each stage of a full-size Hallo3 job at 480x720.

    Runs every network under ``FakeTensorMode`` on the CPU (no memory is allocated; takes ~20 s).
    Stages: ``audio`` (wav2vec2 on ``max_duration_s`` seconds, float32), ``text`` (T5-XXL encoder,
    226 tokens), ``reference`` (reference-image VAE encode + reference network), ``denoise`` (one
    classifier-free-guidance forward of the main transformer, batch 2, with fused projections and
    the batch-1 reference keys and values among the inputs), ``vae_encode`` (the 3-frame motion
    clip) and ``vae_decode`` (13 latent frames to 49 with the worker's sliced decoder; diffusers'
    plain one when ``sliced_vae_decode`` is false).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import T5Config, T5EncoderModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from hallo3_worker.conditioning.audio import SAMPLE_RATE, Wav2VecEncoder, frame_count
    from hallo3_worker.conditioning.text import MAX_TEXT_TOKENS
    from hallo3_worker.models import presets
    from hallo3_worker.models.layers import fuse_projections
    from hallo3_worker.models.loading import build_on_meta, replace_tensors
    from hallo3_worker.models.memory_savers import chunk_feed_forward
    from hallo3_worker.models.reference_net import ReferenceNet
    from hallo3_worker.models.transformer import Hallo3Transformer
    from hallo3_worker.models.vae import COGVIDEOX_5B_VAE, SEGMENT_LATENT_FRAMES, Hallo3VAE, build_vae
    from hallo3_worker.models.vae_slicing import unslice_vae_decoder

    wanted = set(stages) if stages is not None else set(STAGES)
    unknown = wanted - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    main_cfg, ref_cfg = presets.full_transformer(), presets.full_reference_net()
    frames = 4 * (main_cfg.latent_frames - 1) + 1
    h, w = main_cfg.latent_height, main_cfg.latent_width
    results: dict[str, StageMemory] = {}

    t5_config = T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
    )  # T5-v1.1-XXL's encoder
    # Modules are built on "meta" outside the fake mode (casts of fake parameters fail), then get
    # fake storage inside it.
    builders: dict[str, Callable[[], nn.Module]] = {
        "audio": lambda: build_on_meta(lambda: Wav2Vec2Model(Wav2Vec2Config()), torch.float32),
        "text": lambda: build_on_meta(lambda: T5EncoderModel(t5_config), dtype),
        "reference": lambda: build_on_meta(lambda: ReferenceNet(ref_cfg), dtype),
        "denoise": lambda: build_on_meta(lambda: Hallo3Transformer(main_cfg), dtype),
    }
    meta = {name: build() for name, build in builders.items() if name in wanted}
    vae_meta = build_vae(COGVIDEOX_5B_VAE, dtype=dtype, device="meta") if wanted & _VAE_STAGES else None

    with FakeTensorMode(allow_non_fake_inputs=True):

        def empty(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dt)

        for module in [*meta.values(), *([vae_meta] if vae_meta is not None else [])]:
            replace_tensors(module, lambda t: torch.empty_like(t, device="cpu"))  # fake storage, ties kept
        fake = dict(meta)
        vae = Hallo3VAE(vae_meta) if vae_meta is not None else None

        if "audio" in wanted:
            model = fake.pop("audio")
            encoder = Wav2VecEncoder(model, Wav2Vec2FeatureExtractor())
            samples = int(max_duration_s * SAMPLE_RATE)
            wave = empty(1, samples, dt=torch.float32)
            num_frames = frame_count(samples)
            results["audio"] = measure(lambda: encoder.hidden_states(wave, num_frames), [model], [wave])
            del model, encoder

        if "text" in wanted:
            t5 = fake.pop("text")
            ids = torch.zeros(1, MAX_TEXT_TOKENS, dtype=torch.long)
            results["text"] = measure(lambda: t5(input_ids=ids).last_hidden_state, [t5], [ids])
            del t5

        if "reference" in wanted:
            ref_net = fake.pop("reference")
            image = empty(1, 3, 1, 8 * h, 8 * w)
            noise = empty(1, COGVIDEOX_5B_VAE.z_channels, 1, h, w)
            results["reference"] = measure(
                lambda: ref_net(vae.encode(image, noise=noise)), [ref_net, vae.vae], [image, noise]
            )
            del ref_net

        if "denoise" in wanted:
            model = fake.pop("denoise")
            if feed_forward_chunk is not None:
                chunk_feed_forward(model, feed_forward_chunk)
            c = main_cfg
            x = empty(2, c.latent_frames, c.in_channels, h, w)
            t = torch.full((2,), 500.0)
            text = empty(2, c.text_length, c.text_dim)
            audio = empty(2, frames, c.audio.window, c.audio.feature_layers, c.audio.feature_dim)
            face = empty(2, c.face.embed_dim)
            # The worker's exact path: fused projections, and the reference tokens' keys and values
            # made once per job (they are inputs of every step, like the tokens they replace).
            fuse_projections(model)
            dh = c.hidden_size // c.num_heads
            reference = [
                (empty(1, c.num_heads, ref_cfg.tokens_per_frame, dh), empty(1, c.num_heads, ref_cfg.tokens_per_frame, dh))
                for _ in range(c.num_layers)
            ]

            def forward() -> torch.Tensor:
                audio_tokens, face_tokens = model.encode_conditions(audio, face)
                return model(x, t, text, audio_tokens, face_tokens, reference)

            results["denoise"] = measure(forward, [model], [x, t, text, audio, face, reference])
            del model

        if "vae_encode" in wanted:
            clip = empty(1, 3, 3, 8 * h, 8 * w)
            noise = empty(1, COGVIDEOX_5B_VAE.z_channels, 1, h, w)
            results["vae_encode"] = measure(lambda: vae.encode_condition(clip, noise=noise), [vae.vae], [clip, noise])

        if "vae_decode" in wanted:
            if not sliced_vae_decode:
                unslice_vae_decoder(vae.vae)
            latents = empty(1, SEGMENT_LATENT_FRAMES, COGVIDEOX_5B_VAE.z_channels, h, w)
            results["vae_decode"] = measure(lambda: vae.decode(latents), [vae.vae], [latents])
    return {name: results[name] for name in STAGES if name in results}


#: The stages of :func:`estimate_stage_memory`, in job order.
STAGES: tuple[str, ...] = ("audio", "text", "reference", "denoise", "vae_encode", "vae_decode")
_VAE_STAGES = {"reference", "vae_encode", "vae_decode"}
