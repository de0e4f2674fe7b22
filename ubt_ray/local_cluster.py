"""A local Ray cluster of this project's own, for `ray job submit` on one machine.

    ubt cluster start [--num-cpus N] [--dashboard-port PORT] [--temp-dir /tmp/ubt-ray-cluster]
    ubt cluster address [--temp-dir ...]     # the dashboard's URL, for `ray job submit --address`
    ubt cluster stop [--temp-dir ...]
    (or python -m ubt_ray.local_cluster start|address|stop|status ...)

`start` runs `ray start --head` (the `ray` next to this Python) with token authentication, in a temp dir of its
own: the dashboard (job submission) on 127.0.0.1:8265, or on a free port when another Ray holds 8265 (or on
--dashboard-port), every other port free at start and outside the workers' port range. It returns once the
dashboard and its job agent take connections, so that a `ray job submit` right after it is accepted, and prints
the addresses.

`stop` ends the processes of that cluster only: the Ray processes whose command line names its temp dir or its
GCS port, those working in a job's copy of the working dir under the temp dir (a job's driver), and all their
descendants; SIGTERM first, SIGKILL for what is left after a few seconds. `ray stop` would end every Ray on the
machine, a `ray.init()` of another program included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import UserError

DEFAULT_TEMP_DIR = "/tmp/ubt-ray-cluster"
DEFAULT_DASHBOARD_PORT = 8265
STATE_FILE = "ubt-cluster.json"
HOST = "127.0.0.1"
# The ports of `ray start` other than the dashboard's; each gets a free one (Ray's defaults, e.g. 6379 for the
# GCS and 10001 for the client server, would collide with another Ray on the machine).
PORT_FLAGS = ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")
WORKER_PORTS = 200
# Ray's socket paths (<temp dir>/session_<date>_<pid>/sockets/plasma_store) must fit in 107 bytes.
MAX_TEMP_DIR_CHARS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def cluster_ports(dashboard_port: int, workers: int = WORKER_PORTS) -> tuple[range, dict[str, int]]:
    """A worker port range and one port per component, all free now and no two the same: `ray start` refuses a
    component port inside the worker range."""
    start = free_port()
    while start + workers > 65536 or dashboard_port in range(start, start + workers):
        start = free_port()
    worker_ports = range(start, start + workers)
    ports: dict[str, int] = {}
    for flag in PORT_FLAGS:
        port = free_port()
        while port in worker_ports or port in ports.values() or port == dashboard_port:
            port = free_port()
        ports[flag] = port
    return worker_ports, ports


def ray_executable() -> str:
    """The `ray` of this Python's environment (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.is_file() else shutil.which("ray")
    if not found:
        raise UserError(f"no `ray` command next to {sys.executable} or on PATH: install ubt-ray's dependencies "
                        f"(scripts/bootstrap.sh).")
    return found


