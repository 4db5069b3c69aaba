"""The DICOMweb service beside Orthanc 1.10 and its DICOMweb plugin: one run, same data, same client.

    .venv/bin/python bench/dicomweb.py [--instances 400] [--qido-instances 100000] [--repeat 3]
                                       [--retrievals 3]
                                       [--clients 4] [--batch 10] [--fill-batch 100] [--queries 200]

Both servers run at once on loopback, each as its own process with its default embedded storage:
``dicom-cloud serve`` (objects in a local directory, SQLite index) and ``/usr/sbin/Orthanc`` (its
file storage, SQLite index) with ``libOrthancDicomWeb.so`` under ``/dicom-web/``. Every measurement
is made by the same httpx code against each in turn (the order alternates), with the same number of
concurrent requests:

- STOW-RS of the synthetic CT study of ``bench/generate.py`` in requests of ``--batch`` instances
  (instances/s, MB/s); the study is deleted between repetitions;
- WADO-RS of the whole study (one multipart/related answer, its parts cut out as it streams in)
  and of every instance on its own, ``--retrievals`` rounds after each STOW-RS, the servers taking
  turns within each round;
- QIDO-RS latency (median, p95) of study, series and instance searches after ``--qido-instances``
  small instances were indexed in both (the fill is timed too).

Verified while measuring: our answers byte-compare with the stored files; Orthanc's carry the same
SOP Instance UIDs and pixel data (Orthanc may rewrite the file meta); every QIDO search returns as
many results from both. The report (ratios, machine, versions) goes to ``bench/results/dicomweb.md``
and ``.json``. See bench/README.md for what is fair and what is not.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pydicom

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

import generate  # noqa: E402
from live_service import ServiceProcess, start_service_process  # noqa: E402
from orthanc_server import PLUGINS_DIR, OrthancServer, start_orthanc  # noqa: E402
from run import anonymize, file_system, machine  # noqa: E402
from service import STOW_HEADERS, multipart, percentile, small_instances  # noqa: E402

OURS, ORTHANC = "dicom-cloud", "orthanc"
DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
#: Identity on both: compression on loopback would only measure zlib (Orthanc can compress answers).
CLIENT_HEADERS = {"Accept-Encoding": "identity"}
FAILED_SOP_SEQUENCE = "00081198"
SMALL_PER_STUDY = 50  # small_instances(): 10 per series, 5 series per study, a patient per study


class BenchError(RuntimeError):
    """A server answered wrongly: the run does not count."""


# ---------------------------------------------------------------------------------------------------------
# The two servers, seen alike


@dataclass
class Server:
    name: str
    root: str  # the DICOMweb root, without the trailing slash
    pid: int
    http: httpx.Client
    delete_study: Callable[[str], None]
    stop: Callable[[], None]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server so far: its process and the live processes below it
        (the workers of ``dicom-cloud serve --workers N``), and their children that ended."""
        return tree_cpu_seconds(self.pid)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and the live processes below it, and of their
    children that ended."""
    ticks = 0
    for member in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile: its time is in its parent's cutime/cstime
        ticks += sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _client(clients: int, headers: dict[str, str]) -> httpx.Client:
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    return httpx.Client(headers={**CLIENT_HEADERS, **headers}, timeout=600, limits=limits)


def start_ours(
    workdir: Path, clients: int, workers: int | None, *, name: str = OURS, env: dict[str, str] | None = None
) -> Server:
    """``dicom-cloud serve`` in ``workdir`` (``env`` added to its environment: another tree's
    ``PYTHONPATH`` for bench/service_ab.py), with a client of ``clients`` connections."""
    extra = ("--workers", str(workers)) if workers else ()
    service: ServiceProcess = start_service_process(workdir, extra_args=extra, env=env)
    http = _client(clients, {"Authorization": f"Bearer {service.token}"})

    def delete_study(uid: str) -> None:
        http.delete(f"{service.url}/studies/{uid}").raise_for_status()

    def stop() -> None:
        http.close()
        service.stop()

    return Server(name, service.url, service.pid, http, delete_study, stop)


def start_theirs(workdir: Path, clients: int, sync_storage: bool) -> tuple[Server, OrthancServer]:
    configuration = {
        "Name": "bench",
        "Plugins": [str(PLUGINS_DIR / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SyncStorageArea": sync_storage,
    }
    orthanc = start_orthanc(workdir, configuration)
    http = _client(clients, {})

    def delete_study(uid: str) -> None:
        found = http.post(f"{orthanc.url}/tools/lookup", content=uid.encode())
        found.raise_for_status()
        for item in found.json():
            if item["Type"] == "Study":
                http.delete(f"{orthanc.url}/studies/{item['ID']}").raise_for_status()

    def stop() -> None:
        http.close()
        orthanc.stop()

    assert orthanc.pid is not None
    return Server(ORTHANC, f"{orthanc.url}/dicom-web", orthanc.pid, http, delete_study, stop), orthanc


# ---------------------------------------------------------------------------------------------------------
# Requests and checks (the same code for both servers)


def part_delimiter(content_type: str) -> bytes:
    """What precedes each part of a multipart/related body of this Content-Type: CRLF, ``--`` and
    the boundary."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise BenchError(f"no boundary in {content_type!r}")
    return b"\r\n--" + match.group(1).encode()


