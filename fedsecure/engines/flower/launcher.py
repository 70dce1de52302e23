"""Start a local Flower deployment (SuperLink + SuperNodes), submit a fedsecure run, clean up.

``fedsecure run SCENARIO.toml --engine flower`` calls :func:`run_on_flower`: without
``--superlink`` it starts a SuperLink and N SuperNodes on this machine (127.0.0.1, free ports,
optionally TLS with a freshly generated CA), each in its own process group; with
``--superlink HOST:PORT`` it submits to an existing deployment. Either way it builds the
Flower App from :mod:`fedsecure.engines.flower`'s template, passes the resolved scenario as
run config, waits (bounded) for the run to finish and stops every process it started --
after success, failure, timeout or Ctrl-C alike.

Flower's own executables do the work (``flower-superlink``, ``flower-supernode``, ``flwr run``);
runtime dependency installation is disabled (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``)
so that no process installs packages behind the user's back.

Threat model of the launcher: local processes of one user on one machine. Without ``tls`` the
loopback traffic is plaintext (as any process of that user can read the others' memory anyway);
for a real multi-machine set-up use TLS (see docs/flower.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from fedsecure.engines.flower import protocol as P

CONNECTION = "fedsecure"
"""Name of the SuperLink connection written into the private ``FLWR_HOME/config.toml``."""

_INSTALL = "pip install 'fedsecure[flower]'  (flwr==1.41.0)"


class FlowerSetupError(RuntimeError):
    """The local deployment could not start (executables missing, a process exited early)."""


class SuperLinkUnreachableError(ConnectionError):
    """No SuperLink answers at the given address."""


class FlowerRunError(RuntimeError):
    """The Flower run did not complete; the message carries the ServerApp's error or the log tail."""


