"""``fastformers bench recipes``: time to a validation loss of each model's
default recipe. Stub of the interface the recipes branch implements (issue
#16, item 6)."""
from __future__ import annotations

from typing import Optional, Sequence


def recipes_report(models: Sequence[str], threads: int, time_limit_s: float, data_path: Optional[str] = None) -> str:
    return "recipes: the time-to-loss bench is not in this build yet (issue #16, item 6)"
