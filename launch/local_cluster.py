#!/usr/bin/env python3
r"""Rehearse a pod on one machine: N processes of one command, joined like the hosts of a cluster.

    python launch/local_cluster.py --num_processes=2 --devices_per_process=2 -- \
        python -m hyena_jax.main --distributed --config=configs/default.py --workdir=runs/pod \
        --config.mesh.data=2 --config.mesh.fsdp=2

Every process gets the environment a cluster launcher would give a host (read by
`hyena_jax.distributed.initialize`, i.e. `--distributed`):
  HYENA_JAX_COORDINATOR=localhost:PORT (a free port unless --port), HYENA_JAX_NUM_PROCESSES=N,
  HYENA_JAX_PROCESS_ID=i, plus JAX_PLATFORMS=cpu and XLA_FLAGS with
  --xla_force_host_platform_device_count=K (K fake CPU devices per process).
Output lines are prefixed [p0], [p1], ... (gloo's connection reports are dropped). SIGTERM or Ctrl-C to the launcher is forwarded to every
process (a training run then saves one checkpoint and exits 143 or 130). If a process fails
(a non-zero exit, or killed; after a forwarded signal, any other exit than that signal's), the
others are sent SIGTERM and, --grace_s seconds later, SIGKILL: they would otherwise wait forever
in a collective with the missing process. Exit status: 0 when
all processes succeed, else the first failure's (128 + signal for a killed process), or, after a
forwarded signal, the status of the processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The variables `--distributed` reads (no jax import: the launcher starts at once).
from hyena_jax.training.distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID  # noqa: E402


def free_port() -> int:
  """A TCP port nobody listens on now (bind to port 0 on localhost and let the OS choose)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict, index: int, num_processes: int, devices: int, port: int,
                platform: str) -> dict:
  env = dict(base)
  env.update({COORDINATOR: f"localhost:{port}", NUM_PROCESSES: str(num_processes),
              PROCESS_ID: str(index)})
  if platform:
    env["JAX_PLATFORMS"] = platform
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env.setdefault("PYTHONUNBUFFERED", "1")  # lines appear as they are printed
  return env


# gloo's connection report, one line per process per collective group (a dozen per run, two
# processes' lines sometimes interleaved mid-line): noise on a screen that shows progress.
_GLOO_CHATTER = b"[Gloo] Rank "


def _pump(index: int, stream, lock: threading.Lock) -> None:
  prefix = f"[p{index}] ".encode()
  for line in iter(stream.readline, b""):
    if line.startswith(_GLOO_CHATTER):
      continue
    with lock:
      sys.stdout.buffer.write(prefix + line)
      sys.stdout.buffer.flush()
  stream.close()


def _status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode  # killed by signal n: 128 + n


class Cluster:
  """The N child processes and the rules for stopping them."""

  def __init__(self, command: list[str], num_processes: int, devices: int, port: int,
               platform: str, grace_s: float):
    self.grace_s = grace_s
    self.lock = threading.Lock()
    self.procs: list[subprocess.Popen] = []
    self.threads: list[threading.Thread] = []
    self.forwarded: int | None = None   # signal forwarded from the launcher
    self.first_failure: int | None = None
    self.kill_at: float | None = None
    self.spec = (command, num_processes, devices, port, platform)
    self.starting = True

  def start(self) -> None:
    command, num_processes, devices, port, platform = self.spec
    port = port or free_port()
    for i in range(num_processes):
      # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards it
      # once (else every child would see it twice).
      proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=process_env(os.environ, i, num_processes, devices, port,
                                              platform), start_new_session=True)
      self.procs.append(proc)
      thread = threading.Thread(target=_pump, args=(i, proc.stdout, self.lock), daemon=True)
      thread.start()
      self.threads.append(thread)
    self.say(f"started {num_processes} process(es) x {devices} device(s), pids "
             f"{[p.pid for p in self.procs]}, coordinator localhost:{port}: {' '.join(command)}")

  def say(self, message: str) -> None:
    with self.lock:
      sys.stdout.write(f"[launcher] {message}\n")
      sys.stdout.flush()

  def signal_all(self, signum: int, group: bool = False) -> None:
    """Signals every running process; with `group`, its whole process group (each process is
    the leader of its own), so that its helpers (e.g. Grain workers) go too."""
    for proc in self.procs:
      if proc.poll() is None or group:
        try:
          os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        except (ProcessLookupError, PermissionError):
          pass

  def forward(self, signum: int, frame=None) -> None:
    self.say(f"{signal.Signals(signum).name}: forwarding to every process")
    self.forwarded = signum
    if not self.starting:  # else sent once all have started (see main)
      self.signal_all(signum)

  def wait(self) -> int:
    while True:
      codes = [p.poll() for p in self.procs]
      for i, code in enumerate(codes):
        if code not in (None, 0) and self.first_failure is None:
          self.first_failure = i
          if self.forwarded is not None and _status(code) == 128 + self.forwarded:
            continue  # stopped by the forwarded signal, as asked: the others are saving too
          if self.forwarded is None:
            self.say(f"process {i} exited with status {_status(code)}; stopping the others "
                     f"(SIGTERM, then SIGKILL after {self.grace_s:g} s)")
            self.signal_all(signal.SIGTERM)
          self.kill_at = time.monotonic() + self.grace_s
      if all(c is not None for c in codes):
        break
      if self.kill_at is not None and time.monotonic() > self.kill_at:
        self.say("processes still running after the grace period: SIGKILL")
        self.signal_all(signal.SIGKILL, group=True)
        self.kill_at = None
      time.sleep(0.05)
    for thread in self.threads:
      thread.join(timeout=5)
    codes = [p.returncode for p in self.procs]
    status = 0 if self.first_failure is None else _status(codes[self.first_failure])
    self.say(f"exit statuses {[_status(c) for c in codes]}; exiting with {status}")
    return status


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s [--num_processes N] [--devices_per_process K] -- COMMAND ...")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2,
                      help="fake CPU devices per process (XLA_FLAGS)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 = a free one")
  parser.add_argument("--platform", default="cpu",
                      help="JAX_PLATFORMS for the processes; '' keeps the environment's")
  parser.add_argument("--grace_s", type=float, default=30.0,
                      help="after a process fails, seconds the others get to exit before SIGKILL")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- python -m hyena_jax.main "
                 "--distributed ...")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  cluster = Cluster(command, args.num_processes, args.devices_per_process, args.port,
                    args.platform, args.grace_s)
  # Handlers first: a signal while the processes start must reach them, not orphan them.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, cluster.forward)
  cluster.start()
  cluster.starting = False
  if cluster.forwarded is not None:  # arrived while starting
    cluster.signal_all(cluster.forwarded)
  return cluster.wait()


if __name__ == "__main__":
  sys.exit(main())