def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts' contents of a multipart/related answer."""
    pieces = (b"\r\n" + body).split(part_delimiter(content_type))
    return [piece.split(b"\r\n\r\n", 1)[1] for piece in pieces[1:-1]]


def stow(server: Server, body: bytes) -> None:
    answer = server.http.post(
        f"{server.root}/studies", content=body, headers={**STOW_HEADERS, "Accept": DICOM_JSON}
    )
    if answer.status_code != 200:
        raise BenchError(f"{server.name}: STOW-RS answered {answer.status_code}: {answer.text[:300]}")
    if answer.json().get(FAILED_SOP_SEQUENCE, {}).get("Value"):
        raise BenchError(f"{server.name}: STOW-RS refused instances: {answer.text[:300]}")


def wado(server: Server, path: str) -> list[bytes]:
    answer = server.http.get(f"{server.root}{path}", headers={"Accept": MULTIPART_DICOM})
    if answer.status_code != 200:
        raise BenchError(f"{server.name}: WADO-RS {path} answered {answer.status_code}")
    return split_multipart(answer.headers["content-type"], answer.content)


def wado_streamed(server: Server, path: str) -> list[bytes]:
    """:func:`wado` for a large answer, as a viewer takes it: the parts are cut out of the stream as
    it arrives, each copied once. Joining a 210 MB answer and then splitting it cost the client
    three copies of it in fresh memory, 0.4 to 1.5 CPU-seconds by this VM's mood, against 0.12 to
    0.17 s of either server's CPU: the client, not the server, set the figure."""
    headers = {"Accept": MULTIPART_DICOM}
    with server.http.stream("GET", f"{server.root}{path}", headers=headers) as answer:
        if answer.status_code != 200:
            raise BenchError(f"{server.name}: WADO-RS {path} answered {answer.status_code}")
        delimiter = part_delimiter(answer.headers["content-type"])
        parts: list[bytes] = []
        pending = bytearray(b"\r\n")  # the first delimiter has no CRLF of its own before it
        started = False  # whether the first delimiter was seen (what comes before it is preamble)
        searched = 0  # where the next search for a delimiter begins
        for chunk in answer.iter_bytes():
            pending += chunk
            while (end := pending.find(delimiter, searched)) >= 0:
                if started:
                    content = pending.find(b"\r\n\r\n", 0, end)
                    if content < 0:
                        raise BenchError(f"{server.name}: a part of {path} has no header end")
                    parts.append(bytes(pending[content + 4 : end]))
                started = True
                del pending[: end + len(delimiter)]
                searched = 0
            searched = max(0, len(pending) - len(delimiter))
    return parts


