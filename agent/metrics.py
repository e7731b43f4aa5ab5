"""The agent's metrics: one Prometheus registry per agent, the core series, and the way
plugins add theirs (contract §18, ``GET /metrics`` in ``lightd.api.metrics``).

Per agent, never prometheus_client's global registry: tests run many agents in one
process, and two agents must not count into each other.

The hot paths record into plain Python numbers, not into prometheus_client's metric
objects (whose every ``observe`` takes locks and walks the buckets): a request is one
dict lookup, one ``bisect`` and three additions, and the numbers become text only when
scraped (the latency histograms write their text themselves: building prometheus_client's
sample objects for every bucket of every route was most of a scrape's time). Everything
here is recorded from the event loop's thread (trio), so it needs no lock; the scrape runs
on that thread too.

What is measured, and where it is recorded:

* HTTP requests by route template, method and status, with their latency
  (``lightd_http_requests_total``, ``lightd_http_request_duration_seconds``): the ASGI
  middleware of ``lightd.api.metrics``;
* WebSockets open, and accepted or refused, by route: the same middleware;
* console lines, lines the throttle held back and frames dropped for slow subscribers:
  ``ConsoleCounts``, shared by every container's hub (``lightd.containers.hub``);
* Docker control calls' latency by call: ``DockerEngine.observer`` (``open_agent`` sets
  it; ``lightd.docker`` knows nothing of metrics);
* containers by install and runtime state, read from the supervisors at scrape time,
  and jobs by kind and state, read from the job runner (``lightd.api.metrics`` registers
  both);
* the process (CPU, memory, file descriptors), and the build's version.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _float_to_go

from ._version import __version__

#: A number as the text format writes it (``+Inf``, ``1e+06``…); the library's is untyped.
floatToGoString = cast("Callable[[float], str]", _float_to_go)

__all__ = ["ConsoleCounts", "Metrics", "Timings"]

#: Latency buckets (seconds) of HTTP requests and Docker calls: sub-millisecond fast
#: reads up to a slow create.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: The labels' values of what a series does not know (an unrouted request).
UNKNOWN = "unmatched"

#: A scrape-time reading: one value, values by label values, or ``None`` (no sample now).
Reading = float | Mapping[tuple[str, ...], float] | None


class _Series:
    __slots__ = ("buckets", "labels", "total")

    def __init__(self, size: int, labels: str) -> None:
        self.buckets = [0] * size  # per bucket, not cumulative (the last one is +Inf)
        self.total = 0.0
        #: The label pairs as the text format writes them (``route="/x",method="GET"``).
        self.labels = labels


class Timings:
    """Latency histograms by label values, cheap to record: ``observe(labels, seconds)``.

    Exposed as the histogram ``name`` and, when ``counter`` (name, help) is given, also as
    a counter of the observations (the histogram's ``_count``, under a name of its own).
    Label values must come from a small set: each new tuple is a series for good.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        counter: tuple[str, str] | None = None,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.counter = counter
        self._bounds = tuple(buckets)
        self._bucket_names = [*(floatToGoString(b) for b in self._bounds), "+Inf"]
        self._series: dict[tuple[str, ...], _Series] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        series = self._series.get(labels)
        if series is None:
            text = ",".join(
                f'{k}="{_label_value(v)}"' for k, v in zip(self.labelnames, labels, strict=True)
            )
            series = self._series[labels] = _Series(len(self._bounds) + 1, text)
        series.buckets[bisect.bisect_left(self._bounds, seconds)] += 1
        series.total += seconds

    def count(self, labels: tuple[str, ...]) -> int:
        """Observations under ``labels`` so far (tests, benches)."""
        series = self._series.get(labels)
        return sum(series.buckets) if series is not None else 0

    def text(self, out: list[str]) -> None:
        """Append the series in Prometheus text format to ``out``: written here, line by
        line, because building prometheus_client's sample objects for each bucket of each
        route cost most of a scrape."""
        name, series_list = self.name, list(self._series.values())
        lines: list[str] = []
        counts: list[str] = []
        for series in series_list:
            labels, running = series.labels, 0
            sep = "," if labels else ""
            for bound, n in zip(self._bucket_names, series.buckets, strict=True):
                running += n
                lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}\n')
            braced = f"{{{labels}}}" if labels else ""
            lines.append(f"{name}_count{braced} {running}\n")
            lines.append(f"{name}_sum{braced} {floatToGoString(series.total)}\n")
            counts.append(f"{braced} {running}\n")
        if self.counter is not None:
            total, documentation = self.counter
            out.append(f"# HELP {total}_total {_help(documentation)}\n")
            out.append(f"# TYPE {total}_total counter\n")
            out.extend(f"{total}_total{line}" for line in counts)
        out.append(f"# HELP {name} {_help(self.documentation)}\n# TYPE {name} histogram\n")
        out.extend(lines)

    def collect(self) -> Iterator[Metric]:
        """The series as prometheus_client families (for a registry of one's own)."""
        histogram = HistogramMetricFamily(
            self.name, self.documentation, labels=list(self.labelnames)
        )
        counter = None
        if self.counter is not None:
            counter = CounterMetricFamily(*self.counter, labels=list(self.labelnames))
        for labels, series in list(self._series.items()):
            cumulative, running = [], 0
            for name, n in zip(self._bucket_names, series.buckets, strict=True):
                running += n
                cumulative.append((name, float(running)))
            histogram.add_metric(list(labels), cumulative, series.total)
            if counter is not None:
                counter.add_metric(list(labels), float(running))
        if counter is not None:
            yield counter
        yield histogram


