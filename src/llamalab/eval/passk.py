"""The unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language Models
Trained on Code").

With n samples of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that at
least one of k samples drawn without replacement from the n passes. The product form
below avoids the huge binomial coefficients of n = 200.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimated pass@k of one problem from ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(results: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n samples, c correct)."""
    if not results:
        return math.nan
    return math.fsum(pass_at_k(n, c, k) for n, c in results) / len(results)
