"""fednode: the site side of fedstream, a gRPC client that dials out to the researcher's server.

Public entry points: :class:`fednode.config.NodeConfig`, :class:`fednode.client.NodeClient`,
:func:`fednode.client.run_node` and the handler protocol in :mod:`fednode.handler`.
"""
