"""A real Slurm cluster on this machine: one controller and two fake nodes.

Used by the Slurm tests to run ``sbatch --wait slurm/<script>.sh`` for real (no mock of
sbatch or srun). Debian's Slurm 22.05 (``slurmctld``, ``slurmd``, ``slurm-client``) and
``munge`` start here as plain root background processes, without systemd or cgroups::

    with SlurmCluster.start() as cluster:          # ~3 s once the packages are installed
        job = cluster.sbatch(["--wait", "--nodes", "2", "job.sh"])
        assert job.returncode == 0

Everything lives in one temporary directory: a private munged (its own socket, so a
system munged is neither needed nor disturbed), ``slurm.conf``, ``gres.conf`` with eight
fake GPUs per node (empty files: jobs see ``SLURM_GPUS_ON_NODE`` but no device),
state, spool and log folders. Clients find the cluster through ``SLURM_CONF``
(:attr:`SlurmCluster.env`). The two nodes are two ``slurmd -N nX`` processes on
127.0.0.1 with distinct ports; ``/etc/hosts`` gets ``127.0.0.1 n1`` / ``n2`` lines so
the node names resolve, as they do on a real cluster (``MASTER_ADDR`` is a node name).

Requirements: root (the daemons, and munged started as user ``munge``) and either the packages or
apt. :func:`ensure_installed` installs them idempotently (``apt-get update`` only when
the package lists are missing or stale). :func:`unavailable_reason` says why a cluster
cannot be started here; tests skip with that reason, except under CI (``CI`` set),
where a missing cluster is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged")
NODES = ("n1", "n2")
FAKE_GPUS_PER_NODE = 8
_HOSTS_FILE = Path("/etc/hosts")


def _missing_binaries() -> list[str]:
    paths = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in _BINARIES if shutil.which(b, path=paths) is None]


def unavailable_reason() -> str | None:
    """Why a local cluster cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (daemons run as root; munged as 'munge')"
    if _missing_binaries() and shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(_missing_binaries())}) and apt-get is absent"
    return None


