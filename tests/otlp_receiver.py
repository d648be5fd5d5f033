"""Minimal OTLP metric receivers for tests: gRPC and HTTP/protobuf, on 127.0.0.1.

Both keep every decoded ``ExportMetricsServiceRequest`` they are sent, in arrival order
(with when it arrived), and answer with an empty ``ExportMetricsServiceResponse``, as a
collector would.
"""

from __future__ import annotations

import gzip
import itertools
import threading
import time
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

ExportMetricsServiceRequest = metrics_service_pb2.ExportMetricsServiceRequest
ExportMetricsServiceResponse = metrics_service_pb2.ExportMetricsServiceResponse


class _Store:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[ExportMetricsServiceRequest] = []
        #: Per request: transport details a test may check (headers, compression).
        self._details: list[dict[str, Any]] = []

    def add(self, request: ExportMetricsServiceRequest, **details: Any) -> None:
        details.setdefault("received", time.monotonic())
        with self._lock:
            self._requests.append(request)
            self._details.append(details)

    @property
    def requests(self) -> list[ExportMetricsServiceRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def details(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._details)

    @property
    def arrivals(self) -> list[float]:
        """When each request arrived (time.monotonic())."""
        return [details["received"] for details in self.details]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._details.clear()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> Any:
        metadata = {key: value for key, value in context.invocation_metadata()}
        copy = ExportMetricsServiceRequest()
        copy.CopyFrom(request)
        self._store.add(copy, metadata=metadata)
        return ExportMetricsServiceResponse()


class GrpcReceiver(_Store):
    """An insecure gRPC ``MetricsService`` on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"

    def __enter__(self) -> GrpcReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None).wait(5)


_DECODERS = {
    "": lambda body: body,
    "identity": lambda body: body,
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
}


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        if self.path != "/v1/metrics":
            self._reply(404, b"not found")
            return
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip() != "application/x-protobuf":
            self._reply(415, b"want application/x-protobuf")
            return
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        decode = _DECODERS.get(encoding)
        if decode is None:
            self._reply(415, b"unknown content encoding")
            return
        request = ExportMetricsServiceRequest()
        try:
            request.ParseFromString(decode(body))
        except Exception:
            self._reply(400, b"not an ExportMetricsServiceRequest")
            return
        self.server.store.add(
            request, content_type=content_type, content_encoding=encoding, path=self.path
        )
        self._reply(
            200,
            ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    store: _Store


class HttpReceiver(_Store):
    """An OTLP/HTTP (protobuf) receiver: POST /v1/metrics on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        super().__init__()
        self._server = _HttpServer(("127.0.0.1", 0), _Handler)
        self._server.store = self
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/metrics"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# --- reading what arrived --------------------------------------------------------------


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes(message: Any) -> dict[str, Any]:
    """A resource's, scope's or data point's attributes as a dict."""
    return {kv.key: _value(kv.value) for kv in message.attributes}


def resources(request: ExportMetricsServiceRequest) -> list[dict[str, Any]]:
    """The attributes of each resource in the request."""
    return [attributes(rm.resource) for rm in request.resource_metrics]


def histogram_totals(
    request: ExportMetricsServiceRequest, metric: str, **point_attributes: Any
) -> tuple[int, float]:
    """(count, sum) of histogram ``metric`` (explicit-bucket or exponential) over every
    resource and scope of the request and every data point whose attributes include
    ``point_attributes``; (0, 0.0) when there is none."""
    count, total = 0, 0.0
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for found in scope_metrics.metrics:
                if found.name != metric:
                    continue
                data = getattr(found, found.WhichOneof("data"))
                for point in data.data_points:
                    have = attributes(point)
                    if all(have.get(k) == v for k, v in point_attributes.items()):
                        count += point.count
                        total += point.sum
    return count, total


def check_one_pusher(arrivals: list[float], interval: float) -> None:
    """Asserts that requests arriving at ``arrivals`` (time.monotonic(), in order) can be
    one periodic pusher's: an SDK PeriodicExportingMetricReader waits ``interval`` after
    each export before it collects again, so one pusher's requests arrive at least about
    ``interval`` apart; two pushers' interleave, some less than ``interval / 2`` apart."""
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    close = [round(gap, 3) for gap in gaps if gap < 0.8 * interval]
    assert not close, (
        f"requests {interval:g} s apart expected from one pusher, some came closer: {close} "
        f"(all gaps: {[round(gap, 3) for gap in gaps]})"
    )
