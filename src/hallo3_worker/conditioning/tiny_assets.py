"""Tiny offline stand-ins for the audio and text models (tests and the CPU demo).

No model weights can be downloaded where this project is built and tested, so these builders
write small random-weight models in the *same on-disk formats* the real ones use; the real
loading code (``from_pretrained``, audio-separator's model lookup) then runs unchanged on them:

* :func:`build_tiny_wav2vec2`: ``Wav2Vec2Model`` (hidden 32, 2 layers, 7 conv layers of 16
  channels) + ``preprocessor_config.json`` like wav2vec2-base-960h's (``do_normalize: true``).
* :func:`build_tiny_t5`: a SentencePiece model trained in-process on generated English text,
  saved as a ``T5Tokenizer`` folder, plus a 2-layer ``T5EncoderModel`` (d_model 32).
* :func:`build_fake_vocal_separator`: an audio-separator model folder with a one-node ONNX
  "Kim_Vocal_2.onnx" (multiplies the spectrogram by 0.5) and the metadata files
  (``download_checks.json``, ``mdx_model_data.json`` keyed by the file's MD5, ``vr_model_data.json``).
  It exercises the plumbing only; its "vocals" are the input at half amplitude in the STFT domain.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
from pathlib import Path

import torch

from hallo3_worker.conditioning.separation import KIM_VOCAL_2

#: Kim_Vocal_2's real MDX parameters (audio-separator's UVR model data)
KIM_VOCAL_2_MDX_DATA = {
    "compensate": 1.009,
    "mdx_dim_f_set": 3072,
    "mdx_dim_t_set": 8,
    "mdx_n_fft_scale_set": 7680,
    "primary_stem": "Vocals",
}
_DOWNLOAD_LIST_KEYS = (
    "vr_download_list",
    "mdx_download_list",
    "demucs_download_list",
    "mdx23c_download_list",
    "mdx_download_vip_list",
    "mdx23c_download_vip_list",
    "roformer_download_list",
)

_WORDS = (
    "a the portrait of young old woman man person speaks talks smiles looks at camera in front "
    "studio light soft warm cold background blue green red hair short long glasses calm happy "
    "serious news anchor teacher singer reads story clearly slowly quickly with gentle voice and "
    "eyes head moves nods turns slightly while speaking natural expression high quality video"
).split()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_tiny_wav2vec2(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    conv_channels: int = 16,
) -> Path:
    """Write a random-weight wav2vec2 (config, ``model.safetensors``, preprocessor config) to ``out_dir``.

    LayerNorm/GroupNorm affine parameters are randomised too so that every parameter matters.
    """
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        conv_dim=(conv_channels,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2Model(config).eval()
    gen = _seeded(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(out)
    return out


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(lines)]


def build_tiny_t5(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = 128,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
) -> Path:
    """Write a tiny T5 encoder and a SentencePiece ``T5Tokenizer`` (pad 0, eos 1, unk 2) to ``out_dir``."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    spiece = out / "spiece.model"
    spiece.write_bytes(model_bytes.getvalue())
    # Loaded from the folder, as the real one is: transformers 5's T5Tokenizer(vocab_file=...) ignores
    # the file (4 tokens, every piece <unk>), while from_pretrained builds the vocabulary from spiece.model.
    tokenizer = T5Tokenizer.from_pretrained(out, extra_ids=0, legacy=True, local_files_only=True)
    tokenizer.save_pretrained(out)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as t5-v1_1-xxl
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


# A one-node ONNX model (opset 13, IR 8): output = input * 0.5, input "input" of shape
# [batch, 4, dim_f, dim_t]. Embedded as its serialised bytes so that no ONNX package is needed to
# write it; tests/conditioning/test_tiny_assets.py rebuilds it with onnx's helpers and compares.
HALF_GAIN_ONNX = base64.b64decode(
    "CAg6owEKGgoFaW5wdXQKBGhhbGYSBm91dHB1dCIDTXVsEhRmYWtlX3ZvY2FsX3NlcGFyYXRvcioOEAEiBAAAAD9CBGhhbGZaLgoFaW5wdXQS"
    "JQojCAESHwoHEgViYXRjaAoCCAQKBxIFZGltX2YKBxIFZGltX3RiLwoGb3V0cHV0EiUKIwgBEh8KBxIFYmF0Y2gKAggECgcSBWRpbV9m"
    "CgcSBWRpbV90QgQKABAN"
)


def build_fake_vocal_separator(out_dir: str | os.PathLike[str], model_filename: str = KIM_VOCAL_2) -> Path:
    """Write an audio-separator model folder that works offline with a stand-in MDX ONNX model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = HALF_GAIN_ONNX
    (out / model_filename).write_bytes(payload)
    digest = hashlib.md5(payload).hexdigest()  # audio-separator's model lookup key (whole file when < 10 MB)
    checks = {key: {} for key in _DOWNLOAD_LIST_KEYS}
    checks["mdx_download_list"] = {f"MDX-Net Model: {Path(model_filename).stem}": model_filename}
    (out / "download_checks.json").write_text(json.dumps(checks, indent=1), encoding="utf-8")
    (out / "mdx_model_data.json").write_text(json.dumps({digest: KIM_VOCAL_2_MDX_DATA}, indent=1), encoding="utf-8")
    (out / "vr_model_data.json").write_text("{}", encoding="utf-8")
    return out


def build_all(out_dir: str | os.PathLike[str], *, seed: int = 0) -> dict[str, Path]:
    """Build all three stand-ins under ``out_dir``; returns their folders by name."""
    root = Path(out_dir)
    return {
        "wav2vec2": build_tiny_wav2vec2(root / "wav2vec2", seed=seed),
        "t5": build_tiny_t5(root / "t5", seed=seed),
        "audio_separator": build_fake_vocal_separator(root / "audio_separator"),
    }


__all__ = [
    "KIM_VOCAL_2",
    "KIM_VOCAL_2_MDX_DATA",
    "build_all",
    "build_fake_vocal_separator",
    "build_tiny_t5",
    "build_tiny_wav2vec2",
]
