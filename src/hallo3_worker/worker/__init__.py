"""The Runpod-facing side: job schema, input fetching, output encoding and delivery."""