def query_string(params: dict[str, str]) -> str:
    """``^`` and ``*`` as they are: Orthanc 1.10's DICOMweb plugin does not percent-decode query values
    (``PatientName=Bench%5E1`` matches nothing there), and both servers take them unescaped."""
    text = "&".join(f"{quote(k)}={quote(v, safe='^*-.,_')}" for k, v in params.items())
    return f"?{text}" if text else ""


def qido(server: Server, path: str, params: dict[str, str]) -> httpx.Response:
    url = f"{server.root}{path}{query_string(params)}"
    answer = server.http.get(url, headers={"Accept": DICOM_JSON})
    if answer.status_code not in (200, 204):
        raise BenchError(f"{server.name}: QIDO-RS {path} {params} answered {answer.status_code}")
    return answer


@dataclass(frozen=True)
class Instance:
    sop_uid: str
    series_uid: str
    sha256: str  # of the whole file
    pixel_sha256: str


def describe(data: bytes) -> Instance:
    ds = pydicom.dcmread(io.BytesIO(data))
    return Instance(
        str(ds.SOPInstanceUID),
        str(ds.SeriesInstanceUID),
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(ds.PixelData).hexdigest(),
    )


def verify(server: Server, parts: list[bytes], expected: dict[str, Instance]) -> None:
    """Ours: byte for byte. Orthanc: the same instances and pixel data (it may rewrite the meta)."""
    got = {item.sop_uid: item for item in map(describe, parts)}
    if len(parts) != len(expected) or got.keys() != expected.keys():
        raise BenchError(f"{server.name}: {len(parts)} instances retrieved, other SOP UIDs than stored")
    for uid, item in got.items():
        same = item.sha256 == expected[uid].sha256 if server.name == OURS else True
        if not same or item.pixel_sha256 != expected[uid].pixel_sha256:
            raise BenchError(f"{server.name}: instance {uid} differs from what was stored")


# ---------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Timing:
    seconds: float
    cpu_s: float  # the server's user + system CPU over the same span


def timed(server: Server, work: Callable[[], Any], *, sync: bool = True) -> tuple[Timing, Any]:
    if sync:
        os.sync()  # earlier writes are not flushed during this measurement
    cpu, start = server.cpu_seconds(), time.perf_counter()
    result = work()
    return Timing(time.perf_counter() - start, server.cpu_seconds() - cpu), result


@dataclass
class Measures:
    stow: list[Timing] = field(default_factory=list)
    wado_study: list[Timing] = field(default_factory=list)
    wado_instances: list[Timing] = field(default_factory=list)
    fill_s: float = 0.0
    fill_cpu_s: float = 0.0
    qido_ms: dict[str, list[float]] = field(default_factory=dict)


def alternate(servers: Sequence[Server], turn: int) -> list[Server]:
    """Both servers, the first one changing every turn."""
    return list(servers[turn % 2 :]) + list(servers[: turn % 2])


