"""A prepared explorer session on the planted store (discovery_helpers), for the explorer tests."""

from __future__ import annotations

from pathlib import Path

from discovery_helpers import compose_cfg, planted_sae, planted_store

APP = Path(__file__).resolve().parents[1] / "src" / "traitsae" / "explore" / "app.py"
COLOUR_BAR = "traitsae-colour-bar"  # draw.COLOUR_BAR_CLASS: how a test finds a colour scale


def explore_overrides(root: Path, *extra: str) -> list[str]:
    return [
        f"run={root / 'run'}",
        f"paths.activations_dir={root / 'activations'}",
        f"explore.image_root={root / 'images'}",
        "explore.resize_mode=stretch",
        "explore.port=1",  # never served by these tests: any valid port number
        "dataset.contrast.group_a={species: 001.Alpha}",
        "dataset.contrast.group_b={species: 002.Beta}",
        *extra,
    ]


def planted_session(root: Path, *extra: str):
    """Store + SAE under `root`, then explore.py's prepare(): codes made in root/explore/cache."""
    from traitsae.explore.session import prepare

    store = planted_store(root, n_per_group=12)
    planted_sae(root / "run", store)
    cfg = compose_cfg("explore", explore_overrides(root, *extra), root / "explore")
    return cfg, prepare_without_port(cfg, prepare), store


def prepare_without_port(cfg, prepare):
    """prepare() checks that explore.port is free; port 1 needs root, so skip that one check."""
    from unittest import mock

    with mock.patch("traitsae.explore.session.check_port_free"):
        return prepare(cfg)


def select_on_chart(at, key: str, selection: dict):
    """Rerun `at` as the browser does after a selection on the Vega-Lite chart `key`: the
    chart's widget value becomes {"selection": selection} (point selections: a list of the
    picked points' fields; interval selections: {field: [lo, hi]}). AppTest has no chart
    element to drive (charts are UnknownElements), so this sends the widget state itself
    through AppTest's private _tree / _run."""
    import json

    chart = next(e for e in at.get("vega_lite_chart") if e.key == key)
    states = at._tree.get_widget_states()
    state = states.widgets.add()
    state.id = chart.proto.id
    state.string_value = json.dumps({"selection": selection})
    return at._run(states)


class ServedSession:
    """One browser session of a served explorer over Streamlit's websocket (`/_stcore/stream`),
    without a browser: each `run` is one script run, as the page starts it or a widget reruns it.
    `widgets` maps widget ids to JSON string values sent with the run (e.g. a chart selection);
    returns the new elements of the page (ForwardMsg protos), in order."""

    def __init__(self, port: int, timeout: float = 300) -> None:
        from websockets.sync.client import connect

        url = f"ws://127.0.0.1:{port}/_stcore/stream"
        self.ws = connect(url, subprotocols=["streamlit"], max_size=None, open_timeout=timeout)
        self.timeout = timeout

    def run(self, widgets: dict[str, str] | None = None) -> list:
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = BackMsg()
        msg.rerun_script.query_string = ""
        for widget_id, value in (widgets or {}).items():
            state = msg.rerun_script.widget_states.widgets.add()
            state.id, state.string_value = widget_id, value
        self.ws.send(msg.SerializeToString())
        elements = []
        while True:
            fwd = ForwardMsg()
            fwd.ParseFromString(self.ws.recv(timeout=self.timeout))
            if fwd.WhichOneof("type") == "script_finished":
                return elements
            if fwd.WhichOneof("type") == "delta" and fwd.delta.HasField("new_element"):
                elements.append(fwd.delta.new_element)

    def close(self) -> None:
        self.ws.close()


def element_texts(elements: list, kind: str) -> list[str]:
    """Bodies of the page's elements of one kind (heading, markdown, alert, ...)."""
    return [getattr(e, kind).body for e in elements if e.WhichOneof("type") == kind]
