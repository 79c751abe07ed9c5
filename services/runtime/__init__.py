"""The tenancy runtime every Towerco service runs on.

One package holds what all services share: process settings, request context, the interceptor
chain (its order: ``interceptors/chain.py``), tenant-bound database access, migrations,
the start-up isolation guard, error details and server start-up. A service folder holds
only its servicer, its queries, its migrations and its ``__main__``.
"""
