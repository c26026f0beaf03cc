#!/bin/sh
# Regenerates the Python modules of this folder from the two .proto files beside it.
#
#   python3.11 -m venv /tmp/genv && /tmp/genv/bin/pip install grpcio-tools==1.81.1
#   sh studioserve/grpcapi/proto/generate.sh /tmp/genv/bin/python
#
# grpcio-tools 1.81.1 bundles protoc 33.5, whose code needs protobuf >= 6.33.5 and grpcio >=
# 1.81.1 at run time (the floors of the grpc extra in pyproject.toml; the same as
# tritonclient[grpc]'s, so both install together). Update the floors with the tools.
#
# After protoc, three edits make the modules a package of studioserve:
# - imports between them become relative (protoc writes "import model_config_pb2");
# - their descriptors go to a pool of their own (_pool.POOL) instead of protobuf's default
#   pool, so a process that also imports tritonclient's copies of the same files (package
#   "inference" too) never sees two definitions of one message;
# - the empty model_config_pb2_grpc.py (model_config.proto has no service) is not kept.
set -eu
PYTHON=${1:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    grpc_service.proto model_config.proto
rm -f model_config_pb2_grpc.py
for f in grpc_service_pb2.py model_config_pb2.py; do
    sed -i \
        -e 's/^import model_config_pb2 as /from . import model_config_pb2 as /' \
        -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$/from ._pool import POOL as _POOL/' \
        -e 's/_descriptor_pool\.Default()/_POOL/' \
        "$f"
done
sed -i -e 's/^import model_config_pb2 as /from . import model_config_pb2 as /' grpc_service_pb2.pyi
sed -i -e 's/^import grpc_service_pb2 as /from . import grpc_service_pb2 as /' grpc_service_pb2_grpc.py