def measure_study(
    servers: list[Server],
    measures: dict[str, Measures],
    bodies: list[bytes],
    expected: dict[str, Instance],
    study_uid: str,
    args: argparse.Namespace,
) -> None:
    batches = [multipart(bodies[i : i + args.batch]) for i in range(0, len(bodies), args.batch)]
    paths = [
        f"/studies/{study_uid}/series/{item.series_uid}/instances/{uid}" for uid, item in expected.items()
    ]
    with ThreadPoolExecutor(args.clients) as pool:

        def each(call: Callable[[Server, Any], Any], server: Server, items: list[Any]) -> list[Any]:
            return list(pool.map(partial(call, server), items))

        for repetition in range(args.repeat):
            for server in alternate(servers, repetition):
                if repetition:
                    server.delete_study(study_uid)
                timing, _ = timed(server, partial(each, stow, server, batches))
                measures[server.name].stow.append(timing)
                note(f"{server.name} #{repetition + 1}: STOW-RS {timing.seconds:.2f} s")
            # Retrievals in rounds, the servers taking turns within each: this VM's speed shifts
            # for seconds at a time, and a shift would otherwise land on one server's whole series.
            for turn in range(args.retrievals):
                order = alternate(servers, repetition + turn + 1)
                for server in order:
                    timing, parts = timed(server, partial(wado_streamed, server, f"/studies/{study_uid}"))
                    verify(server, parts, expected)
                    measures[server.name].wado_study.append(timing)
                for server in order:
                    timing, answers = timed(server, partial(each, wado, server, paths))
                    if any(len(a) != 1 for a in answers):
                        raise BenchError(f"{server.name}: an instance's WADO-RS answer is not one part")
                    verify(server, [a[0] for a in answers], expected)
                    measures[server.name].wado_instances.append(timing)
            note(f"#{repetition + 1}: WADO-RS study and instances verified ({args.retrievals} rounds)")


def fill(
    servers: list[Server], measures: dict[str, Measures], small: list[bytes], args: argparse.Namespace
) -> None:
    """Index the small instances in both, a round of ``--clients`` requests to each in turn."""
    batches = [small[i : i + args.fill_batch] for i in range(0, len(small), args.fill_batch)]
    bodies = [multipart(batch) for batch in batches]

    def send(server: Server, index: int) -> None:
        if server.name == ORTHANC and args.orthanc_fill == "rest":
            base = server.root.removesuffix("/dicom-web")
            for data in batches[index]:
                server.http.post(f"{base}/instances", content=data).raise_for_status()
        else:
            stow(server, bodies[index])

    with ThreadPoolExecutor(args.clients) as pool:

        def send_all(server: Server, indices: range) -> None:
            list(pool.map(partial(send, server), indices))

        for turn, first in enumerate(range(0, len(batches), args.clients)):
            indices = range(first, min(first + args.clients, len(batches)))
            for server in alternate(servers, turn):
                timing, _ = timed(server, partial(send_all, server, indices), sync=False)
                measures[server.name].fill_s += timing.seconds
                measures[server.name].fill_cpu_s += timing.cpu_s
            if turn % 50 == 49:
                note(f"filled {min(len(small), (first + args.clients) * args.fill_batch)} of {len(small)}")


def queries(small: list[bytes]) -> dict[str, tuple[str, str, dict[str, str]]]:
    """name -> (level, path, parameters); each with fewer results than the service's default limit."""
    patient = min(7, len(small) // SMALL_PER_STUDY - 1)
    ds = pydicom.dcmread(io.BytesIO(small[patient * SMALL_PER_STUDY]))
    study, series, patient_id = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientID)
    return {
        "studies_by_patient_id": ("study", "/studies", {"PatientID": patient_id}),
        "studies_by_date_range": ("study", "/studies", {"StudyDate": "20200301-20200310"}),
        "studies_by_name_wildcard": ("study", "/studies", {"PatientName": "Bench^00000*"}),
        "series_by_patient_id": ("series", "/series", {"PatientID": patient_id}),
        "series_of_study": ("series", f"/studies/{study}/series", {}),
        "instances_by_patient_id": ("instance", "/instances", {"PatientID": patient_id}),
        "instances_of_series": ("instance", f"/studies/{study}/series/{series}/instances", {}),
    }


def measure_qido(
    servers: list[Server],
    measures: dict[str, Measures],
    searches: dict[str, tuple[str, str, dict[str, str]]],
    repetitions: int,
) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, (_, path, params) in searches.items():
        found = {}
        for server in servers:  # the first answer of each (untimed) is the one whose count is compared
            answer = qido(server, path, params)
            found[server.name] = len(answer.json()) if answer.status_code == 200 else 0
        if len(set(found.values())) != 1 or not found[OURS]:
            raise BenchError(f"QIDO-RS {name}: result counts differ or are zero: {found}")
        counts[name] = found[OURS]
        for turn in range(repetitions):
            for server in alternate(servers, turn):
                start = time.perf_counter()
                qido(server, path, params)
                measures[server.name].qido_ms.setdefault(name, []).append(
                    (time.perf_counter() - start) * 1000
                )
    return counts


