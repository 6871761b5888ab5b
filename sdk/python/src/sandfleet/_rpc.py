"""Typed callables for the sandfleet.v1 methods the SDK uses, on a sync or an asyncio channel.

They are built from the generated message classes (``sandfleet._proto``), once
per channel, so a call costs no lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from ._proto import sandfleet_pb2 as pb

_SESSION = "/sandfleet.v1.SessionService/"
_EXEC = "/sandfleet.v1.ExecService/"
_FILE = "/sandfleet.v1.FileService/"


def _codec(req: Any, resp: Any) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    return req.SerializeToString, resp.FromString


class Control:
    """SessionService on one coordinator (sync channel)."""

    def __init__(self, channel: grpc.Channel) -> None:
        """The callables of ``channel``."""
        self.channel = channel
        self.create: grpc.UnaryUnaryMultiCallable[pb.CreateSessionRequest, pb.CreateSessionResponse] = (
            channel.unary_unary(_SESSION + "CreateSession", *_codec(pb.CreateSessionRequest, pb.CreateSessionResponse))
        )
        self.get: grpc.UnaryUnaryMultiCallable[pb.GetSessionRequest, pb.GetSessionResponse] = channel.unary_unary(
            _SESSION + "GetSession", *_codec(pb.GetSessionRequest, pb.GetSessionResponse)
        )
        self.list: grpc.UnaryUnaryMultiCallable[pb.ListSessionsRequest, pb.ListSessionsResponse] = channel.unary_unary(
            _SESSION + "ListSessions", *_codec(pb.ListSessionsRequest, pb.ListSessionsResponse)
        )
        self.delete: grpc.UnaryUnaryMultiCallable[pb.DeleteSessionRequest, pb.DeleteSessionResponse] = (
            channel.unary_unary(_SESSION + "DeleteSession", *_codec(pb.DeleteSessionRequest, pb.DeleteSessionResponse))
        )
        self.renew: grpc.UnaryUnaryMultiCallable[pb.RenewSessionRequest, pb.RenewSessionResponse] = channel.unary_unary(
            _SESSION + "RenewSession", *_codec(pb.RenewSessionRequest, pb.RenewSessionResponse)
        )
        self.watch: grpc.UnaryStreamMultiCallable[pb.WatchSessionRequest, pb.SessionEvent] = channel.unary_stream(
            _SESSION + "WatchSession", *_codec(pb.WatchSessionRequest, pb.SessionEvent)
        )


class Data:
    """ExecService and FileService on one node agent (sync channel)."""

    def __init__(self, channel: grpc.Channel) -> None:
        """The callables of ``channel``."""
        self.channel = channel
        self.exec: grpc.UnaryStreamMultiCallable[pb.ExecRequest, pb.ExecResponse] = channel.unary_stream(
            _EXEC + "Exec", *_codec(pb.ExecRequest, pb.ExecResponse)
        )
        self.write: grpc.StreamUnaryMultiCallable[pb.WriteFileRequest, pb.WriteFileResponse] = channel.stream_unary(
            _FILE + "WriteFile", *_codec(pb.WriteFileRequest, pb.WriteFileResponse)
        )
        self.read: grpc.UnaryStreamMultiCallable[pb.ReadFileRequest, pb.ReadFileResponse] = channel.unary_stream(
            _FILE + "ReadFile", *_codec(pb.ReadFileRequest, pb.ReadFileResponse)
        )
        self.list: grpc.UnaryUnaryMultiCallable[pb.ListFilesRequest, pb.ListFilesResponse] = channel.unary_unary(
            _FILE + "ListFiles", *_codec(pb.ListFilesRequest, pb.ListFilesResponse)
        )
        self.remove: grpc.UnaryUnaryMultiCallable[pb.RemoveFileRequest, pb.RemoveFileResponse] = channel.unary_unary(
            _FILE + "RemoveFile", *_codec(pb.RemoveFileRequest, pb.RemoveFileResponse)
        )
        self.sync: grpc.UnaryUnaryMultiCallable[pb.SyncWorkspaceRequest, pb.SyncWorkspaceResponse] = (
            channel.unary_unary(_FILE + "SyncWorkspace", *_codec(pb.SyncWorkspaceRequest, pb.SyncWorkspaceResponse))
        )
        self.download_url: grpc.UnaryUnaryMultiCallable[pb.GetDownloadUrlRequest, pb.GetDownloadUrlResponse] = (
            channel.unary_unary(_FILE + "GetDownloadUrl", *_codec(pb.GetDownloadUrlRequest, pb.GetDownloadUrlResponse))
        )
        self.disk_usage: grpc.UnaryUnaryMultiCallable[pb.GetDiskUsageRequest, pb.GetDiskUsageResponse] = (
            channel.unary_unary(_FILE + "GetDiskUsage", *_codec(pb.GetDiskUsageRequest, pb.GetDiskUsageResponse))
        )


class AsyncControl:
    """SessionService on one coordinator (asyncio channel)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        """The callables of ``channel``."""
        self.channel = channel
        self.create: grpc.aio.UnaryUnaryMultiCallable[pb.CreateSessionRequest, pb.CreateSessionResponse] = (
            channel.unary_unary(_SESSION + "CreateSession", *_codec(pb.CreateSessionRequest, pb.CreateSessionResponse))
        )
        self.get: grpc.aio.UnaryUnaryMultiCallable[pb.GetSessionRequest, pb.GetSessionResponse] = channel.unary_unary(
            _SESSION + "GetSession", *_codec(pb.GetSessionRequest, pb.GetSessionResponse)
        )
        self.list: grpc.aio.UnaryUnaryMultiCallable[pb.ListSessionsRequest, pb.ListSessionsResponse] = (
            channel.unary_unary(_SESSION + "ListSessions", *_codec(pb.ListSessionsRequest, pb.ListSessionsResponse))
        )
        self.delete: grpc.aio.UnaryUnaryMultiCallable[pb.DeleteSessionRequest, pb.DeleteSessionResponse] = (
            channel.unary_unary(_SESSION + "DeleteSession", *_codec(pb.DeleteSessionRequest, pb.DeleteSessionResponse))
        )
        self.renew: grpc.aio.UnaryUnaryMultiCallable[pb.RenewSessionRequest, pb.RenewSessionResponse] = (
            channel.unary_unary(_SESSION + "RenewSession", *_codec(pb.RenewSessionRequest, pb.RenewSessionResponse))
        )
        self.watch: grpc.aio.UnaryStreamMultiCallable[pb.WatchSessionRequest, pb.SessionEvent] = channel.unary_stream(
            _SESSION + "WatchSession", *_codec(pb.WatchSessionRequest, pb.SessionEvent)
        )


