"""The API gateway: Envoy's configuration, rendered from one template (:mod:`gateway.config`)."""
