"""The Streamlit script (`streamlit run` executes it on every interaction).

It reads the session named by $TRAITSAE_EXPLORE_SESSION (written by explore.py), keeps one
ExplorerData per session for the whole server process (st.cache_resource), and draws the page
chosen in the sidebar. Only that page's module is imported: the Latents page needs no torch, so
the first view does not wait for it; the other pages' libraries and the SAE are loaded by a
background thread started after the first view. A user error is shown as a message on the page;
so is any other failure (its traceback goes to the terminal), never a Python traceback in the
browser.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from types import ModuleType
from typing import Any

import streamlit as st

from traitsae.errors import TraitsaeError
from traitsae.explore.data import PRELOADED, ExplorerData
from traitsae.explore.session import SESSION_ENV, Session

log = logging.getLogger("traitsae.explore")


@st.cache_resource(show_spinner="Loading sparse codes and indexes ...")
def load_data(session_path: str):
    return PRELOADED.pop(session_path, None) or ExplorerData(Session.load(session_path))


# The browser fetches the first page's pictures after its script has run: let it have the
# interpreter (the GIL) before the warm-up's imports take it.
WARM_UP_DELAY_S = 2.0
# Sidebar name -> module of traitsae.explore.views drawing it.
PAGES = {
    "Latents": "latents",
    "Image": "image",
    "Search by example": "search",
    "Compare groups": "compare",
    "Steer": "steer",
    "Guess the image": "guess",
}


def page_module(name: str) -> ModuleType:
    return importlib.import_module(f"traitsae.explore.views.{PAGES[name]}")


def warm_up(data: Any) -> None:
    """Import every page, load the SAE and the image framing (torch), so that the first visit of
    a page, or of a picture not framed yet, is quick."""
    time.sleep(WARM_UP_DELAY_S)
    try:
        for name in PAGES:
            page_module(name)
        if data.session.draw_images:
            data.image_source()
        if data.n_images:
            data.reconstruction_error(int(data.rows_V[0]))
    except Exception:  # the page that needs it shows the failure when it is opened
        log.exception("explorer warm-up failed")


@st.cache_resource(show_spinner=False)
def start_warm_up(session_path: str) -> threading.Thread:
    """warm_up in a background thread, once per server process and session."""
    thread = threading.Thread(
        target=warm_up, args=(load_data(session_path),), name="explore-warm-up", daemon=True
    )
    thread.start()
    return thread


def main() -> None:
    st.set_page_config(page_title="traitsae explorer", layout="wide")
    session_path = os.environ.get(SESSION_ENV)
    if not session_path:
        st.error(
            f"no explorer session: ${SESSION_ENV} is not set. Start the app with "
            "python explore.py run=<run dir> dataset=<name> split=<split>."
        )
        return
    data = load_data(session_path)
    requested = st.query_params.get("page", "Latents")
    names = list(PAGES)
    page = st.sidebar.radio(
        "Page", names, index=names.index(requested) if requested in names else 0, key="page"
    )
    st.query_params["page"] = page
    s = data.session
    st.sidebar.caption(
        f"{data.d_sae} latents · {data.n_images} images · {data.n_patches} patches each · "
        f"image scores over {'foreground' if s.patches == 'foreground' else 'all'} patches\n\n"
        f"SAE: {s.sae}\n\nstore: {s.store}"
    )
    if page != "Latents":
        # Two threads importing torchvision at once deadlock inside its circular imports: a
        # page that needs torch waits for the warm-up's imports to finish first.
        start_warm_up(session_path).join()
    page_module(page).render(data)
    start_warm_up(session_path)


try:
    main()
except TraitsaeError as err:
    st.error(str(err))
except Exception as err:  # the page shows what failed; the terminal gets the traceback
    log.exception("explorer page failed")
    st.error(f"{type(err).__name__}: {err}")
