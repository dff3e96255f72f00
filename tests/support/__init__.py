"""Helpers shared by the test tiers and the benchmarks; imported as ``tests.support``.

Nothing here stands in for a Veil part: the helpers start the real processes
(``veil controller run``), write real registry documents and build the lab
meshes the tests drive. Each module owns one concern:

- :mod:`tests.support.controller`: ``veil controller run`` as a subprocess.
- :mod:`tests.support.registry_docs`: small registry documents for meshes.
- :mod:`tests.support.loopback_mesh`: ztunnels and apps on loopback.
- :mod:`tests.support.ztunnel_lab`: the ztunnel netns mesh and its pods.
- :mod:`tests.support.ci`: what a skip means when ``CI`` is set.
- :mod:`tests.support.polling`: waiting, within a bound, for a condition to hold.
"""

# Deliberately empty: the suite-wide conftest imports ``tests.support.ci`` and
# should not pay for importing the controller helpers with it.
__all__: list[str] = []
