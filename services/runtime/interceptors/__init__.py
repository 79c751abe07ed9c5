"""The server interceptor chain, one small class per concern.

The order is written down once, in :func:`chain.server_chain`.
"""
