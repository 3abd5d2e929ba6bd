"""The decoder's likelihood p(x|z) in pure numpy: the reconstruction term the model card reports."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["bernoulli_nll"]


def bernoulli_nll(x: npt.ArrayLike, logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """-log p(x | logits) summed over all but the first axis, in nats: one value per image (N,).

    x is (N, ...) in [0, 1] and logits are the decoder's, the same shape: binary cross-entropy with logits,
    softplus(l) - x l for each logit l, in double, as `training` computes the model card's reconstruction
    term. From the means it is not exact where they have rounded to 0 or 1 in float32 (logits past about
    ±17): a pixel there costs |l| times its distance from the rounded mean, which log(0) cannot give.
    """
    x = np.asarray(x, dtype=np.float64)
    logit = np.asarray(logits, dtype=np.float64)
    nll = np.logaddexp(0.0, logit) - x * logit
    per_image: npt.NDArray[np.float64] = nll.reshape(len(nll), -1).sum(axis=1)
    return per_image
