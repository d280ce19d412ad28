"""`disco serve`: a deployment as a long-running HTTP service. The front end (app.py: the FastAPI app from its
parts, routes/: the endpoints, uploads.py: the image a request sends, middleware.py: the token and request
metrics, http_errors.py: the error shape; service.py: what a served deployment holds; batching.py: the bounded
queue and batches; answers.py: requests in, task answers out; metrics.py: Prometheus) supervises the ranks
(ranks.py: torchrun, restarts, readiness) and talks to rank 0 over runtime/link.py."""
