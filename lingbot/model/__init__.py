"""The Mixture-of-Transformers world model: experts, joint attention, masks, flow matching."""
