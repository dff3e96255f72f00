"""Kubernetes mode of the controller.

The controller reads the cluster (namespaces, pods, services, EndpointSlices and
the ``security.veil.io/v1`` policy resources) with list/watch and publishes the
result to the same :class:`~controller.registry.RegistryHolder` and Discovery
stream as the YAML source; nodes authenticate with projected ServiceAccount
tokens verified by TokenReview; the CA lives in a Secret; replicas elect a
leader on a Lease. One module per concern:

* :mod:`.client`: the only HTTP code (kubernetes_asyncio's ApiClient, raw JSON);
* :mod:`.watch` (sans-IO) and :mod:`.reflector`: list/watch, bookmarks, 410, reconnects;
* :mod:`.availability`: API version discovery and the cause of a kind that cannot be read;
* :mod:`.convert` (pure) and :mod:`.source`: caches to RegistryState;
* :mod:`.status`: the Accepted condition on policy objects;
* :mod:`.leader`: Lease election;
* :mod:`.secret_store` and :mod:`.bundle`: CA Secret, plugged-in CA, trust-bundle ConfigMap;
* :mod:`.tokenreview`: node authentication;
* :mod:`.runtime`: :func:`build_kubernetes_source`, all of it assembled.
"""

from .client import KubeClient
from .errors import KubernetesError
from .leader import LeaderElector, LeaseTiming
from .reflector import WatchSettings
from .runtime import KubernetesOptions, KubernetesRuntime, build_kubernetes_source
from .secret_store import SecretCaStore
from .source import KubernetesSource
from .tokenreview import TokenReviewAuthenticator

__all__ = [
    "KubeClient",
    "KubernetesError",
    "KubernetesOptions",
    "KubernetesRuntime",
    "KubernetesSource",
    "LeaderElector",
    "LeaseTiming",
    "SecretCaStore",
    "TokenReviewAuthenticator",
    "WatchSettings",
    "build_kubernetes_source",
]
