"""The Streamlit script (`streamlit run` executes it on every interaction).

It reads the session named by $TRAITSAE_EXPLORE_SESSION (written by explore.py), keeps one
ExplorerData per session for the whole server process (st.cache_resource), and draws the page
chosen in the sidebar. A user error is shown as a message on the page; so is any other
failure (its traceback goes to the terminal), never a Python traceback in the browser.
"""

from __future__ import annotations

import logging
import os

import streamlit as st

from traitsae.errors import TraitsaeError
from traitsae.explore.session import SESSION_ENV

log = logging.getLogger("traitsae.explore")


@st.cache_resource(show_spinner="Loading sparse codes and indexes ...")
def load_data(session_path: str):
    from traitsae.explore.data import PRELOADED, ExplorerData
    from traitsae.explore.session import Session

    return PRELOADED.pop(session_path, None) or ExplorerData(Session.load(session_path))


def pages() -> dict:
    from traitsae.explore.views import compare, image, latents, search, steer

    return {
        "Latents": latents,
        "Image": image,
        "Search by example": search,
        "Compare groups": compare,
        "Steer": steer,
    }


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
    views = pages()
    requested = st.query_params.get("page", "Latents")
    names = list(views)
    page = st.sidebar.radio(
        "Page", names, index=names.index(requested) if requested in names else 0, key="page"
    )
    st.query_params["page"] = page
    s = data.session
    st.sidebar.caption(
        f"{data.d_sae} latents · {data.n_images} images · {data.n_patches} patches each\n\n"
        f"SAE: {s.sae}\n\nstore: {s.store}"
    )
    views[page].render(data)


try:
    main()
except TraitsaeError as err:
    st.error(str(err))
except Exception as err:  # the page shows what failed; the terminal gets the traceback
    log.exception("explorer page failed")
    st.error(f"{type(err).__name__}: {err}")
