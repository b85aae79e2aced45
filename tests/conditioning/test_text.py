"""T5 text conditioning on a tiny random-weight T5 built offline (real loading code paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file as load_numpy

from hallo3_worker.conditioning import tiny_assets
from hallo3_worker.conditioning.text import MAX_TEXT_TOKENS, T5TextEncoder

PROMPT = "a portrait of a young woman speaks to the camera with a calm expression"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_assets.build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def encoder(t5_dir: Path) -> T5TextEncoder:
    return T5TextEncoder.from_pretrained(t5_dir, device="cpu", dtype=torch.float32)


def test_tiny_t5_folder_has_the_real_layout(t5_dir: Path, encoder: T5TextEncoder) -> None:
    names = {p.name for p in t5_dir.iterdir()}
    assert {"spiece.model", "config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert type(encoder.tokenizer).__name__ == "T5Tokenizer"  # built from spiece.model, as upstream
    assert encoder.tokenizer.pad_token_id == 0 and encoder.tokenizer.eos_token_id == 1
    assert encoder.model.config.vocab_size >= len(encoder.tokenizer)


def test_encode_shape_device_dtype(encoder: T5TextEncoder) -> None:
    cond = encoder.encode(PROMPT)
    assert cond.shape == (1, MAX_TEXT_TOKENS, 32) == (1, 226, encoder.hidden_size)
    assert cond.dtype == torch.float32 and cond.device.type == "cpu"
    assert torch.isfinite(cond).all() and cond.abs().max() > 0
    assert torch.equal(encoder.encode(PROMPT), cond)  # deterministic


def test_dtype_is_a_parameter(t5_dir: Path) -> None:
    bf16 = T5TextEncoder.from_pretrained(t5_dir, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.encode(PROMPT).dtype == torch.bfloat16
    assert bf16.unconditional().dtype == torch.bfloat16


def test_tokenization_pads_with_eos_and_pad_ids(encoder: T5TextEncoder) -> None:
    ids = encoder.tokenize(PROMPT)[0]
    assert ids.shape == (226,)
    real = int((ids != 0).sum())
    assert 2 < real < 60
    assert ids[real - 1] == 1  # EOS closes the prompt
    assert (ids[real:] == 0).all()  # then pad id 0 up to 226


def test_long_prompts_are_truncated_to_226_tokens(encoder: T5TextEncoder) -> None:
    long_prompt = " ".join([PROMPT] * 60)
    ids = encoder.tokenize(long_prompt)[0]
    assert ids.shape == (226,)
    assert (ids != 0).all() and ids[-1] == 1  # full of text, EOS kept last
    assert encoder.encode(long_prompt).shape == (1, 226, 32)


def test_no_attention_mask_is_passed(encoder: T5TextEncoder) -> None:
    """Pad positions take part in attention, as in upstream's FrozenT5Embedder."""
    ids = encoder.tokenize(PROMPT)
    with torch.inference_mode():
        unmasked = encoder.model(input_ids=ids).last_hidden_state
        masked = encoder.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    cond = encoder.encode(PROMPT)
    assert torch.equal(cond, unmasked)
    assert not torch.allclose(cond, masked)


def test_unconditional_is_zeros_without_running_t5(encoder: T5TextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("T5 must not run for the unconditional embedding")

    monkeypatch.setattr(encoder.model, "forward", forbidden)
    uncond = encoder.unconditional()
    assert uncond.shape == (1, 226, 32) and uncond.dtype == torch.float32
    assert not uncond.any()


def test_token_ids_are_sentencepieces_own(t5_dir: Path, encoder: T5TextEncoder) -> None:
    """Upstream tokenised with SentencePiece itself: the same pieces, then EOS, then pad ids."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    assert len(encoder.tokenizer) == processor.get_piece_size()
    for prompt in (PROMPT, "", "Hello, World!  two   spaces", "unknown \u2713 char \u00fc"):
        expected = processor.encode(prompt) + [1]
        ids = encoder.tokenize(prompt)[0].tolist()
        assert ids == expected + [0] * (MAX_TEXT_TOKENS - len(expected)), prompt
    assert len(set(encoder.tokenize(PROMPT)[0].tolist()) - {0, 1, 2}) > 5  # real pieces, not <unk>


def test_tiny_t5_builder_is_deterministic(tmp_path: Path, t5_dir: Path) -> None:
    again = tiny_assets.build_tiny_t5(tmp_path / "again")
    assert (again / "spiece.model").read_bytes() == (t5_dir / "spiece.model").read_bytes()
    a, b = load_numpy(str(again / "model.safetensors")), load_numpy(str(t5_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_max_length_must_be_positive(t5_dir: Path) -> None:
    with pytest.raises(ValueError):
        T5TextEncoder.from_pretrained(t5_dir, device="cpu", dtype=torch.float32, max_length=0)