class ConsoleCounts:
    """Console totals of every container of the agent, kept by their hubs (plain ints:
    one addition per batch of lines) and read at scrape time."""

    __slots__ = ("dropped_frames", "lines", "throttled")

    def __init__(self) -> None:
        #: Lines containers (and their install scripts) wrote.
        self.lines = 0
        #: Lines the console throttle kept from clients (they are in the history).
        self.throttled = 0
        #: Console and stats frames dropped because a subscriber could not keep up.
        self.dropped_frames = 0


class _Callback:
    """A metric whose values are read when scraped (``Metrics.gauge_from`` and co)."""

    def __init__(
        self,
        family: type[GaugeMetricFamily] | type[CounterMetricFamily],
        name: str,
        documentation: str,
        read: Callable[[], Reading],
        labelnames: Sequence[str],
    ) -> None:
        self._family = family
        self._name = name
        self._documentation = documentation
        self._read = read
        self._labelnames = list(labelnames)

    def describe(self) -> Iterator[Metric]:
        """The name, for the registry's duplicate check (without calling ``read`` early)."""
        yield self._family(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family(self._name, self._documentation, labels=self._labelnames)
        value = self._read()
        if value is None:
            pass
        elif isinstance(value, Mapping):
            for labels, number in value.items():
                family.add_metric(list(labels), float(number))
        else:
            family.add_metric([], float(value))
        yield family


class _Names:
    """Holds the latency histograms' names in the registry (its duplicate check), with no
    samples: ``Metrics.exposition`` writes them (``Timings.text``)."""

    def __init__(self, *timings: Timings) -> None:
        self._timings = timings

    def describe(self) -> Iterator[Metric]:
        for timings in self._timings:
            yield HistogramMetricFamily(timings.name, timings.documentation)
            if timings.counter is not None:
                yield CounterMetricFamily(*timings.counter)

    def collect(self) -> Iterator[Metric]:
        return iter(())


class _Core:
    """The core's own series that are kept as plain numbers (see the module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        sockets = GaugeMetricFamily(
            "lightd_websockets_open", "WebSockets open now, by route.", labels=["route"]
        )
        for route, n in sorted(m.websockets_open.items()):
            sockets.add_metric([route], n)
        yield sockets
        connections = CounterMetricFamily(
            "lightd_websocket_connections",
            "WebSocket connections by route and outcome (101: accepted, else the status"
            " it was refused with).",
            labels=["route", "status"],
        )
        for (route, status), n in sorted(m.websocket_connections.items()):
            connections.add_metric([route, status], n)
        yield connections
        console = m.console
        yield CounterMetricFamily(
            "lightd_console_lines", "Console lines written by containers.", console.lines
        )
        yield CounterMetricFamily(
            "lightd_console_throttled_lines",
            "Console lines the throttle kept from clients (still in the history).",
            console.throttled,
        )
        yield CounterMetricFamily(
            "lightd_console_dropped_frames",
            "Console and stats frames dropped because a WebSocket client could not keep up.",
            console.dropped_frames,
        )
        info = GaugeMetricFamily("lightd_build_info", "The agent's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


class Metrics:
    """One agent's metrics (``agent.metrics``; the type is ``lightd.Metrics``).

    Plugins add theirs with ``counter``/``gauge``/``histogram`` (prometheus_client's
    objects, registered here), ``gauge_from``/``counter_from`` (values read from the
    plugin's own state when scraped: nothing to keep in step), or ``register`` (any
    prometheus_client collector). Name them ``lightd_<plugin>_…``; label values must
    come from a small set (never an id, a path or a user's text).
    """

    def __init__(self, *, process: bool = True) -> None:
        #: The registry ``GET /metrics`` exposes, after the two latency histograms
        #: (``http``, ``docker``: written by ``exposition`` itself, their names held here).
        self.registry = CollectorRegistry(auto_describe=True)
        self.http = Timings(
            "lightd_http_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ("route", "method", "status"),
            counter=("lightd_http_requests", "HTTP requests by route template, method and status."),
        )
        self.docker = Timings(
            "lightd_docker_call_duration_seconds",
            "Docker engine control call latency by call.",
            ("call",),
        )
        #: Open WebSockets by route template.
        self.websockets_open: dict[str, int] = {}
        #: WebSocket connections by (route template, status).
        self.websocket_connections: dict[tuple[str, str], int] = {}
        #: Shared by every container's hub.
        self.console = ConsoleCounts()
        self.registry.register(_Names(self.http, self.docker))
        self.registry.register(_Core(self))
        if process:
            ProcessCollector(registry=self.registry)

    # -- what the core records ------------------------------------------------------------

    def docker_call(self, call: str, seconds: float) -> None:
        """``DockerEngine.observer``: one control call answered in ``seconds``."""
        self.docker.observe((call,), seconds)

    # -- what plugins add ----------------------------------------------------------------

    def register(self, collector: Collector) -> None:
        """Add a prometheus_client collector (its ``collect`` runs at every scrape)."""
        self.registry.register(collector)

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        """A prometheus_client ``Counter`` on this agent's registry."""
        return Counter(name, documentation, labelnames, registry=self.registry)

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        """A prometheus_client ``Gauge`` on this agent's registry."""
        return Gauge(name, documentation, labelnames, registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        """A prometheus_client ``Histogram`` on this agent's registry."""
        return Histogram(name, documentation, labelnames, registry=self.registry, buckets=buckets)

    def gauge_from(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Reading],
        labelnames: Sequence[str] = (),
    ) -> None:
        """A gauge whose value ``read()`` gives at scrape time: a number, a mapping of label
        values (a tuple per ``labelnames``) to numbers, or ``None`` (no sample now)."""
        self.registry.register(_Callback(GaugeMetricFamily, name, documentation, read, labelnames))

    def counter_from(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Reading],
        labelnames: Sequence[str] = (),
    ) -> None:
        """``gauge_from`` for a counter (``read`` must never go down; ``_total`` is added)."""
        self.registry.register(
            _Callback(CounterMetricFamily, name, documentation, read, labelnames)
        )

    def exposition(self) -> bytes:
        """Everything in Prometheus text format (what ``GET /metrics`` answers): the
        latency histograms, then the registry."""
        out: list[str] = []
        self.http.text(out)
        self.docker.text(out)
        render(self.registry, out)
        return "".join(out).encode()


#: Family types as the Prometheus text format (0.0.4) names them.
_TEXT_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram"}
#: OpenMetrics-only samples, which the text format shows as gauges of their own.
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


def _label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(registry: CollectorRegistry, out: list[str]) -> None:
    """Append ``generate_latest``'s text of ``registry`` to ``out``, without its checking
    every label name of every sample again (names were checked when their metrics were
    made): half the time."""
    for metric in registry.collect():
        name, kind = metric.name, metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name += "_info"
        kind = _TEXT_TYPES.get(kind, "untyped" if kind == "unknown" else kind)
        help_text = _help(metric.documentation)
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        extra: dict[str, list[str]] = {}
        for sample in metric.samples:
            line = _sample_line(sample)
            for suffix in _OM_SUFFIXES:
                if sample.name == metric.name + suffix:
                    extra.setdefault(suffix, []).append(line)
                    break
            else:
                out.append(line)
        for suffix, lines in sorted(extra.items()):
            out.append(f"# HELP {metric.name}{suffix} {help_text}\n")
            out.append(f"# TYPE {metric.name}{suffix} gauge\n")
            out.extend(lines)


def _sample_line(sample: Sample) -> str:
    labels = sample.labels
    value = floatToGoString(sample.value)
    timestamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
    if not labels:
        return f"{sample.name} {value}{timestamp}\n"
    text = ",".join([f'{k}="{_label_value(v)}"' for k, v in labels.items()])
    return f"{sample.name}{{{text}}} {value}{timestamp}\n"
