"""Causal video VAE: diffusers AutoencoderKLWan, pretrained or trained here; streaming encode."""
