"""The decoder's likelihood p(x|z) in pure numpy: the reconstruction term the model card reports."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["bernoulli_nll"]

# torch.nn.functional.binary_cross_entropy clamps each log at -100 so that p = 0 or 1 stays finite.
_LOG_FLOOR = -100.0


def bernoulli_nll(x: npt.ArrayLike, probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """-log p(x | probs) summed over all but the first axis, in nats: one value per image (N,).

    x and probs are (N, ...) in [0, 1]; this is binary cross-entropy with reduction "sum" per image, the way
    torch computes it (`training` reports the same quantity).
    """
    x = np.asarray(x, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(p), _LOG_FLOOR)
        log_q = np.maximum(np.log1p(-p), _LOG_FLOOR)
    nll = -(x * log_p + (1.0 - x) * log_q)
    per_image: npt.NDArray[np.float64] = nll.reshape(len(nll), -1).sum(axis=1)
    return per_image
