"""Keep the agent's processes lean: nfstream imports pandas at module level, for exporters
(``to_pandas``, ``to_csv``) the agent never calls. Importing this module first puts a stand-in
for pandas in ``sys.modules`` that imports the real one on first use, so that the agent process,
its forkserver and every meter process do without it (40 MB each with pandas alone, 90 MB when
pyarrow is installed beside it). It changes nothing when pandas is already imported.

``auris.agent.cli`` imports it before anything else; tools that use pandas for real (training,
the collector's exports) never import it, and would work unchanged if they did.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

__all__ = ["defer_pandas"]


class _DeferredModule(types.ModuleType):
    """Stands in for a module until an attribute of it is first read."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update({k: v for k, v in real.__dict__.items() if k not in ("__class__",)})
        return getattr(real, name)


def defer_pandas() -> bool:
    """Put the stand-in in place; False when pandas is imported already or not installed."""
    if "pandas" in sys.modules:
        return False
    spec = importlib.util.find_spec("pandas")
    if spec is None:
        return False
    stand_in = _DeferredModule("pandas", "pandas, imported on first use (auris.agent.lean)")
    stand_in.__spec__ = spec
    sys.modules["pandas"] = stand_in
    return True


defer_pandas()
