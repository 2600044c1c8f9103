"""What counts as head in an MR volume: one threshold, shared by the preprocessing mask and registration's
sampling mask so that both agree on where the head is."""

from __future__ import annotations

import numpy as np


def head_threshold(data: np.ndarray) -> float:
    """10% of the bright end (99th percentile of the positive voxels): above the noise, below any tissue."""
    positive = data[data > 0]
    return 0.1 * float(np.percentile(positive, 99)) if positive.size else 0.0
