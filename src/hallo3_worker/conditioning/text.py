"""Prompt -> T5 encoder states, as Hallo3's ``FrozenT5Embedder`` computes them.

Upstream (``hallo3/sgm/modules/encoders/modules.py:235-282``): ``T5Tokenizer`` +
``T5EncoderModel`` from a local folder (transformers 5 has one ``T5Tokenizer``, backed by
``tokenizers`` and built from the folder's ``spiece.model``; its ids are SentencePiece's own), tokenised with ``truncation=True, max_length=226,
padding="max_length"`` (EOS appended, pad id 0), encoded with **no attention mask** (pad
positions take part in attention), output ``last_hidden_state`` of shape (1, 226, d_model).
The negative prompt is ``""`` and its embedding is replaced by zeros
(``force_uc_zero_embeddings=["txt"]``), so :meth:`T5TextEncoder.unconditional` returns zeros
without running T5.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import T5EncoderModel, T5Tokenizer

logger = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 226  #: upstream's ``max_length`` for the T5 conditioner


class T5TextEncoder:
    """T5 encoder wrapper producing Hallo3's text conditioning.

    The model runs in the dtype and on the device it was created with (upstream: bf16 with
    autocast disabled); both are explicit arguments of :meth:`from_pretrained`.
    """

    def __init__(
        self,
        model: T5EncoderModel,
        tokenizer: T5Tokenizer,
        *,
        max_length: int = MAX_TEXT_TOKENS,
    ) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        tokenizer_dir: str | os.PathLike[str] | None = None,
        max_length: int = MAX_TEXT_TOKENS,
    ) -> T5TextEncoder:
        """Load tokenizer and encoder from local folders (no downloads).

        Args:
            model_dir: folder with the T5 encoder weights and config.
            tokenizer_dir: folder with ``spiece.model`` (defaults to ``model_dir``).
        """
        tokenizer = T5Tokenizer.from_pretrained(os.fspath(tokenizer_dir or model_dir), local_files_only=True)
        model = T5EncoderModel.from_pretrained(os.fspath(model_dir), local_files_only=True, dtype=dtype)
        model = model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids of shape (1, max_length): truncated, EOS-terminated, right-padded with the pad id."""
        batch = self.tokenizer(
            [prompt],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"]

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        """Conditional text embedding, shape (1, max_length, d_model), on the model's device and dtype.

        No attention mask is given to the encoder, as upstream does.
        """
        ids = self.tokenize(prompt).to(self.device)
        return self.model(input_ids=ids).last_hidden_state

    def unconditional(self) -> torch.Tensor:
        """Upstream's unconditional text embedding: zeros of shape (1, max_length, d_model)."""
        return torch.zeros(1, self.max_length, self.hidden_size, device=self.device, dtype=self.dtype)