@dataclass(frozen=True)
class FlowerOptions:
    """How to run a scenario on Flower.

    Parameters
    ----------
    supernodes:
        Local mode: number of SuperNodes serving clients (client ``c`` goes to SuperNode
        ``c % supernodes``, Flower's ``partition-id`` / ``num-partitions`` convention);
        ``None``: min(3, number of clients).
    superlink:
        ``HOST:PORT`` of an existing SuperLink (its ``--host``/``--port``); ``None`` starts a
        local deployment.
    tls:
        Local mode: generate a CA and a certificate for 127.0.0.1 and run every connection over TLS.
    root_certificates:
        Remote mode: PEM file of the CA that signed the SuperLink's certificate.
    insecure:
        Remote mode: connect without TLS (only for a SuperLink started with ``--insecure``).
    node_configs:
        Local mode: explicit ``--node-config`` of each client SuperNode (overrides ``supernodes``).
    key_holder:
        Local mode: also start a ``role="key-holder"`` SuperNode (``None``: when the transport is ckks).
    discovery_timeout_s, stage_timeout_s, train_timeout_s:
        The ServerApp's bounds (see :class:`fedsecure.engines.flower.engine.ServerOptions`).
    startup_timeout_s:
        Bound on the SuperLink opening its port (local) / answering (remote).
    run_timeout_s:
        Bound on the whole run; after it the run is stopped and every process ended.
    """

    supernodes: int | None = None
    superlink: str | None = None
    tls: bool = False
    root_certificates: str | None = None
    insecure: bool = False
    node_configs: tuple[Mapping[str, Any], ...] | None = None
    key_holder: bool | None = None
    discovery_timeout_s: float = 120.0
    stage_timeout_s: float = 120.0
    train_timeout_s: float = 900.0
    startup_timeout_s: float = 60.0
    run_timeout_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        n = self.supernodes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"supernodes must be a positive integer, got {self.supernodes!r}")
        for name in (
            "discovery_timeout_s",
            "stage_timeout_s",
            "train_timeout_s",
            "startup_timeout_s",
            "run_timeout_s",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.superlink is not None:
            if self.tls:
                raise ValueError(
                    "tls generates certificates for a local SuperLink; for --superlink pass the CA that "
                    "signed its certificate as root_certificates (--root-certificates)"
                )
            if self.insecure and self.root_certificates:
                raise ValueError("choose insecure or root_certificates, not both")
        elif self.root_certificates or self.insecure:
            raise ValueError("root_certificates / insecure apply to --superlink; a local deployment uses tls")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a generated deployment: the CA certificate, the server certificate and key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


@dataclass
class FlowerRun:
    """The outcome of :func:`run_flower`."""

    run_id: int | None
    status: str
    out_dir: Path
    log_path: Path
    results: Any = None
    """:class:`~fedsecure.experiment.Results` when ``out_dir`` is on this machine, else ``None``."""
    wall_s: float = 0.0
    processes: list[int] = field(default_factory=list)
    """PIDs of the local processes this run started (all ended when it returns)."""


# ---------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------
def executable(name: str) -> str:
    """Path of a Flower executable in this Python environment (or on PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FlowerSetupError(f"Flower's {name!r} executable is not installed: {_INSTALL}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); a clear error otherwise."""
    m = re.fullmatch(r"\[(?P<h6>[^\]]+)\]:(?P<p6>\d+)|(?P<h>[^:\[\]]+):(?P<p>\d+)", address.strip())
    if not m:
        raise ValueError(f"SuperLink address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9093)")
    host = m.group("h6") or m.group("h")
    port = int(m.group("p6") or m.group("p"))
    if not 0 < port < 65536:
        raise ValueError(f"SuperLink address {address!r}: port must be in 1..65535")
    return host, port


def check_superlink(address: str, *, timeout_s: float = 5.0) -> None:
    """Raise :class:`SuperLinkUnreachableError` unless something accepts TCP connections at ``address``."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as err:
            last = err
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    raise SuperLinkUnreachableError(
        f"cannot reach the Flower SuperLink at {address} ({type(last).__name__}: {last}) within "
        f"{timeout_s:g} s. "
        "Check that flower-superlink runs there and listens on that --host/--port (default 127.0.0.1:8000) "
        "and that no firewall blocks it, or drop --superlink to start a local SuperLink with "
        "--supernodes N"
    )


def _node_config_arg(cfg: Mapping[str, Any]) -> str:
    parts = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, int | float):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={json.dumps(str(v))}")
    return " ".join(parts)


def scenario_num_clients(config: Any) -> int:
    """The scenario's number of clients (``data.num_clients`` or the dataset builder's default)."""
    import inspect

    from fedsecure.registry import DATASETS

    n = dict(config.data.params).get("num_clients")
    if n is None:
        param = inspect.signature(DATASETS.get(config.data.dataset)).parameters.get("num_clients")
        n = None if param is None or param.default is inspect.Parameter.empty else param.default
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cannot tell the scenario's number of clients (data.num_clients = {n!r})")
    return n


def default_node_configs(*, supernodes: int, num_clients: int) -> tuple[dict[str, Any], ...]:
    """Round-robin partitions: SuperNode i serves clients ``c`` with ``c % supernodes == i``."""
    if supernodes > num_clients:
        raise ValueError(
            f"--supernodes {supernodes} exceeds the scenario's {num_clients} clients (data.num_clients): "
            "every SuperNode must serve at least one client"
        )
    return tuple({"partition-id": i, "num-partitions": supernodes} for i in range(supernodes))


def generate_tls_certificates(
    directory: str | Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 30
) -> TlsFiles:
    """A fresh CA (its key is discarded after signing) and a server certificate for ``hosts``.

    Keys are ECDSA P-256 from the OS CSPRNG (``cryptography``); the server key file is 0600.
    """
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("hosts must name at least one address or DNS name of the SuperLink")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsecure deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files_ = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")
    files_.ca_certificate.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files_.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(files_.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return files_


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces and parentheses
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 2:
            out.setdefault(int(rest[1]), []).append(int(entry.name))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (Linux ``/proc``; just ``pid`` elsewhere)."""
    children = _children_map()
    seen, stack = [], [pid]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.append(p)
        stack.extend(children.get(p, []))
    return seen


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rfind(")") + 2 :].split()[0] != "Z"
    except OSError:
        pass
    if Path("/proc").is_dir():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], *, grace_s: float = 10.0) -> list[int]:
    """End ``procs`` (each the leader of its own session) and all their descendants; return the PIDs ended.

    SIGTERM first (Flower's processes shut down cleanly), SIGKILL to whatever is left after
    ``grace_s``; then every direct child is reaped.
    """
    pids: list[int] = []
    for p in procs:
        for q in process_tree(p.pid):
            if q not in pids:
                pids.append(q)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    for q in pids:
        _signal(q, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()
        if not any(pid_alive(q) for q in pids):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
    for q in pids:
        if pid_alive(q):
            _signal(q, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5.0)
    end = time.monotonic() + 5.0
    while any(pid_alive(q) for q in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return pids


def flower_environment(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: a private FLWR_HOME, no runtime dependency installation."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name:
    # they must come from this Python environment even when it is not activated.
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    return env


class LocalFederation:
    """A SuperLink and SuperNodes on this machine (127.0.0.1), each in its own process group.

    Use as a context manager: processes are stopped on exit whatever happened.

    Parameters
    ----------
    workdir:
        Directory for logs, certificates and the private ``FLWR_HOME``.
    node_configs:
        The ``--node-config`` of each SuperNode, in order (e.g. ``{"client-ids": "0,3"}``,
        ``{"partition-id": 0, "num-partitions": 3}`` or ``{"role": "key-holder"}``).
    tls:
        Generate certificates and run every connection over TLS.
    """

    def __init__(
        self,
        *,
        workdir: str | Path,
        node_configs: Sequence[Mapping[str, Any]],
        tls: bool = False,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not node_configs:
            raise ValueError("a local federation needs at least one SuperNode")
        self.workdir = Path(workdir).resolve()
        self.node_configs = [dict(c) for c in node_configs]
        self.tls = bool(tls)
        self.host = host
        self.startup_timeout_s = float(startup_timeout_s)
        self.flwr_home = self.workdir / "home"
        self.env = dict(env) if env is not None else flower_environment(self.flwr_home)
        self.port: int | None = None
        self.tls_files: TlsFiles | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self.ended: list[int] = []

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the local federation is not started")
        return f"{self.host}:{self.port}"

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.superlink, *self.supernodes] if p is not None]

    def pids(self) -> list[int]:
        """Every live PID of the deployment (SuperLink, SuperNodes and the processes they spawned)."""
        out: list[int] = []
        for p in self.processes:
            out.extend(q for q in process_tree(p.pid) if q not in out)
        return out

    def _popen(self, cmd: list[str], log_name: str) -> subprocess.Popen[bytes]:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        fh = open(self.workdir / "logs" / log_name, "wb")  # closed in stop()
        self._logs.append(fh)
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir, start_new_session=True
        )

    def log_tail(self, log_name: str, *, chars: int = 3000) -> str:
        path = self.workdir / "logs" / log_name
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> LocalFederation:
        """Start the SuperLink, wait for its port, then start the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        link, node = executable("flower-superlink"), executable("flower-supernode")
        self.port = free_port(self.host)
        sec: list[str]
        if self.tls:
            self.tls_files = generate_tls_certificates(self.workdir / "certs", hosts=(self.host, "localhost"))
            f = self.tls_files
            sec = [
                "--ssl-certfile",
                str(f.certificate),
                "--ssl-keyfile",
                str(f.private_key),
                "--ssl-ca-certfile",
                str(f.ca_certificate),
            ]
        else:
            sec = ["--insecure"]
        try:
            self.superlink = self._popen(
                [
                    link,
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--disable-runtime-dependency-installation",
                    *sec,
                ],
                "superlink.log",
            )
            deadline = time.monotonic() + self.startup_timeout_s
            while True:
                if self.superlink.poll() is not None:
                    raise FlowerSetupError(
                        f"flower-superlink exited with code {self.superlink.returncode}:\n"
                        + self.log_tail("superlink.log")
                    )
                try:
                    with socket.create_connection((self.host, self.port), timeout=1.0):
                        break
                except OSError:
                    pass
                if time.monotonic() >= deadline:
                    raise FlowerSetupError(
                        f"flower-superlink did not open {self.address} within {self.startup_timeout_s:g} s:\n"
                        + self.log_tail("superlink.log")
                    )
                time.sleep(0.25)
            node_sec = (
                ["--root-certificates", str(self.tls_files.ca_certificate)]
                if self.tls_files
                else ["--insecure"]
            )
            for i, cfg in enumerate(self.node_configs):
                self.supernodes.append(
                    self._popen(
                        [
                            node,
                            "--superlink",
                            self.address,
                            "--port",
                            str(free_port(self.host)),
                            "--node-config",
                            _node_config_arg(cfg),
                            *node_sec,
                        ],
                        f"supernode-{i}.log",
                    )
                )
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        """Raise :class:`FlowerSetupError` if the SuperLink has exited."""
        if self.superlink is not None and self.superlink.poll() is not None:
            raise FlowerSetupError(
                f"the local SuperLink exited with code {self.superlink.returncode}:\n"
                + self.log_tail("superlink.log")
            )

    def kill_supernode(self, index: int) -> list[int]:
        """SIGKILL SuperNode ``index`` and everything it spawned (a crash, for dropout tests)."""
        proc = self.supernodes[index]
        pids = process_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for q in pids:
            _signal(q, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        return pids

    def stop(self) -> list[int]:
        """End every process of the deployment (idempotent); return the PIDs ended."""
        ended = stop_processes(self.processes)
        self.ended.extend(q for q in ended if q not in self.ended)
        for fh in self._logs:
            with contextlib.suppress(OSError):
                fh.close()
        self._logs = []
        return ended

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Submitting a run
# ---------------------------------------------------------------------------------------------
def write_app(directory: str | Path) -> Path:
    """Copy the Flower App template (``pyproject.toml`` naming fedsecure's ServerApp/ClientApp)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    text = files("fedsecure.engines.flower").joinpath("app_template/pyproject.toml").read_text()
    (d / "pyproject.toml").write_text(text)
    return d


def write_connection(
    flwr_home: Path, *, address: str, insecure: bool, root_certificates: str | Path | None
) -> Path:
    """Write ``FLWR_HOME/config.toml`` with the ``fedsecure`` SuperLink connection."""
    import tomli_w

    conn: dict[str, Any] = {"address": address}
    if insecure:
        conn["insecure"] = True
    elif root_certificates is not None:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
    return path


def write_run_config(
    path: Path, *, scenario: Mapping[str, Any], out_dir: Path, resume: bool, options: FlowerOptions
) -> Path:
    """The run-config overrides file: the resolved scenario (as TOML text) and the ServerApp's options."""
    import tomli_w

    from fedsecure.report.toml_writer import dumps

    doc = {
        P.RC_SCENARIO: dumps(dict(scenario)),
        P.RC_OUT_DIR: str(out_dir),
        P.RC_RESUME: bool(resume),
        P.RC_DISCOVERY_TIMEOUT: float(options.discovery_timeout_s),
        P.RC_STAGE_TIMEOUT: float(options.stage_timeout_s),
        P.RC_TRAIN_TIMEOUT: float(options.train_timeout_s),
    }
    path.write_text(tomli_w.dumps(doc))
    return path


def _run_status(run_id: int, env: Mapping[str, str], *, timeout_s: float = 120.0) -> str:
    try:
        out = subprocess.run(
            [executable("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            env=dict(env),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        doc = json.loads(out.stdout.decode(errors="replace") or "{}")
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError):
        return "unknown"
    for run in doc.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown"


def _stop_run(run_id: int, env: Mapping[str, str]) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(
            [executable("flwr"), "stop", str(run_id), CONNECTION],
            env=dict(env),
            capture_output=True,
            timeout=60,
            check=False,
        )


def _progress(metrics: Path, seen: int, echo: Callable[[str], None]) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return seen
    for line in lines[seen:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return seen
        loss = row.get("eval_loss")
        dropped = row.get("dropped") or []
        echo(
            f"round {row.get('round')}: {len(row.get('aggregated', []))} clients aggregated"
            + (f", dropped {dropped}" if dropped else "")
            + (f", eval loss {loss:.4f}" if isinstance(loss, float) else "")
            + f" ({row.get('round_s', 0.0):.1f} s)"
        )
        seen += 1
    return seen


def run_flower(
    config: Any,
    *,
    out_dir: str | Path,
    options: FlowerOptions | None = None,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    on_started: Callable[[LocalFederation | None], None] | None = None,
) -> FlowerRun:
    """Run ``config`` on Flower's deployment engine and wait for it (bounded).

    Parameters
    ----------
    config:
        A validated :class:`~fedsecure.config.ExperimentConfig` (no ``[grid]``).
    out_dir:
        Results directory (the ServerApp writes ``results.json`` etc. there; with a remote
        SuperLink this path is on the SuperLink's machine). Flower logs go to ``out_dir/flower``.
    options:
        :class:`FlowerOptions` (default: 3 local SuperNodes, no TLS).
    echo:
        Called with one progress line per finished round.
    on_started:
        Called once the local deployment runs (with it; ``None`` in remote mode), e.g. to
        inject faults in tests.

    Raises
    ------
    SuperLinkUnreachableError, FlowerSetupError, FlowerRunError
    """
    from fedsecure.experiment import Results

    opts = options or FlowerOptions()
    try:
        import flwr  # noqa: F401
        import tomli_w  # noqa: F401
    except ModuleNotFoundError as err:
        raise FlowerSetupError(f"the Flower engine needs Flower ({err.name} is missing): {_INSTALL}") from err
    if config.grid:
        raise ValueError(
            "a [grid] runs on the simulation engine; run one point at a time with --engine flower"
        )
    out = Path(out_dir).resolve()
    work = out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    (work / "server_error.txt").unlink(missing_ok=True)
    if not resume:
        (out / "results.json").unlink(missing_ok=True)
    flwr_home = work / "home"
    env = flower_environment(flwr_home)
    app = write_app(work / "app")
    run_config = write_run_config(
        work / "run_config.toml", scenario=config.to_dict(), out_dir=out, resume=resume, options=opts
    )
    fed: LocalFederation | None = None
    if opts.superlink is None:
        configs = (
            list(opts.node_configs)
            if opts.node_configs is not None
            else list(
                default_node_configs(
                    supernodes=opts.supernodes or min(3, scenario_num_clients(config)),
                    num_clients=scenario_num_clients(config),
                )
            )
        )
        key_holder = opts.key_holder if opts.key_holder is not None else config.transport.name == "ckks"
        if key_holder:
            configs.append({"role": P.ROLE_KEY_HOLDER})
        fed = LocalFederation(
            workdir=work,
            node_configs=configs,
            tls=opts.tls,
            startup_timeout_s=opts.startup_timeout_s,
            env=env,
        )
    log_path = work / "flwr-run.log"
    t0 = time.perf_counter()
    run = FlowerRun(run_id=None, status="not started", out_dir=out, log_path=log_path)
    proc: subprocess.Popen[bytes] | None = None
    try:
        if fed is not None:
            fed.start()
            run.processes = fed.pids()
            address, insecure = fed.address, not opts.tls
            root = fed.tls_files.ca_certificate if fed.tls_files else None
        else:
            assert opts.superlink is not None
            check_superlink(opts.superlink, timeout_s=min(opts.startup_timeout_s, 5.0))
            address, insecure, root = opts.superlink, opts.insecure, opts.root_certificates
        write_connection(flwr_home, address=address, insecure=insecure, root_certificates=root)
        if on_started is not None:
            on_started(fed)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    executable("flwr"),
                    "run",
                    str(app),
                    CONNECTION,
                    "--run-config",
                    str(run_config),
                    "--stream",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
                start_new_session=True,
            )
            deadline = time.monotonic() + opts.run_timeout_s
            seen = 0
            while proc.poll() is None:
                if fed is not None:
                    fed.check_alive()
                    run.processes.extend(q for q in fed.pids() if q not in run.processes)
                if echo is not None:
                    seen = _progress(out / "metrics.jsonl", seen, echo)
                if run.run_id is None:
                    run.run_id = _parse_run_id(log_path)
                if time.monotonic() >= deadline:
                    if run.run_id is not None:
                        _stop_run(run.run_id, env)
                    raise FlowerRunError(
                        f"the Flower run did not finish within {opts.run_timeout_s:g} s; it was stopped "
                        f"(log: {log_path})"
                    )
                time.sleep(0.5)
        if echo is not None:
            _progress(out / "metrics.jsonl", seen, echo)
        run.run_id = run.run_id or _parse_run_id(log_path)
        log_text = log_path.read_text(errors="replace")
        if run.run_id is None:
            raise FlowerRunError(
                f"`flwr run` did not start a run (exit code {proc.returncode}):\n{log_text[-3000:]}"
            )
        run.status = _run_status(run.run_id, env)
        error_file = work / "server_error.txt"
        if error_file.exists():
            raise FlowerRunError(
                f"the fedsecure ServerApp failed (run {run.run_id}): {error_file.read_text().strip()}"
            )
        if not run.status.endswith("completed"):
            raise FlowerRunError(
                f"Flower run {run.run_id} ended with status {run.status!r}; log tail "
                f"({log_path}):\n{log_text[-3000:]}"
            )
        if (out / "results.json").exists():
            run.results = Results.load(out)
        return run
    finally:
        if proc is not None and proc.poll() is None:
            stop_processes([proc], grace_s=5.0)
        if fed is not None:
            fed.stop()
            run.processes.extend(q for q in fed.ended if q not in run.processes)
        run.wall_s = time.perf_counter() - t0


def _parse_run_id(log_path: Path) -> int | None:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"Successfully started run (\d+)", text)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# The CLI entry
# ---------------------------------------------------------------------------------------------
def options_from_args(args: Any) -> FlowerOptions:
    """:class:`FlowerOptions` from ``fedsecure run``'s arguments."""
    superlink = getattr(args, "superlink", None)
    supernodes = getattr(args, "supernodes", None)
    if superlink is not None and supernodes is not None:
        raise ValueError(
            "--supernodes starts local SuperNodes; with --superlink the SuperNodes are the ones "
            "connected to it"
        )
    return FlowerOptions(
        supernodes=supernodes,
        superlink=superlink,
        tls=bool(getattr(args, "tls", False)),
        root_certificates=getattr(args, "root_certificates", None),
        insecure=bool(getattr(args, "insecure", False)),
    )


def run_on_flower(config: Any, args: Any) -> int:
    """``fedsecure run SCENARIO --engine flower [...]``: run, print the headline; return the exit code.

    Exit codes: 0 done, 1 the run failed, 2 bad arguments or no SuperLink at ``--superlink``.
    """
    from fedsecure.report.summary import headline, text_table

    try:
        options = options_from_args(args)
    except ValueError as err:
        print(f"fedsecure: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if getattr(args, "out", None) else _default_out(config.name)
    where = (
        f"SuperLink {options.superlink}"
        if options.superlink
        else (
            f"a local SuperLink + {options.supernodes or 'up to 3'} SuperNodes"
            + (" (TLS)" if options.tls else "")
        )
    )
    print(
        f"fedsecure: running {config.name!r} ({config.model.name}, {config.transport.name}) on Flower via "
        f"{where} -> {out}",
        file=sys.stderr,
    )
    quiet = bool(getattr(args, "quiet", False))
    try:
        run = run_flower(
            config,
            out_dir=out,
            options=options,
            resume=bool(getattr(args, "resume", False)),
            echo=None if quiet else (lambda line: print(f"fedsecure: {line}", file=sys.stderr)),
        )
    except (SuperLinkUnreachableError, ValueError) as err:
        print(f"fedsecure: error: {err}", file=sys.stderr)
        return 2
    except (FlowerSetupError, FlowerRunError) as err:
        print(f"fedsecure: error: {err}", file=sys.stderr)
        return 1
    if run.results is None:
        print(
            f"fedsecure: Flower run {run.run_id} {run.status}; the results are in {out} on the SuperLink's "
            "machine",
            file=sys.stderr,
        )
        return 0
    h = headline(run.results)
    print()
    print(text_table(list(h), [list(h.values())]))
    print(f"\nresults: {out / 'results.json'}  summary: {out / 'summary.md'}  flower logs: {out / 'flower'}")
    return 0


def _default_out(name: str) -> Path:
    from fedsecure.cli import _default_out as default

    return default(name)
