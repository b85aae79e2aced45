"""The Hallo3 networks in plain PyTorch: main transformer, reference net, projectors."""
