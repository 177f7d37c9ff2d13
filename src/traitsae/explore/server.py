"""The Streamlit server process: load the session's data first, then serve app.py.

Reading the codes and building the latent table take a second (several on a loaded machine).
Done here, before explore.py announces the URL, the first page view only draws the page: the
Streamlit script runs in this same process and picks the loaded data up from
`data.PRELOADED`. Only the Latents page's libraries are loaded here, no torch: app.py loads the
rest in the background once the first page is up. Run as
`python -m traitsae.explore.server <streamlit flags>` with $TRAITSAE_EXPLORE_SESSION set
(launch.py does both).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from streamlit.web import cli

from traitsae.errors import TraitsaeError
from traitsae.explore import data
from traitsae.explore.session import SESSION_ENV, Session
from traitsae.explore.views import latents

APP = Path(__file__).with_name("app.py")


def preload(session_path: str) -> None:
    """ExplorerData and the Latents page (pandas, the table, colour maps, its pictures).

    A failure is printed and left to the page: the app tries again and shows the message there.
    """

    try:
        loaded = data.ExplorerData(Session.load(session_path))
        latents.warm(loaded)
    except TraitsaeError as err:
        print(f"error: {err}", file=sys.stderr)
        return
    data.PRELOADED[session_path] = loaded


def main(streamlit_flags: list[str]) -> None:
    preload(os.environ[SESSION_ENV])
    sys.argv = ["streamlit", "run", str(APP), *streamlit_flags]
    cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
