"""Hypothesis profile of the robustness tests: deterministic in CI, more examples on request.

SWITCHHEAD_HYPOTHESIS_EXAMPLES=N sets the example count of every property test to N (a local soak
run, e.g. 2000); CI uses each test's own count (attention_gen.examples). Examples are derandomized (the same
examples on every run) and nothing is stored in a database between runs.
"""

import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile(
    "switchhead-robustness",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

