"""lingbot: train, evaluate and ship LingBot-VA style video-action world-model policies.

Kept import-light on purpose: heavy libraries (torch, lerobot, mujoco, great_expectations, prefect)
are imported inside the functions that use them, so ``import lingbot`` and ``lingbot --help`` stay fast.
"""

__version__ = "0.1.0"
