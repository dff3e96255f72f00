"""The waypoint: Veil's L7 proxy for the destinations that opt in.

A source ztunnel sends traffic for a Namespace or Service labelled
``veil.io/use-waypoint=<name>`` over HBONE to the waypoint of that name. The
waypoint terminates HBONE (the ztunnel's
:class:`~ztunnel.hbone.HboneServer`, accepting any destination authority), parses HTTP/1.1 or HTTP/2
(:mod:`.http1`, :mod:`.http2`), authenticates JWTs (:mod:`.authn`,
:mod:`.jwks`), authorizes each request with L7 AuthorizationPolicy
(:mod:`node.policy.l7`, decided purely in :mod:`.decide`), balances every
request over the destination's ready endpoints and forwards it over HBONE under
its own identity (:mod:`.upstream`). :mod:`.app` wires the process; it is a
node process: it imports veil, controller.api, node and the ztunnel's HBONE,
TLS and identity libraries, never the ztunnel's proxy.
"""
