"""Import pyverbs (from the system's rdma-core) with an error that says what to install."""

from __future__ import annotations

from typing import Any


class PyverbsMissing(ImportError):
    pass


def _load() -> Any:
    try:
        import pyverbs  # noqa: F401
        import pyverbs.cm_enums as cm_enums
        import pyverbs.enums as enums
        from pyverbs import cmid, cq, device, mr, pd, qp, wr
        from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise PyverbsMissing(
            f"cannot import pyverbs ({exc}). rdmaproxy uses the pyverbs of the system's "
            "rdma-core: install it (Debian/Ubuntu: apt-get install python3-pyverbs "
            "rdma-core ibverbs-providers) and run rdmaproxy from /usr/bin/python3 or from a "
            "venv created with `/usr/bin/python3 -m venv --system-site-packages`. The PyPI "
            "package 'pyverbs' needs a newer libibverbs and does not work here."
        ) from exc

    class Namespace:
        pass

    ns: Any = Namespace()
    ns.cm_enums, ns.enums, ns.cmid, ns.cq, ns.device = cm_enums, enums, cmid, cq, device
    ns.mr, ns.pd, ns.qp, ns.wr = mr, pd, qp, wr
    ns.PyverbsError, ns.PyverbsRDMAError = PyverbsError, PyverbsRDMAError
    return ns


_cached: Any = None


def pv() -> Any:
    """The pyverbs modules, imported on first use."""
    global _cached
    if _cached is None:
        _cached = _load()
    return _cached