# ---------------------------------------------------------------------------------------------------------
# Report


def versions(orthanc: OrthancServer) -> dict[str, str]:
    system = orthanc.get_json("/system")
    plugin = orthanc.get_json("/plugins/dicom-web")
    return {
        "dicom-cloud": importlib.metadata.version("dicom-cloud"),
        "Orthanc": str(system.get("Version")),
        "Orthanc DICOMweb plugin": str(plugin.get("Version")),
        "python": platform.python_version(),
        **{name: importlib.metadata.version(name) for name in ("uvicorn", "httpx", "pydicom")},
    }


def summary(measures: Measures, instances: int, study_bytes: int, small: int) -> dict[str, Any]:
    def med(timings: list[Timing]) -> Timing:
        return Timing(
            statistics.median(t.seconds for t in timings), statistics.median(t.cpu_s for t in timings)
        )

    stow, study, each = med(measures.stow), med(measures.wado_study), med(measures.wado_instances)
    return {
        "stow_s": stow.seconds,
        "stow_instances_per_s": instances / stow.seconds,
        "stow_mb_per_s": study_bytes / stow.seconds / 1e6,
        "stow_server_cpu_s": stow.cpu_s,
        "wado_study_s": study.seconds,
        "wado_study_instances_per_s": instances / study.seconds,
        "wado_study_mb_per_s": study_bytes / study.seconds / 1e6,
        "wado_study_server_cpu_s": study.cpu_s,
        "wado_instances_s": each.seconds,
        "wado_instances_per_s": instances / each.seconds,
        "wado_instances_server_cpu_s": each.cpu_s,
        "fill_s": measures.fill_s,
        "fill_instances_per_s": small / measures.fill_s if measures.fill_s else None,
        "fill_server_cpu_s": measures.fill_cpu_s,
        "qido_ms": {
            name: {"median": statistics.median(times), "p95": percentile(times, 0.95)}
            for name, times in measures.qido_ms.items()
        },
    }


RATES = (
    ("STOW-RS study", "stow_instances_per_s", "instances/s"),
    ("STOW-RS study", "stow_mb_per_s", "MB/s"),
    ("WADO-RS whole study", "wado_study_instances_per_s", "instances/s"),
    ("WADO-RS whole study", "wado_study_mb_per_s", "MB/s"),
    ("WADO-RS instance by instance", "wado_instances_per_s", "instances/s"),
    ("index fill (QIDO data)", "fill_instances_per_s", "instances/s"),
)
CPU = (
    ("STOW-RS study", "stow_server_cpu_s"),
    ("WADO-RS whole study", "wado_study_server_cpu_s"),
    ("WADO-RS instance by instance", "wado_instances_server_cpu_s"),
    ("index fill", "fill_server_cpu_s"),
)


