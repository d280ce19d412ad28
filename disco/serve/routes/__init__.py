"""The routes of `disco serve`, one router per job: page_and_probes.py (GET /, the page; /health, the process is
up and its ranks can still come back; /ready, every rank joined and verified), v1.py (GET /v1/model; POST
/v1/predict, an image as the body or as a multipart file field) and prometheus.py (GET /metrics). Handlers reach
the Service through `ServiceDep` (service.py); which paths need the token is middleware.py's PROTECTED."""
