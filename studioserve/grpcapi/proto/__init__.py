"""The KServe v2 / Triton gRPC protocol: the published .proto files and the code generated from
them (``grpc_service_pb2``, ``model_config_pb2``, ``grpc_service_pb2_grpc``; see README.md).

The generated modules are shipped, not built at install time, as the ecosystem does
(tritonclient ships its generated code too): users need no protoc, and the modules' protobuf
and grpcio floors are fixed by the generator version in ``generate.sh``. Nothing here is
imported by ``import studioserve``; importing these modules needs the ``grpc`` extra.
"""
