"""Training: teacher forcing + flow matching over the latent cache, checkpoints, exact resume, DDP/FSDP."""
