"""Fixtures for fault tests: the integration harness (tests/integration/cluster.py) and
its fixtures, reused as they are.

tests/integration has no ``__init__.py``; its directory goes on ``sys.path`` so that
``from cluster import Cluster`` works here too, and its conftest is loaded under another
module name (``integration_conftest``) so its fixtures and its report hook can be
re-exported without clashing with this conftest.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_INTEGRATION = Path(__file__).resolve().parent.parent / "integration"
if str(_INTEGRATION) not in sys.path:
    sys.path.insert(0, str(_INTEGRATION))


def _load_integration_conftest():  # type: ignore[no-untyped-def]
    name = "integration_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _INTEGRATION / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_integration = _load_integration_conftest()

from cluster import Cluster  # noqa: E402  (needs the sys.path entry above)
from faults import Mesh  # noqa: E402

# re-exported: pytest collects fixtures and hooks by name from this module
cluster = _integration.cluster
make_cluster = _integration.make_cluster
no_daemon_left_behind = _integration.no_daemon_left_behind
pytest_runtest_makereport = _integration.pytest_runtest_makereport
omirror_children = _integration.omirror_children


@pytest.fixture
def proxies() -> Iterator[Callable[[Cluster], Mesh]]:
    """``proxies(cluster)`` routes every link of a (not yet started) cluster through a
    proxy the test can cut (tests/fault/faults.py); every proxy stops at teardown."""
    meshes: list[Mesh] = []

    def make(c: Cluster) -> Mesh:
        mesh = Mesh(c)
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.close()