class AsyncData:
    """ExecService and FileService on one node agent (asyncio channel)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        """The callables of ``channel``."""
        self.channel = channel
        self.exec: grpc.aio.UnaryStreamMultiCallable[pb.ExecRequest, pb.ExecResponse] = channel.unary_stream(
            _EXEC + "Exec", *_codec(pb.ExecRequest, pb.ExecResponse)
        )
        self.write: grpc.aio.StreamUnaryMultiCallable[pb.WriteFileRequest, pb.WriteFileResponse] = channel.stream_unary(
            _FILE + "WriteFile", *_codec(pb.WriteFileRequest, pb.WriteFileResponse)
        )
        self.read: grpc.aio.UnaryStreamMultiCallable[pb.ReadFileRequest, pb.ReadFileResponse] = channel.unary_stream(
            _FILE + "ReadFile", *_codec(pb.ReadFileRequest, pb.ReadFileResponse)
        )
        self.list: grpc.aio.UnaryUnaryMultiCallable[pb.ListFilesRequest, pb.ListFilesResponse] = channel.unary_unary(
            _FILE + "ListFiles", *_codec(pb.ListFilesRequest, pb.ListFilesResponse)
        )
        self.remove: grpc.aio.UnaryUnaryMultiCallable[pb.RemoveFileRequest, pb.RemoveFileResponse] = (
            channel.unary_unary(_FILE + "RemoveFile", *_codec(pb.RemoveFileRequest, pb.RemoveFileResponse))
        )
        self.sync: grpc.aio.UnaryUnaryMultiCallable[pb.SyncWorkspaceRequest, pb.SyncWorkspaceResponse] = (
            channel.unary_unary(_FILE + "SyncWorkspace", *_codec(pb.SyncWorkspaceRequest, pb.SyncWorkspaceResponse))
        )
        self.download_url: grpc.aio.UnaryUnaryMultiCallable[pb.GetDownloadUrlRequest, pb.GetDownloadUrlResponse] = (
            channel.unary_unary(_FILE + "GetDownloadUrl", *_codec(pb.GetDownloadUrlRequest, pb.GetDownloadUrlResponse))
        )
        self.disk_usage: grpc.aio.UnaryUnaryMultiCallable[pb.GetDiskUsageRequest, pb.GetDiskUsageResponse] = (
            channel.unary_unary(_FILE + "GetDiskUsage", *_codec(pb.GetDiskUsageRequest, pb.GetDiskUsageResponse))
        )
