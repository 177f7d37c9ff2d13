"""What one explorer launch reads, resolved and checked once by `explore.py` before the app starts.

A `Session` holds absolute paths only (SAE, store, sparse codes, cache) plus display options; it
is written as `session.json` into the app's own output dir and read by the Streamlit script. The
explorer never writes into a store or a train run dir: codes made on first use and the derived
indexes go under `explore.cache_dir` (inside the app's hydra.run.dir by default).
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
from omegaconf import DictConfig, OmegaConf

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.sources import eval_store, sae_source

if TYPE_CHECKING:  # a type only: importing it loads torch, which the launch does without
    from traitsae.sae.export import RawSpaceSAE

RESIZE_MODES = ("backbone", "center_crop", "stretch")
SESSION_ENV = "TRAITSAE_EXPLORE_SESSION"  # how the Streamlit script finds session.json


@dataclass(frozen=True)
class Session:
    sae: str  # run dir or sae.json
    store: str
    codes: str
    cache_dir: str
    dataset: str
    split: str
    top_k: int = 16
    device: str = "cpu"
    image_root: str | None = None
    image_size: int | None = None
    resize_mode: str = "backbone"
    draw_images: bool = True
    cub_traits: str | None = None  # a cub_traits.json of this SAE, when one exists
    discovery: str | None = None  # a discovery output dir of this SAE, when one exists
    contrast: dict[str, Any] = field(default_factory=dict)  # the dataset's default groups
    notes: str | None = None  # the user's notes on latents (JSON), beside the run by default
    placement: dict[str, Any] = field(default_factory=dict)  # a foreign checkpoint's load_sae
    # keywords from the command line (sae_format, backbone, layer, tokens)
    patches: str = "all"  # image scores pool over: all | foreground (explore.patches, resolved)
    launch: dict[str, Any] = field(default_factory=dict)  # the launch's config (no hydra,
    # no explore): what the Steer page turns into eval=steer's (steering.steer_config)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Session:
        path = Path(path)
        if not path.is_file():
            raise TraitsaeError(
                f"explorer session file {path} does not exist; start the explorer with "
                "python explore.py run=<run dir> dataset=<name> split=<split>."
            )
        return cls(**json.loads(path.read_text()))


def check_options(ex: DictConfig) -> None:
    """Reject bad `explore.*` values before anything is loaded."""
    port = ex.port
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise TraitsaeError(f"explore.port must be an integer in 1..65535, got {port!r}.")
    if not isinstance(ex.top_k, int) or ex.top_k < 1:
        raise TraitsaeError(f"explore.top_k must be a positive integer, got {ex.top_k!r}.")
    if ex.resize_mode not in RESIZE_MODES:
        raise TraitsaeError(
            f"explore.resize_mode must be one of {RESIZE_MODES}, got {ex.resize_mode!r}."
        )


def check_port_free(address: str, port: int) -> None:
    """Fail before any work when the port is taken (Streamlit would pick another silently)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError as err:
            raise TraitsaeError(
                f"port {port} on {address} is in use ({err.strerror}): another explorer or "
                f"program is serving there. Stop it, or pass a free port, e.g. "
                f"explore.port={free_port(address)}."
            ) from None


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def check_backbone(cfg: DictConfig, sae: SaeRecord | RawSpaceSAE) -> None:
    """`backbone=<name>` on the command line must name the SAE's backbone (docs/ARCHITECTURE.md)."""
    chosen = (cfg.get("backbone") or {}).get("name")
    trained = sae.backbone
    if chosen and chosen != trained:
        raise TraitsaeError(
            f"backbone={chosen} was given but the SAE ({sae.meta.get('store', 'sae.json')}) was "
            f"trained on {trained!r} activations; drop backbone= or pass backbone={trained}, "
            "or explore an SAE trained on that backbone."
        )