def render(report: dict[str, Any]) -> str:
    p, ours, theirs = report["parameters"], report["results"][OURS], report["results"][ORTHANC]
    m = report["machine"]
    lines = [
        f"# DICOMweb: dicom-cloud beside Orthanc ({report['date']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; {m['uname']}.",
        f"Both servers' data on {report.get('data_file_system', 'an unrecorded file system')}.",
        "Load average (1, 5, 15 min) at start: "
        + ", ".join(f"{v:.2f}" for v in report["load_average_at_start"])
        + "; at end: "
        + ", ".join(f"{v:.2f}" for v in report["load_average_at_end"])
        + ".",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        f"Data: the synthetic CT study, {p['instances']} instances ({p['study_mb']:.0f} MB), stored in "
        f"STOW-RS requests of {p['batch']}; then {p['qido_instances']} small instances indexed "
        f"(batches of {p['fill_batch']}, Orthanc through {p['orthanc_fill']}). {p['clients']} concurrent "
        f"requests; {p['repeat']} repetitions of the study's STOW-RS, each followed by "
        f"{p.get('retrievals', 1)} rounds of its WADO-RS, the servers taking turns (medians); "
        f"{p['queries']} repetitions of each "
        f"search. Orthanc: SyncStorageArea {str(p['orthanc_sync_storage']).lower()}, "
        f"MaximumStorageCacheSize 0. dicom-cloud serve workers: {p.get('workers', 1)}.",
        "",
        "Ratio: dicom-cloud over Orthanc, above 1 = dicom-cloud is faster (rates: ours / Orthanc's; "
        "latencies: Orthanc's / ours).",
        "",
        "| measure | unit | dicom-cloud | Orthanc | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for title, key, unit in RATES:
        a, b = ours[key], theirs[key]
        ratio = f"{a / b:.2f}x" if a and b else "-"
        lines.append(f"| {title} | {unit} | {a or 0:.1f} | {b or 0:.1f} | {ratio} |")
    lines += [
        "",
        "| QIDO-RS search | results | dicom-cloud median / p95 ms | Orthanc median / p95 ms "
        "| ratio (medians) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, count in report["qido_counts"].items():
        a, b = ours["qido_ms"][name], theirs["qido_ms"][name]
        lines.append(
            f"| {report['qido_levels'][name]}: {name} | {count} | {a['median']:.2f} / {a['p95']:.2f} "
            f"| {b['median']:.2f} / {b['p95']:.2f} | {b['median'] / a['median']:.2f}x |"
        )
    lines += [
        "",
        f"Index fill: dicom-cloud {ours['fill_s']:.1f} s, Orthanc {theirs['fill_s']:.1f} s "
        f"for {p['qido_instances']} instances.",
        "",
        "| server CPU (user + system s, medians) | dicom-cloud | Orthanc |",
        "|---|---:|---:|",
    ]
    lines += [f"| {title} | {ours[key]:.2f} | {theirs[key]:.2f} |" for title, key in CPU]
    lines += [
        "",
        "Verified: every retrieved instance (dicom-cloud: byte for byte; Orthanc: SOP Instance UID and "
        "pixel data), and the same number of QIDO-RS results from both.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Main


def note(text: str) -> None:
    print(f"dicomweb-bench: {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=400, help="CT instances of the study (~512 KB each)")
    p.add_argument("--batch", type=int, default=10, help="instances per STOW-RS request of the study")
    p.add_argument(
        "--clients", type=int, default=4, help="concurrent requests (STOW, per-instance WADO, fill)"
    )
    p.add_argument("--repeat", type=int, default=3, help="repetitions of the study's STOW and WADO")
    p.add_argument(
        "--retrievals",
        type=int,
        default=3,
        help="rounds of WADO-RS (whole study, then instance by instance) per repetition, the servers "
        "taking turns within each",
    )
    p.add_argument("--qido-instances", type=int, default=100_000, help="small instances indexed for QIDO")
    p.add_argument("--fill-batch", type=int, default=100, help="instances per request of the index fill")
    p.add_argument(
        "--orthanc-fill",
        choices=["stow", "rest"],
        default="stow",
        help="how Orthanc is filled: STOW-RS batches (default) or POST /instances one by one",
    )
    p.add_argument("--queries", type=int, default=200, help="repetitions of each QIDO-RS search")
    p.add_argument(
        "--orthanc-sync-storage",
        action="store_true",
        help="Orthanc's default SyncStorageArea=true (fsync per file); off by default, as dicom-cloud "
        "does not fsync its objects",
    )
    p.add_argument(
        "--workers", type=int, help="worker processes of dicom-cloud serve (default: its own, one per core)"
    )
    p.add_argument("--data-dir", type=Path, default=BENCH / ".data", help="inputs and server data")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where dicomweb.md/.json go")
    args = p.parse_args(argv)
    if args.qido_instances < 10 * SMALL_PER_STUDY or min(args.instances, args.batch, args.clients) < 1:
        p.error(f"--qido-instances must be at least {10 * SMALL_PER_STUDY}; counts must be positive")
    if min(args.repeat, args.retrievals, args.queries, args.fill_batch) < 1:
        p.error("--repeat, --retrievals, --queries and --fill-batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = args.data_dir / "inputs-dicomweb"
    manifest = generate.ensure(inputs, instances=args.instances, large_size=1)
    bodies = [(inputs / entry.name).read_bytes() for entry in manifest.study]
    expected = {item.sop_uid: item for item in map(describe, bodies)}
    study_uid = str(pydicom.dcmread(io.BytesIO(bodies[0])).StudyInstanceUID)
    note(f"making {args.qido_instances} small instances")
    small = list(small_instances(args.qido_instances))
    searches = queries(small)

    work = args.data_dir / "dicomweb-run"
    shutil.rmtree(work, ignore_errors=True)
    ours = start_ours(work / "dicom-cloud", args.clients, args.workers)
    try:
        theirs, orthanc = start_theirs(work / "orthanc", args.clients, args.orthanc_sync_storage)
    except BaseException:
        ours.stop()
        raise
    servers = [ours, theirs]
    measures = {OURS: Measures(), ORTHANC: Measures()}
    failed = True
    try:
        report: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "data_file_system": file_system(work),
            "load_average_at_start": os.getloadavg(),
            "versions": versions(orthanc),
            "parameters": {
                "instances": len(bodies),
                "study_mb": manifest.study_bytes / 1e6,
                "batch": args.batch,
                "clients": args.clients,
                "repeat": args.repeat,
                "retrievals": args.retrievals,
                "qido_instances": args.qido_instances,
                "fill_batch": args.fill_batch,
                "orthanc_fill": "STOW-RS" if args.orthanc_fill == "stow" else "POST /instances",
                "queries": args.queries,
                "orthanc_sync_storage": args.orthanc_sync_storage,
                "workers": args.workers or "default (one per core)",
            },
        }
        for server in servers:  # connections and first-request work outside the measurements
            qido(server, "/studies", {"PatientID": "none"})
        measure_study(servers, measures, bodies, expected, study_uid, args)
        note(f"filling both indexes with {len(small)} instances")
        fill(servers, measures, small, args)
        report["qido_counts"] = measure_qido(servers, measures, searches, args.queries)
        report["qido_levels"] = {name: level for name, (level, _, _) in searches.items()}
        failed = False
    except (BenchError, httpx.HTTPError) as error:
        note(f"FAILED: {error}; the servers' data and logs are kept in {work}")
        return 1
    finally:
        for server in servers:
            server.stop()
        if not failed:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average_at_end"] = os.getloadavg()
    report["results"] = {
        name: summary(m, len(bodies), manifest.study_bytes, len(small)) for name, m in measures.items()
    }
    text = anonymize(render(report), args.data_dir)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "dicomweb.md").write_text(text)
    payload = {**report, "samples": {name: _samples(m) for name, m in measures.items()}}
    (args.results / "dicomweb.json").write_text(
        anonymize(json.dumps(payload, indent=1) + "\n", args.data_dir)
    )
    return 0


def _samples(measures: Measures) -> dict[str, Any]:
    def pairs(timings: list[Timing]) -> list[dict[str, float]]:
        return [{"seconds": t.seconds, "server_cpu_s": t.cpu_s} for t in timings]

    return {
        "stow": pairs(measures.stow),
        "wado_study": pairs(measures.wado_study),
        "wado_instances": pairs(measures.wado_instances),
        "qido_ms": measures.qido_ms,
    }


if __name__ == "__main__":
    sys.exit(main())
