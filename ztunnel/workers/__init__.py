"""A multi-core ztunnel: one supervisor process, N worker processes.

- :mod:`.supervision`: pure decisions (how many workers, restart delays);
- :mod:`.codec`: the versioned, length-prefixed frames on the socketpair;
- :mod:`.link`: framed I/O on one end of that socketpair;
- :mod:`.slots`: the supervisor's per-worker records and forwarding state store;
- :mod:`.certs`: a worker's certificates, as the supervisor pushed them;
- :mod:`.process`: the worker process (``python -m ztunnel.workers.process``);
- :mod:`.supervisor`: the supervisor (controller, certificates, admin API).

With one worker none of this runs: :mod:`ztunnel.app` is the whole ztunnel.
"""

from .supervision import RestartPolicy, WorkerCount, default_workers, resolve_workers

__all__ = ["RestartPolicy", "WorkerCount", "default_workers", "resolve_workers"]
