"""HTTP intake: the Alertmanager webhook, the OTLP/HTTP metrics receiver and the
golden-signal store that workers read through `GET /v1/signals`."""