def token_source() -> str:
    """Where Ray's token auth will read the token (the order of Ray's token loader): $RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, made now with `ray get-auth-token --generate` if missing."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if custom:
        if not Path(custom).is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={custom} does not exist: write a token there, or unset it to "
                            f"use ~/.ray/auth_token.")
        return custom
    default = Path.home() / ".ray" / "auth_token"
    if not default.is_file():
        made = subprocess.run([ray_executable(), "get-auth-token", "--generate"], capture_output=True, text=True,
                              timeout=120)
        if made.returncode != 0 or not default.is_file():
            raise UserError(f"could not make a Ray auth token with `ray get-auth-token --generate`:\n"
                            f"{(made.stdout + made.stderr)[-2000:]}")
    return str(default)


def _state_path(temp_dir: str) -> Path:
    return Path(temp_dir) / STATE_FILE


def read_state(temp_dir: str = DEFAULT_TEMP_DIR) -> dict | None:
    try:
        return json.loads(_state_path(temp_dir).read_text())
    except (OSError, ValueError):
        return None


def _wait_for_ports(ports: list[int], timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    waiting = list(ports)
    while waiting and time.time() < deadline:
        try:
            socket.create_connection((HOST, waiting[0]), timeout=1).close()
            waiting.pop(0)
        except OSError:
            time.sleep(0.5)
    return not waiting


def start(temp_dir: str = DEFAULT_TEMP_DIR, dashboard_port: int | None = None,
          num_cpus: int | None = None, num_gpus: int | None = None, timeout_s: float = 180) -> dict:
    """Start the head of a local cluster in `temp_dir`; returns its addresses (also written to
    <temp_dir>/ubt-cluster.json, which `address` and `stop` read). `dashboard_port` None: 8265 if free, else any
    free port."""
    temp_dir = os.path.abspath(temp_dir)
    if len(temp_dir) > MAX_TEMP_DIR_CHARS:
        raise UserError(f"--temp-dir {temp_dir} is {len(temp_dir)} characters long: Ray's socket paths under it "
                        f"must fit in 107 bytes; give one of at most {MAX_TEMP_DIR_CHARS}.")
    running = cluster_pids(temp_dir)
    if running:
        raise UserError(f"a Ray cluster is already running in {temp_dir} (processes {', '.join(map(str, running))}"
                        f"): stop it first with `ubt cluster stop --temp-dir {temp_dir}`.")
    if dashboard_port is None:
        dashboard_port = DEFAULT_DASHBOARD_PORT if port_is_free(DEFAULT_DASHBOARD_PORT) else free_port()
    elif not port_is_free(dashboard_port):
        raise UserError(f"--dashboard-port {dashboard_port}: the port is taken on {HOST} (another Ray's "
                        f"dashboard?); give a free one, or leave the flag out for any free port.")
    source = token_source()
    worker_ports, ports = cluster_ports(dashboard_port)
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    cmd = [ray_executable(), "start", "--head", f"--temp-dir={temp_dir}", "--include-dashboard=true",
           f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
           f"--min-worker-port={worker_ports.start}", f"--max-worker-port={worker_ports.stop - 1}",
           ] + [f"--{flag}={port}" for flag, port in ports.items()]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if started.returncode != 0:
        stop(temp_dir, ports["port"])  # whatever it had started
        raise UserError(f"`ray start` failed (exit status {started.returncode}):\n"
                        f"{(started.stdout + started.stderr)[-3000:]}")
    try:  # the node's address as Ray resolved it (`ray start` takes the machine's IP, not the loopback)
        gcs_address = (Path(temp_dir) / "ray_current_cluster").read_text().split()[0]
    except (OSError, IndexError):
        gcs_address = f"{HOST}:{ports['port']}"
    state = {"temp_dir": temp_dir, "gcs_address": gcs_address, "gcs_port": ports["port"],
             "dashboard": f"http://{HOST}:{dashboard_port}", "ports": {"dashboard-port": dashboard_port, **ports},
             "worker_ports": [worker_ports.start, worker_ports.stop - 1], "token": source}
    _state_path(temp_dir).write_text(json.dumps(state, indent=2) + "\n")
    # The job agent comes up a little after `ray start` returns; a submission before it is refused.
    if not _wait_for_ports([dashboard_port, ports["dashboard-agent-listen-port"]], timeout_s):
        raise UserError(f"the Ray dashboard or its job agent did not come up within {timeout_s:.0f} s: see the "
                        f"logs in {temp_dir}/session_latest/logs (`ubt cluster stop --temp-dir {temp_dir}` "
                        f"stops what did start).")
    return state


def _proc_info(pid: int) -> tuple[int, str, bytes, str | None] | None:
    """(parent pid, state letter, command line, working dir) of a process, None if it is gone."""
    base = Path("/proc") / str(pid)
    try:
        stat = (base / "stat").read_text()
        cmdline = (base / "cmdline").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
    try:
        cwd = os.readlink(base / "cwd")
    except OSError:
        cwd = None
    return int(fields[1]), fields[0], cmdline, cwd


def _processes() -> dict[int, tuple[int, str, bytes, str | None]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _proc_info(int(entry.name))
            if info is not None and info[1] != "Z":  # a zombie is gone already; its parent only has to reap it
                out[int(entry.name)] = info
    return out


def _ancestors(procs: dict, pid: int) -> set[int]:
    seen = set()
    while pid in procs and pid not in seen and pid > 1:
        seen.add(pid)
        pid = procs[pid][0]
    return seen


# A process of Ray: gcs_server, raylet, a script or module of the ray package, or one Ray retitled (ray::IDLE,
# ray::DashboardAgent, ray-dashboard-JobHead-0, ...). Not, say, a `tail -f` of a log under the temp dir.
_RAY_PROCESS = re.compile(rb"(?:^|\x00)ray(?:::|-|\.)|/ray/|/(?:gcs_server|raylet)(?:\x00|$)")


def cluster_pids(temp_dir: str = DEFAULT_TEMP_DIR, gcs_port: int | None = None) -> list[int]:
    """The processes of the cluster in `temp_dir`: Ray processes whose command line names the temp dir or the GCS
    port (Ray's client server names only the GCS address), processes working in a job's copy of the working dir
    under <temp_dir>/session_*/runtime_resources (a job's driver), and all their descendants (Ray's agents and
    workers retitle themselves `ray::...` and name neither). Never this process or its ancestors."""
    temp_dir = os.path.abspath(temp_dir)
    if gcs_port is None:
        gcs_port = (read_state(temp_dir) or {}).get("gcs_port")
    dirs = {temp_dir, os.path.realpath(temp_dir)}
    marks = [re.compile(re.escape(d.encode()) + rb"(?=[/\x00\s'\"=,:;]|$)") for d in dirs]
    port_mark = re.compile(rb"[:=]" + str(gcs_port).encode() + rb"(?![0-9])") if gcs_port else None
    job_dirs = [re.compile(re.escape(d) + r"/session_[^/]+/runtime_resources(?:/|$)") for d in dirs]
    procs = _processes()
    roots = set()
    for pid, (_, _, cmdline, cwd) in procs.items():
        if _RAY_PROCESS.search(cmdline) and (any(m.search(cmdline) for m in marks)
                                             or (port_mark is not None and port_mark.search(cmdline))):
            roots.add(pid)
        elif cwd is not None and any(j.match(cwd) for j in job_dirs):
            roots.add(pid)
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found - _ancestors(procs, os.getpid()))


def stop(temp_dir: str = DEFAULT_TEMP_DIR, gcs_port: int | None = None, grace_s: float = 5) -> list[int]:
    """End the processes of the cluster in `temp_dir` (SIGTERM, then SIGKILL for those left after `grace_s`);
    returns their pids. Other Ray clusters on the machine are left alone."""
    temp_dir = os.path.abspath(temp_dir)
    if gcs_port is None:
        gcs_port = (read_state(temp_dir) or {}).get("gcs_port")
    signalled: set[int] = set()
    deadline = time.time() + grace_s
    sig = signal.SIGTERM
    while True:
        pids = cluster_pids(temp_dir, gcs_port)
        if not pids:
            break
        if time.time() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
            if sig == signal.SIGKILL or pid not in signalled:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                signalled.add(pid)
        if sig == signal.SIGKILL and time.time() > deadline + 10:
            break  # unkillable (another user's?) processes: leave them, and say so
        time.sleep(0.3)
    try:
        _state_path(temp_dir).unlink()
    except OSError:
        pass
    return sorted(signalled)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("start", "address", "stop", "status"),
                        help="start the head; print the URL to submit jobs to; stop this cluster's processes (no "
                             "other Ray's); or list them")
    parser.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR,
                        help=f"the cluster's own Ray temp dir, which also identifies it (default "
                             f"{DEFAULT_TEMP_DIR})")
    parser.add_argument("--dashboard-port", type=int,
                        help=f"port of the dashboard, where `ray job submit --address` goes (start; default "
                             f"{DEFAULT_DASHBOARD_PORT}, or a free one when that is taken)")
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of the head (start; default: the machine's)")
    parser.add_argument("--num-gpus", type=int, help="GPUs of the head (start; default: those Ray detects)")


def run(args: argparse.Namespace, cfg=None) -> None:
    """`ubt cluster ACTION` (what goes wrong raises a UserError; `cfg`, from `ubt`, goes unused)."""
    if args.action == "start":
        state = start(args.temp_dir, args.dashboard_port, args.num_cpus, args.num_gpus)
        print(f"ubt cluster: Ray head running in {state['temp_dir']} (GCS {state['gcs_address']}, token auth)\n"
              f"  submit jobs to:  {state['dashboard']}   (ray job submit --address {state['dashboard']} ...; "
              f"`ubt cluster address` prints it)\n"
              f"  clients need RAY_AUTH_MODE=token in their environment; the token is {state['token']}\n"
              f"  stop it with:    ubt cluster stop" +
              ("" if state["temp_dir"] == DEFAULT_TEMP_DIR else f" --temp-dir {state['temp_dir']}"), flush=True)
    elif args.action == "address":
        state = read_state(args.temp_dir)
        if state is None or not cluster_pids(args.temp_dir):
            raise UserError(f"no Ray cluster running in {os.path.abspath(args.temp_dir)}: start one with "
                            f"`ubt cluster start`.")
        print(state["dashboard"])
    elif args.action == "stop":
        pids = stop(args.temp_dir)
        left = cluster_pids(args.temp_dir)
        print(f"ubt cluster: stopped the Ray cluster in {os.path.abspath(args.temp_dir)} "
              f"({len(pids)} processes)" if pids else
              f"ubt cluster: no Ray cluster running in {os.path.abspath(args.temp_dir)}")
        if left:
            raise UserError(f"processes {', '.join(map(str, left))} of the cluster did not end (another user's?).")
    else:
        pids = cluster_pids(args.temp_dir)
        state = read_state(args.temp_dir) if pids else None
        print(json.dumps({"running": bool(pids), "pids": pids, **(state or {})}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ubt_ray.local_cluster", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
        return 0
    except UserError as e:
        print(f"ubt cluster {args.action}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
