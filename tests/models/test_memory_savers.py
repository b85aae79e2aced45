"""Memory savers attach from outside and leave the networks' outputs unchanged."""

from __future__ import annotations

import torch

from transformer_inputs import guided_inputs

from hallo3_worker.memory import measure
from hallo3_worker.models import presets
from hallo3_worker.models.loading import build_on_meta, materialize_random
from hallo3_worker.models.memory_savers import chunk_feed_forward
from hallo3_worker.models.transformer import Hallo3Transformer


def _transformer() -> Hallo3Transformer:
    return materialize_random(build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer())), "cpu", seed=3)


def _inputs(c, seed: int):
    return guided_inputs(c, seed, reference_tokens=7)


def test_chunked_feed_forward_matches_the_plain_network() -> None:
    plain, chunked = _transformer(), _transformer()
    assert chunk_feed_forward(chunked, chunk_tokens=100) == plain.config.num_layers
    for seed in (1, 2):  # fresh inputs each time
        x, t, text, audio, face, reference = _inputs(plain.config, seed)
        with torch.inference_mode():
            expected = plain(x, t, text, *plain.encode_conditions(audio, face), reference)
            got = chunked(x, t, text, *chunked.encode_conditions(audio, face), reference)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_chunked_feed_forward_lowers_the_peak() -> None:
    plain, chunked = _transformer(), _transformer()
    chunk_feed_forward(chunked, chunk_tokens=64)
    x, t, text, audio, face, reference = _inputs(plain.config, 4)

    def run(model: Hallo3Transformer):
        tokens = model.encode_conditions(audio, face)
        return lambda: model(x, t, text, *tokens, reference)

    tokens_total = plain.config.text_length + plain.config.latent_frames * plain.config.tokens_per_frame
    assert tokens_total > 64  # the chunking really splits the sequence
    plain_peak = measure(run(plain), [plain], [x, t, text, audio, face, reference]).activations
    chunked_peak = measure(run(chunked), [chunked], [x, t, text, audio, face, reference]).activations
    assert chunked_peak < plain_peak
