"""Turning the user's image, audio and prompt into the tensors the denoiser consumes."""
