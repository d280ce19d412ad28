"""Distributed inference: each rank runs its shard of a deployment and exchanges only the planned channels."""