def cache_key(sae_source: str, store: Path) -> str:
    """Digest of the SAE's files and the store (path, size, mtime): new inputs, new cache."""
    source = Path(sae_source)
    if source.is_dir() and (source / "sae.safetensors").is_file():
        weights = [source / "sae.safetensors"]  # a train run dir: its export, not its logs
    elif source.is_dir():
        weights = sorted(p for p in source.iterdir() if p.is_file())  # another library's files
    elif source.suffix == ".json":
        weights = [source.with_suffix(".safetensors")]
    else:
        weights = [source]
    parts = []
    for path in [*weights, store]:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def find_eval_output(cfg: DictConfig, name: str, explicit: str | None) -> str | None:
    """`explicit`, else an evaluate.py output dir holding `name` whose config names this SAE.

    Looked for in the run dir's own subfolders and its siblings (the demo's layout:
    logs/demo/train next to logs/demo/cub_traits); the first match in name order wins.
    """
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise TraitsaeError(f"{path} (explore.{name.split('.')[0]}) does not exist.")
        return str(path.resolve())
    source = Path(cfg.get("sae_path") or cfg.get("run"))
    run_dir = (source.parent if source.is_file() else source).resolve()
    for candidate in sorted([*run_dir.glob(f"*/{name}"), *run_dir.parent.glob(f"*/{name}")]):
        hydra_cfg = candidate.parent / ".hydra" / "config.yaml"
        if not hydra_cfg.is_file():
            continue
        evaluated = OmegaConf.load(hydra_cfg)
        target = evaluated.get("sae_path") or evaluated.get("run")
        if target and Path(target).resolve() in (run_dir, run_dir / "sae.json"):
            return str(candidate.resolve())
    return None


@dataclass(frozen=True)
class SaeRecord:
    """An exported SAE's sae.json without its weights: what prepare() needs to find and check
    the store and the codes. Reading it needs no torch (seconds of imports, most of a launch
    once the codes exist); the weights load where they are used (making codes, the app)."""

    meta: dict[str, Any]

    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def backbone(self) -> str:
        return str(self.meta["backbone"])

    @property
    def tokens(self) -> str:
        return str(self.meta.get("tokens") or "patches")


def sae_record(cfg: DictConfig) -> Any:
    """The SAE's SaeRecord; anything unusual (no sae.json, bad JSON, keys missing) is left to
    load_sae, whose messages say what is wrong."""
    source = Path(sae_source(cfg))
    if source.is_dir():
        source = source / "sae.json"
    elif source.suffix == ".safetensors":
        source = source.with_name("sae.json")
    try:
        meta = json.loads(source.read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not {"backbone", "d_model", "d_sae", "layer"} <= meta.keys():
        from traitsae.evaluation.core.sae import resolve_sae  # lazy: torch (launch torch-free)

        return resolve_sae(cfg)
    return SaeRecord(meta)


def prepare(cfg: DictConfig) -> Session:
    """Validate everything the app needs; make the sparse codes when missing (progress bar)."""
    ex = cfg.explore
    check_options(ex)
    check_port_free(str(ex.address), int(ex.port))
    sae = sae_record(cfg)
    check_backbone(cfg, sae)
    split = str(cfg.split)
    with eval_store(cfg, sae, split) as store:
        store_path = store.path.resolve()
        cache = (
            Path(ex.cache_dir).resolve()
            / f"{cfg.dataset.name}_{split}_{cache_key(sae_source(cfg), store_path)}"
        )
        codes = Path(ex.codes).resolve() if ex.codes else cache / "codes.h5"
        if ex.codes and not codes.is_file():
            raise TraitsaeError(
                f"explore.codes={ex.codes} does not exist; write it with python evaluate.py "
                "eval=encode run=<run dir>, or drop explore.codes to have it made here."
            )
        if not codes.is_file():
            # lazy: torch, needed only to make the codes (a later launch stays torch-free)
            from traitsae.evaluation.core.codes import write_sparse_codes
            from traitsae.evaluation.core.sae import resolve_sae

            print(f"no sparse codes for this SAE and store yet: encoding {store_path} once ...")
            write_sparse_codes(
                store,
                resolve_sae(cfg).eval().to(cfg.device),
                codes,
                sae_source=sae_source(cfg),
                batch_patches=int(ex.batch_patches),
                device=str(cfg.device),
            )
        check_codes_match(codes, store, sae)
        patches = pooled_patches(store, str(ex.get("patches", "all")), sae)
    discovery = find_eval_output(cfg, "discovery.json", ex.get("discovery"))
    contrast = cfg.dataset.get("contrast") or {}
    return Session(
        sae=str(Path(sae_source(cfg)).resolve()),
        store=str(store_path),
        codes=str(codes),
        cache_dir=str(cache),
        dataset=str(cfg.dataset.name),
        split=split,
        top_k=int(ex.top_k),
        device=str(cfg.device),
        image_root=str(ex.image_root or cfg.dataset.get("root") or "") or None,
        image_size=ex.get("image_size"),
        resize_mode=str(ex.resize_mode),
        draw_images=bool(ex.draw_images),
        cub_traits=find_eval_output(cfg, "cub_traits.json", ex.get("cub_traits")),
        discovery=str(Path(discovery).parent) if discovery else None,
        contrast=OmegaConf.to_container(contrast, resolve=True) if contrast else {},
        notes=str(notes_path(cfg)),
        placement=placement(cfg),
        patches=patches,
        launch=launch_config(cfg),
    )


def launch_config(cfg: DictConfig) -> dict[str, Any]:
    """The launch's configuration, resolved, without Hydra's and the explorer's own keys."""
    kept = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "explore")])
    return OmegaConf.to_container(kept, resolve=True)


