"""The wire contract: edgeweave.proto and its generated modules (committed; see generate.py)."""

from edgeweave.proto import edgeweave_pb2 as pb
from edgeweave.proto import edgeweave_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
