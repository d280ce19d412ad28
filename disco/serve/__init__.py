"""`disco serve`: a deployment as a long-running HTTP service. The front end (app.py: FastAPI routes;
batching.py: the bounded queue and batches; answers.py: requests in, task answers out; metrics.py: Prometheus)
supervises the ranks (ranks.py: torchrun, restarts, readiness) and talks to rank 0 over link.py."""