def pooled_patches(store: Store, patches: str, sae: Any) -> str:
    """explore.patches resolved like eval.patches (auto: as the SAE was trained), checked
    against the store's foreground flags: `all` or `foreground`."""
    trained_on_foreground = bool((getattr(sae, "meta", None) or {}).get("foreground"))
    if patches == "all" or (patches == "auto" and not trained_on_foreground):
        return "all"  # decided without the module below: it loads torch (launch stays torch-free)
    from traitsae.evaluation.core.foreground import resolve_patches, select_patches

    if resolve_patches(patches, sae) == "all":
        return "all"
    select_patches(store, "foreground", sae)  # no flags, or no foreground patch: its errors
    return "foreground"


def placement(cfg: DictConfig) -> dict[str, Any]:
    """load_sae's say-so for a checkpoint that does not record where it belongs (sae_format=,
    backbone=, data.layer=, data.tokens=), as evaluate.py passes them; only those given."""
    data = cfg.get("data") or {}
    given = {
        "sae_format": cfg.get("sae_format"),
        "backbone": (cfg.get("backbone") or {}).get("name"),
        "layer": data.get("layer"),
        "tokens": data.get("tokens"),
    }
    return {k: v for k, v in given.items() if v is not None}


def notes_path(cfg: DictConfig) -> Path:
    """explore.notes, else `explore_notes.json` in the folder holding the SAE's sae.json."""
    if cfg.explore.get("notes"):
        return Path(cfg.explore.notes).resolve()
    source = Path(sae_source(cfg)).resolve()
    return (source.parent if source.is_file() else source) / "explore_notes.json"


def check_codes_match(codes: Path, store: Store, sae: SaeRecord | RawSpaceSAE) -> None:
    """A codes file must come from this SAE (d_sae) and this store (patches, images)."""
    with h5py.File(codes, "r") as f:
        if not f.attrs.get("complete", False) or "codes/indptr" not in f:
            raise TraitsaeError(
                f"{codes} is not a complete sparse-code file; delete it (or drop explore.codes) "
                "to have it made again."
            )
        found = {
            "d_sae": int(f.attrs["d_sae"]),
            "n_patches": int(f.attrs["n_patches"]),
            "n_images": len(f["images/first_row"]),
        }
    wanted = {"d_sae": int(sae.d_sae), "n_patches": store.n_patches, "n_images": store.n_images}
    if found != wanted:
        raise TraitsaeError(
            f"sparse codes {codes} do not belong to this SAE and store: they have {found}, the "
            f"SAE and store {store.path} have {wanted}. Pass the codes of this run, or drop "
            "explore.codes to have them made."
        )
