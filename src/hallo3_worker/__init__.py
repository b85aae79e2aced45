"""Hallo3 (portrait image + speech audio + prompt -> talking-head video) as a Runpod worker."""

__version__ = "0.1.0"
