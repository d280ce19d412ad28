"""Planning for a real network: predicted latency on a topology (latency.py) and communication groups priced by
what they cost on it (prices.py)."""
