"""The gRPC answers of the metadata, configuration, statistics and repository calls.

Each is the document the ``/v2`` HTTP routes answer (:mod:`studioserve.http.oip_documents`,
Triton's statistics from :mod:`studioserve.telemetry`, the repository's index), read into the
message of the published .proto with protobuf's JSON mapping (the documents use the .proto's
field names), so both transports always say the same thing.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from ..http import oip_documents
from ..serving.repository import ServedModel, ServedVersion
from .proto import grpc_service_pb2 as pb
from .proto import model_config_pb2 as mc

__all__ = [
    "model_config",
    "model_metadata",
    "model_statistics",
    "repository_index",
    "server_metadata",
]


def _read(doc: Any, message: Any) -> Any:
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


def server_metadata() -> pb.ServerMetadataResponse:
    doc = oip_documents.server_metadata()
    return pb.ServerMetadataResponse(
        name=doc["name"], version=doc["version"], extensions=doc["extensions"]
    )


def model_metadata(entry: ServedModel, served: ServedVersion) -> pb.ModelMetadataResponse:
    message: pb.ModelMetadataResponse = _read(
        oip_documents.model_metadata(entry, served), pb.ModelMetadataResponse()
    )
    return message


def model_config(entry: ServedModel, served: ServedVersion) -> pb.ModelConfigResponse:
    config: mc.ModelConfig = _read(oip_documents.model_config(entry, served), mc.ModelConfig())
    return pb.ModelConfigResponse(config=config)


def model_statistics(stats: list[dict[str, Any]]) -> pb.ModelStatisticsResponse:
    """Triton's statistics documents (one per version, as ``GET /v2/models/stats`` lists)."""
    message: pb.ModelStatisticsResponse = _read(
        {"model_stats": stats}, pb.ModelStatisticsResponse()
    )
    return message


def repository_index(index: list[dict[str, Any]]) -> pb.RepositoryIndexResponse:
    """The repository extension's index (name, version, state, reason of each model)."""
    models = [
        {k: str(v) for k, v in m.items() if k in ("name", "version", "state", "reason")}
        for m in index
    ]
    message: pb.RepositoryIndexResponse = _read({"models": models}, pb.RepositoryIndexResponse())
    return message