def ensure_installed(timeout: float = 600) -> float:
    """Install the Debian packages when a binary is missing; returns seconds spent.

    ``apt-get install`` is tried from the existing package lists first; only when that
    fails (no lists, or lists that name files the mirror no longer has) does
    ``apt-get update`` run, then the install is retried once.
    """
    if not _missing_binaries():
        return 0.0
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    first = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if first.returncode != 0:
        update = subprocess.run(
            ["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout
        )
        if update.returncode != 0:
            raise RuntimeError(f"apt-get update failed:\n{update.stdout}\n{update.stderr}")
        second = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        if second.returncode != 0:
            raise RuntimeError(
                f"apt-get install {' '.join(PACKAGES)} failed:\n{second.stdout}\n{second.stderr}"
            )
    if _missing_binaries():
        raise RuntimeError(f"installed {PACKAGES} but still missing {_missing_binaries()}")
    return time.monotonic() - t0


def ensure_hosts(names=NODES) -> None:
    """Make the fake node names resolve to 127.0.0.1 (idempotent)."""
    text = _HOSTS_FILE.read_text()
    known = {tok for line in text.splitlines() for tok in line.split("#")[0].split()[1:]}
    missing = [n for n in names if n not in known]
    if missing:
        sep = "" if text.endswith("\n") or not text else "\n"
        with _HOSTS_FILE.open("a") as f:
            f.write(sep + "".join(f"127.0.0.1 {n}\n" for n in missing))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


@dataclass
class JobResult:
    job_id: int
    returncode: int
    seconds: float
    stdout: str
    stderr: str


class SlurmCluster:
    """A running local cluster; build it with :meth:`start`, end it with :meth:`stop`."""

    def __init__(self, root: Path, memory_mb: int, cpus: int):
        self.root = root
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.conf = root / "etc" / "slurm.conf"
        self.log_dir = root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.start_seconds = 0.0
        self.install_seconds = 0.0

    # ------------------------------------------------------------------ set-up
    @classmethod
    def start(cls, timeout: float = 60) -> SlurmCluster:
        """Install if needed, write the configuration, start munged, slurmctld and one
        slurmd per node, and wait until every node is idle."""
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        install_seconds = ensure_installed()
        ensure_hosts()
        t0 = time.monotonic()
        root = Path(tempfile.mkdtemp(prefix="covrl-slurm-"))
        root.chmod(0o755)  # munged (user munge) must reach its socket folder
        total_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
        # Each fake node claims half of the machine's memory (below what slurmd measures).
        cluster = cls(root, memory_mb=max(256, total_mb // (2 * len(NODES))), cpus=os.cpu_count())
        cluster.install_seconds = install_seconds
        try:
            cluster._write_config()
            cluster._start_munged()
            cluster._start_slurm(timeout)
        except BaseException:
            cluster.stop()
            raise
        cluster.start_seconds = time.monotonic() - t0
        return cluster

    def _write_config(self) -> None:
        r = self.root
        for sub in ("etc", "state", "log", "munge", "gpus", *(f"spool/{n}" for n in NODES)):
            (r / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(r / "munge", "munge", "munge")
        (r / "munge").chmod(0o755)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        self.munge_socket = r / "munge" / "munge.socket"
        nodes, gres = [], []
        for name, port in zip(NODES, node_ports, strict=True):
            nodes.append(
                f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                f"RealMemory={self.memory_mb} Gres=gpu:{FAKE_GPUS_PER_NODE} State=UNKNOWN"
            )
            for i in range(FAKE_GPUS_PER_NODE):
                (r / "gpus" / f"{name}-gpu{i}").touch()
            gres.append(
                f"NodeName={name} Name=gpu File={r}/gpus/{name}-gpu[0-{FAKE_GPUS_PER_NODE - 1}]"
            )
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=covrl-local",
                    "SlurmctldHost=localhost",
                    f"SlurmctldPort={ctld_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire also delays a requeued job's restart (default 120 s).
                    f"AuthInfo=socket={self.munge_socket},cred_expire=5",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool/%n",
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd-%n.pid",
                    f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
                    f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "GresTypes=gpu",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MailProg=/bin/true",
                    # Fast turn-around: finished jobs leave the controller after 5 s (0 is
                    # rejected; 300 makes `sbatch --wait` poll slowly), no batching delay, a
                    # scheduling pass every 2 s (a requeued job waits for one).
                    "MinJobAge=5",
                    "SchedulerParameters=batch_sched_delay=0,sched_interval=2",
                    "ReturnToService=2",
                    # SIGTERM -> SIGKILL grace when a job is cancelled or requeued.
                    "KillWait=5",
                    *nodes,
                    f"PartitionName=local Nodes={','.join(NODES)} Default=YES "
                    "MaxTime=INFINITE State=UP OverSubscribe=NO",
                    "",
                ]
            )
        )
        (r / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "w")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        # Own session, output to a file: the daemons never hold the caller's pipes.
        self._procs[name] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def _start_munged(self) -> None:
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                "setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                "/usr/sbin/munged", "--foreground",
                f"--socket={self.munge_socket}", f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed",
            ],
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), 10, "munged socket")

    def _start_slurm(self, timeout: float) -> None:
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self._scontrol("ping").returncode == 0, timeout, "slurmctld ping")
        for node in NODES:
            self._spawn(
                f"slurmd-{node}", ["/usr/sbin/slurmd", "-D", "-N", node, "-f", str(self.conf)]
            )
        self._wait(self._all_idle, timeout, "nodes idle")

    def _all_idle(self) -> bool:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True
        ).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(n) == "idle" for n in NODES)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self._procs.items() if not _alive(p)]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not ready after {timeout:.0f} s"
                raise RuntimeError(f"local Slurm: waiting for {what}: {why}\n{self.logs_tail()}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ use
    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (``SLURM_CONF`` points at this cluster)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        if "/usr/sbin" not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin"
        return env

    def _scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30
        )

    def sbatch(
        self, args: list[str], *, env: dict[str, str] | None = None, cwd=None, timeout=300
    ) -> JobResult:
        """Run ``sbatch --parsable <args>``; with ``--wait`` in args, returns when the job ends
        with the job's exit code."""
        t0 = time.monotonic()
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        first = proc.stdout.strip().splitlines()[:1]
        job_id = int(first[0].split(";")[0]) if first and first[0].split(";")[0].isdigit() else -1
        return JobResult(job_id, proc.returncode, time.monotonic() - t0, proc.stdout, proc.stderr)

    def submit(self, args: list[str], *, env=None, cwd=None) -> tuple[int, subprocess.Popen]:
        """Start ``sbatch --parsable --wait <args>`` in the background; returns the job id
        (read from sbatch's first output line) and the sbatch process."""
        proc = subprocess.Popen(
            ["sbatch", "--parsable", "--wait", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline().strip()
        if not line.split(";")[0].isdigit():
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"sbatch did not print a job id: {line}{out}\n{err}")
        return int(line.split(";")[0]), proc

    def job_state(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, NodeList, ...)."""
        out = self._scontrol("show", "job", "-o", str(job_id)).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self._scontrol(*args)

    def logs_tail(self, lines: int = 20) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # ------------------------------------------------------------------ tear-down
    def stop(self, timeout: float = 15) -> None:
        """Cancel jobs, shut the daemons down and remove the folder; nothing keeps running."""
        if "slurmctld" in self._procs and _alive(self._procs["slurmctld"]):
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
            self._scontrol("shutdown")
        deadline = time.monotonic() + timeout
        for name, proc in reversed(list(self._procs.items())):
            if name == "munged" and _alive(proc):
                proc.terminate()
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._kill_stepds()
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_stepds(self) -> None:
        """slurmstepd detaches from slurmd; kill any that still serve this cluster."""
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
                environ = (proc_dir / "environ").read_bytes()
            except OSError:
                continue
            if (
                cmdline
                and cmdline[0].endswith(b"slurmstepd")
                and str(self.root).encode() in environ
            ):
                try:
                    os.kill(int(proc_dir.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_or_skip() -> SlurmCluster:
    """Start a cluster for a test, or skip with the reason; under CI (``CI`` set) a
    cluster that cannot start fails the test instead."""
    import pytest

    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"local Slurm cluster required under CI: {reason}")
        pytest.skip(reason)
    return SlurmCluster.start()


def cluster_fixture():
    """Module-scoped pytest fixture body: one cluster per test module, stopped after it
    (start ~0.5 s, stop ~1-2 s); prints the measured times with ``pytest -s``."""
    c = start_or_skip()
    print(
        f"\nlocal Slurm: installed in {c.install_seconds:.1f} s, started in {c.start_seconds:.2f} s"
    )
    yield c
    t0 = time.monotonic()
    c.stop()
    print(f"local Slurm: stopped in {time.monotonic() - t0:.2f} s")
