"""`fleet web`: the operators' service — a dashboard in the browser, Prometheus
metrics at `/metrics`, `/healthz` — one ASGI app (Starlette) over the same
client and state code the CLI uses (fleet.client, fleet.state)."""
