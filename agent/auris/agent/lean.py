"""Import nfstream without pandas: nfstream imports pandas at module level for one exporter
(``NFStreamer.to_pandas``) that the agent never calls.

Importing this module imports nfstream with a stand-in for pandas that only nfstream sees
(``sys.modules`` holds it for the length of that import and no longer):

- pandas installed: the stand-in imports it on first use, so ``to_pandas`` works as before while
  the agent process, its forkserver and every meter process do without it (40 MB each with pandas
  alone, 90 MB when pyarrow is installed beside it);
- pandas not installed (the agent venv ``packaging/install.sh`` makes, 90 MB smaller): the
  stand-in raises a one-line ``ModuleNotFoundError`` naming the fix if anything uses it, and
  ``to_pandas`` raises it at once (nfstream's own would meter the whole source into a CSV file
  first, then fail and leave the file behind). ``to_csv`` needs no pandas and works either way.

Every agent module that imports nfstream imports this one first (tests/test_packaging.py checks
it), and the meters' forkserver preloads it. Code elsewhere that imports pandas gets the real
module, or Python's usual ``ModuleNotFoundError``: nothing outside nfstream is changed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Literal

__all__ = ["PANDAS_MISSING", "import_nfstream", "nfstream_pandas"]

PANDAS_MISSING = (
    "pandas is not installed: nfstream's to_pandas() needs it "
    "(packaging/install.sh --with-pandas, or pip install pandas into this environment)"
)

PandasState = Literal["real", "deferred", "missing"]


class _DeferredModule(types.ModuleType):
    """Stands in for an installed module until an attribute of it is first read."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update({k: v for k, v in real.__dict__.items() if k not in ("__class__",)})
        return getattr(real, name)


class _MissingModule(types.ModuleType):
    """Stands in for a module that is not installed: using it raises ModuleNotFoundError."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            # Introspection (copy, pickle, inspect, getattr with a default) sees a plain module.
            raise AttributeError(name)
        raise ModuleNotFoundError(PANDAS_MISSING, name=self.__name__)


def _to_pandas_needs_pandas(self: Any, columns_to_anonymize: Any = ()) -> Any:
    raise ModuleNotFoundError(PANDAS_MISSING, name="pandas")


def nfstream_pandas() -> PandasState | None:
    """What nfstream's ``pd`` is: the real pandas, the deferred or the missing stand-in (None when
    nfstream is not imported)."""
    streamer = sys.modules.get("nfstream.streamer")
    if streamer is None:
        return None
    pd = getattr(streamer, "pd", None)
    if isinstance(pd, _MissingModule):
        return "missing"
    if isinstance(pd, _DeferredModule) and "DataFrame" not in pd.__dict__:
        return "deferred"
    return "real"


def import_nfstream() -> PandasState:
    """Import nfstream (once) with the stand-in; say what its pandas is."""
    if "nfstream.streamer" not in sys.modules and "pandas" not in sys.modules:
        if importlib.util.find_spec("pandas") is None:
            stand_in: types.ModuleType = _MissingModule("pandas", PANDAS_MISSING)
        else:
            stand_in = _DeferredModule("pandas", "pandas, imported on first use (auris.agent.lean)")
        sys.modules["pandas"] = stand_in
        try:
            nfstream = importlib.import_module("nfstream")
        finally:
            if sys.modules.get("pandas") is stand_in:
                del sys.modules["pandas"]
        if isinstance(stand_in, _MissingModule):
            nfstream.NFStreamer.to_pandas = _to_pandas_needs_pandas
    importlib.import_module("nfstream")
    state = nfstream_pandas()
    assert state is not None
    return state


import_nfstream()
