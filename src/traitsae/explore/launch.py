"""explore.py's one function: check and prepare everything, then serve the Streamlit app.

Streamlit runs as a child process (`python -m traitsae.explore.server`: it loads the data, then
runs Streamlit's own `streamlit run app.py`), always headless: the browser is opened here once the
server answers its health check, so Streamlit never prompts in the terminal, and every failure
before that is a clear `error:` line rather than a page.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path

from omegaconf import DictConfig

from traitsae.errors import TraitsaeError
from traitsae.explore.data import ExplorerData
from traitsae.explore.session import SESSION_ENV, Session, prepare
from traitsae.explore.views.latents import FIRST_LATENT
from traitsae.paths import hydra_output_dir

STARTUP_TIMEOUT_S = 600  # preloading 1 M patches of codes on a loaded machine


def explore(cfg: DictConfig) -> None:
    session = prepare(cfg)
    path = session.save(hydra_output_dir() / "session.json")
    warm_cache(session)
    serve(path, str(cfg.explore.address), int(cfg.explore.port), bool(cfg.explore.browser))


def warm_cache(session: Session) -> None:
    """Build the cached image indexes now (terminal), and frame the pictures of the first page
    (FIRST_LATENT's gallery), so the app's first page opens fast."""

    if not (Path(session.cache_dir) / "index" / "complete").is_file():
        print("indexing the sparse codes (once per SAE and store) ...")
    data = ExplorerData(session)
    for row in data.top_images(FIRST_LATENT, session.top_k)[0]:
        data.image(int(row))


def streamlit_command(address: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "traitsae.explore.server",
        f"--server.address={address}",
        f"--server.port={port}",
        "--server.headless=true",
        "--server.fileWatcherType=none",
        "--browser.gatherUsageStats=false",
        f"--browser.serverAddress={address}",
        "--client.showErrorDetails=none",
        "--client.toolbarMode=viewer",
        "--global.developmentMode=false",
    ]


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # besides SIGINT (Ctrl-C: KeyboardInterrupt)


def die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM it when explore.py dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM / SIGHUP end explore.py the way Ctrl-C does, so its server child is stopped."""
    raise KeyboardInterrupt


def start_server(session_path: Path, address: str, port: int) -> subprocess.Popen:
    """The Streamlit child process, returned once it answers (or an error if it died)."""
    env = {**os.environ, SESSION_ENV: str(session_path)}
    proc = subprocess.Popen(streamlit_command(address, port), env=env, preexec_fn=die_with_parent)
    try:
        wait_until_serving(proc, address, port)
    except BaseException:  # an error, Ctrl-C or SIGTERM while it starts: no child left behind
        stop(proc)
        raise
    return proc


def wait_until_serving(proc: subprocess.Popen, address: str, port: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TraitsaeError(
                f"the Streamlit server exited with status {proc.returncode} before serving on "
                f"{address}:{port}; its messages are above."
            )
        try:
            with urllib.request.urlopen(f"http://{address}:{port}/_stcore/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TraitsaeError(f"the Streamlit server did not answer on {address}:{port} in time.")


def serve(session_path: Path, address: str, port: int, browser: bool) -> None:
    """Serve until the server stops, or Ctrl-C / SIGTERM / SIGHUP stop both processes."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)
    proc = None
    try:
        proc = start_server(session_path, address, port)
        url = f"http://{address}:{port}/"
        print(f"traitsae explorer at {url}  (Ctrl-C stops it)", flush=True)
        if browser:
            webbrowser.open(url)
        status = proc.wait()
    except KeyboardInterrupt:
        return
    finally:
        if proc is not None:
            stop(proc)
    if status != 0:
        raise TraitsaeError(f"the Streamlit server stopped with exit status {status}.")


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate the server child (Streamlit shuts down on SIGTERM); kill it if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
