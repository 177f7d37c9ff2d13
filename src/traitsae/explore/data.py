"""The explorer's data layer: sparse codes held in memory and the indexes every page queries
(index.py: image-major and latent-major views of the image scores, cached on disk).

Image positions `v` count valid images in store order (the codes' row order); `rows_V` maps
them to store rows, which is what the public methods take and return.

Nothing here imports Streamlit: pages call these methods and the app caches the object. Nor
torch at import: the Latents page needs only numpy, so the app opens before torch is loaded; the
SAE (torch) loads on first use, normally in the app's background warm-up.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.labels import caption_column, image_labels, top_image_summary
from traitsae.explore.index import load_or_build_index
from traitsae.explore.linked import linked_columns
from traitsae.explore.session import Session

if TYPE_CHECKING:  # a type only: importing it loads torch, which the launch does without
    from traitsae.sae.export import RawSpaceSAE

CO_FIRING_IMAGES = 256  # images of a latent whose other latents are counted (co-firing)
# Loaded by the server process before Streamlit starts (server.py), keyed by session path.
PRELOADED: dict[str, ExplorerData] = {}


class Codes:
    """The CSR arrays of codes.h5, read into memory once."""

    def __init__(self, path: Path) -> None:
        with h5py.File(path, "r") as f:
            self.d_sae = int(f.attrs["d_sae"])
            self.n_patches = int(f.attrs["n_patches"])
            self.grid = tuple(int(g) for g in f.attrs["grid"])
            self.indptr = f["codes/indptr"][:]
            self.indices = f["codes/indices"][:]
            self.values = f["codes/values"][:]
            self.first_row = f["images/first_row"][:]

    def patch_codes(self, v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(patch, latent, value) of every nonzero code of image position v."""
        lo_row = v * self.n_patches
        bounds = self.indptr[lo_row : lo_row + self.n_patches + 1]
        patch = np.repeat(np.arange(self.n_patches), np.diff(bounds))
        lo, hi = bounds[0], bounds[-1]
        return patch, self.indices[lo:hi], self.values[lo:hi].astype(np.float32)


class ExplorerData:
    """Everything the pages read, for one session. Build once per process (the app caches it)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.cache = Path(session.cache_dir)
        self.store = Store(session.store)
        self._sae: RawSpaceSAE | None = None
        self._sae_lock = threading.Lock()
        self._image_source: Any = None
        self._frame_lock = threading.Lock()
        self.codes = Codes(Path(session.codes))
        self.d_sae, self.grid = self.codes.d_sae, self.codes.grid
        self.n_patches = self.codes.n_patches
        self.metadata = self.store.metadata
        self.rows_V = np.flatnonzero(self.codes.first_row >= 0)
        self.position = np.full(len(self.codes.first_row), -1, dtype=np.int64)
        self.position[self.rows_V] = np.arange(len(self.rows_V))
        self.paths = np.asarray(self.metadata["path"]).astype(str)
        self.labels_N = image_labels(self.metadata)
        self.index = load_or_build_index(self.cache, self.codes, self.foreground_rows())
        top_values_SK, top_rows_SK = self.top_matrix(session.top_k)
        self.mean_top_S, self.entropy_S = top_image_summary(
            top_values_SK, top_rows_SK, self.labels_N
        )
        self.linked = linked_columns(session, self.d_sae)

    def foreground_rows(self) -> np.ndarray | None:
        """bool per codes row (valid image x patch): the foreground flags when the session pools
        over the foreground (explore.patches), else None (every patch)."""
        if self.session.patches != "foreground":
            return None
        flags_NP = self.store.foreground()
        if flags_NP is None:
            raise TraitsaeError(
                f"explore.patches=foreground, but store {self.store.path} has no foreground "
                "flags; rerun its extract.py command to add them, or use explore.patches=all."
            )
        return flags_NP[self.rows_V].reshape(-1)

    @property
    def sae(self) -> Any:
        """The SAE, loaded (with torch) on first use; one load even when two threads ask."""
        with self._sae_lock:
            if self._sae is None:
                from traitsae.sae.export import load_sae  # lazy: torch (launch stays torch-free)

                self._sae = load_sae(
                    self.session.sae, device=self.session.device, **self.session.placement
                ).eval()
        return self._sae

    # ------------------------------------------------------------------ latents

    @property
    def n_images(self) -> int:
        return len(self.rows_V)

    def fire_counts(self) -> np.ndarray:
        return np.diff(self.index.lat_indptr)

    def top_matrix(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[S, k] top image scores and store rows of every latent (0 / -1 past its images)."""
        starts_S, counts_S = self.index.lat_indptr[:-1], self.fire_counts()
        slot_SK = starts_S[:, None] + np.arange(k)
        filled_SK = np.arange(k) < counts_S[:, None]
        slot_SK = np.where(filled_SK, slot_SK, 0)
        lat_image = np.asarray(self.index.lat_image)
        values_SK = np.where(filled_SK, np.asarray(self.index.lat_score)[slot_SK], 0.0)
        rows_SK = np.where(filled_SK, self.rows_V[lat_image[slot_SK]], -1)
        return values_SK, rows_SK

    def latent_table(self) -> Any:
        """One row per latent: frequencies, scores, label entropy, and linked eval outputs."""
        counts_S = self.fire_counts()
        scores = np.asarray(self.index.lat_score, dtype=np.float64)
        cumulative = np.concatenate([[0.0], np.cumsum(scores)])
        lat_indptr = self.index.lat_indptr
        first = np.minimum(lat_indptr[:-1], max(len(scores) - 1, 0))
        patch_freq = self.index.patch_fires / max(1, self.n_images * self.n_patches)
        with np.errstate(divide="ignore"):
            log_freq = np.log10(patch_freq)
        table = pd.DataFrame(
            {
                "latent": np.arange(self.d_sae),
                "patch_freq": patch_freq,
                "log10_freq": np.where(patch_freq > 0, log_freq, np.nan),
                "image_freq": counts_S / max(1, self.n_images),
                "mean_image_score": (cumulative[lat_indptr[1:]] - cumulative[lat_indptr[:-1]])
                / max(1, self.n_images),
                "max_score": np.where(counts_S > 0, scores[first] if len(scores) else 0.0, 0.0),
                "mean_top_score": self.mean_top_S,
                "label_entropy": self.entropy_S,
            }
        )
        for name, column in self.linked.items():
            table[name] = column
        return table

    def top_images(self, latent: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Store rows and image scores of the latent's k best images (only where it fires)."""
        lo, hi = self.index.lat_indptr[latent], self.index.lat_indptr[latent + 1]
        hi = min(hi, lo + k)
        return self.rows_V[self.index.lat_image[lo:hi]], np.asarray(self.index.lat_score[lo:hi])

    def band_images(
        self, latent: int, lo: float, hi: float, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """k images spread evenly over a band of the latent's firing images ranked by score:
        `lo`, `hi` are fractions of that ranking (0 = its best image; 0.75..1 = the lowest
        quarter). Store rows and scores, best first."""
        start, end = self.index.lat_indptr[latent], self.index.lat_indptr[latent + 1]
        n = end - start
        first, last = start + int(np.floor(lo * n)), start + int(np.ceil(hi * n))
        if last <= first:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        picks = np.unique(np.linspace(first, last - 1, min(k, last - first)).round().astype(int))
        return self.rows_V[self.index.lat_image[picks]], np.asarray(self.index.lat_score[picks])

    def co_firing(self, latent: int, n: int) -> Any:
        """The n latents that fire on the same images most often: the share of this latent's
        images on which each also fires, and the Jaccard index of their image sets (1 = always
        together). Counted on at most CO_FIRING_IMAGES of its images spread over its ranking
        (a latent firing everywhere would otherwise read the whole index on every click)."""
        lo, hi = self.index.lat_indptr[latent], self.index.lat_indptr[latent + 1]
        n_own = int(hi - lo)
        picks = np.unique(np.linspace(lo, hi - 1, min(n_own, CO_FIRING_IMAGES)).astype(np.int64))
        images = np.asarray(self.index.lat_image[picks], dtype=np.int64)
        starts = np.asarray(self.index.img_indptr[images], dtype=np.int64)
        counts = np.asarray(self.index.img_indptr[images + 1], dtype=np.int64) - starts
        # Every slot of those images' CSR rows at once: ranges [start, start + count).
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts)
        slots = np.arange(int(counts.sum()), dtype=np.int64) + offsets
        together_S = np.bincount(np.asarray(self.index.img_latent)[slots], minlength=self.d_sae)
        share_S = together_S / max(1, len(images))
        share_S[latent] = 0.0
        shared_S = share_S * n_own  # images together, estimated from the sample when sampled
        union_S = n_own + self.fire_counts() - shared_S
        jaccard_S = np.where(union_S > 0, shared_S / np.maximum(union_S, 1e-12), 0.0)
        order = np.argsort(-jaccard_S, kind="stable")[:n]
        order = order[share_S[order] > 0]
        return pd.DataFrame(
            {"latent": order, "share of its images": share_S[order], "Jaccard": jaccard_S[order]}
        )

    def latent_scores(self, latent: int) -> np.ndarray:
        """Image scores of every image where the latent fires (the others score 0)."""
        lo, hi = self.index.lat_indptr[latent], self.index.lat_indptr[latent + 1]
        return np.asarray(self.index.lat_score[lo:hi])

    def latent_maps(self, latent: int, rows: np.ndarray) -> np.ndarray:
        """[n, grid rows, grid cols] activation of one latent on the patches of each image."""
        maps = np.zeros((len(rows), self.n_patches), dtype=np.float32)
        for i, row in enumerate(rows):
            patch, lat, val = self.codes.patch_codes(self.image_position(row))
            hit = lat == latent
            maps[i, patch[hit]] = val[hit]
        return maps.reshape(len(rows), *self.grid)

    # ------------------------------------------------------------------ images

    def image_position(self, row: int) -> int:
        if not 0 <= row < len(self.position) or self.position[row] < 0:
            raise TraitsaeError(
                f"image row {row} is not a valid image of store {self.store.path} (rows "
                f"0..{len(self.position) - 1}; rows marked invalid at extraction have no codes)."
            )
        return int(self.position[row])

    def image_codes(self, row: int) -> np.ndarray:
        """Dense codes [P, S] of one image."""
        patch, lat, val = self.codes.patch_codes(self.image_position(row))
        dense_PS = np.zeros((self.n_patches, self.d_sae), dtype=np.float32)
        dense_PS[patch, lat] = val
        return dense_PS

    def image_latents(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Latents firing on an image and their image scores, best first."""
        v = self.image_position(row)
        lo, hi = self.index.img_indptr[v], self.index.img_indptr[v + 1]
        latents, scores = (
            np.asarray(self.index.img_latent[lo:hi]),
            np.asarray(self.index.img_score[lo:hi]),
        )
        order = np.argsort(-scores, kind="stable")
        return latents[order], scores[order]

    def image_scores(self, rows: np.ndarray) -> np.ndarray:
        """Dense image scores [len(rows), S] of chosen images."""
        out = np.zeros((len(rows), self.d_sae), dtype=np.float32)
        for i, row in enumerate(rows):
            v = self.image_position(int(row))
            lo, hi = self.index.img_indptr[v], self.index.img_indptr[v + 1]
            out[i, self.index.img_latent[lo:hi]] = self.index.img_score[lo:hi]
        return out

    def reconstruction_error(self, row: int) -> np.ndarray:
        """[grid] per-patch ||x - x_hat||^2 / ||x||^2 of the SAE on the store's activations."""
        import torch  # lazy: torch (launch stays torch-free)

        from traitsae.evaluation.core.tokens import (
            sae_layer,  # lazy: torch (launch stays torch-free)
        )

        self.image_position(row)
        sae = self.sae
        acts_PD = self.store.patches(sae_layer(self.store, sae))[row]
        with torch.inference_mode():
            x_PD = torch.from_numpy(np.asarray(acts_PD, dtype=np.float32)).to(self.session.device)
            err_P = ((x_PD - sae.decode(sae.encode(x_PD))) ** 2).sum(-1)
            norm_P = (x_PD**2).sum(-1).clamp_min(1e-12)
            return (err_P / norm_P).cpu().numpy().reshape(self.grid)

    def image(self, row: int) -> np.ndarray | None:
        """The store row's picture framed like extraction (None: drawn without pictures).

        Framing needs the backbone's transform (torchvision, timm: seconds to import), so each
        framed picture is kept as a PNG in the explorer's cache and read back with PIL alone
        (an image file replaced on disk later keeps its old picture until that folder goes).
        """
        if not self.session.draw_images:
            return None
        cached = self.image_cache / f"{row}.png"
        if cached.is_file():
            with Image.open(cached) as img:
                return np.asarray(img.convert("RGB"))
        picture = self.image_source().load(str(self.paths[row]))
        if picture is not None:
            self.image_cache.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{threading.get_ident()}.tmp")
            Image.fromarray(picture).save(partial, format="PNG")
            partial.replace(cached)  # atomic: a second session never reads half a file
        return picture

    @property
    def image_cache(self) -> Path:
        """Framed pictures of this SAE x store, one folder per way of framing them."""
        s = self.session
        framing = f"{s.image_root}|{s.image_size}|{s.resize_mode}"
        return self.cache / "images" / hashlib.sha1(framing.encode()).hexdigest()[:12]

    def image_source(self) -> Any:
        """The store's pictures framed like extraction (built once: it imports torchvision)."""
        from traitsae.evaluation.core.frames import (
            store_image_source,  # lazy: torch (launch stays torch-free)
        )

        with self._frame_lock:
            if self._image_source is None:
                s = self.session
                self._image_source = store_image_source(
                    self.store, s.image_root, s.image_size, s.resize_mode
                )
        return self._image_source

    def caption(self, row: int) -> str:
        column = caption_column(self.metadata)
        tag = f"{self.metadata[column][row]} " if column else ""
        return f"{tag}#{row}"

    def short_caption(self, row: int) -> str:
        """The image's class in words ('Zeta warbler'), else its row: captions that wrap."""
        column = caption_column(self.metadata)
        if column is None:
            return f"#{row}"
        from traitsae.explore.draw import short_label  # lazy: matplotlib (pages import it)

        return short_label(self.metadata[column][row])

    def metadata_columns(self) -> list[str]:
        skip = {"valid", "index", "error", "done", "path"}
        return [c for c in self.metadata if c not in skip]

    # ------------------------------------------------------------------ search

    def region_scores(self, row: int, patches: np.ndarray) -> np.ndarray:
        """[S] max code of every latent over chosen patches (flat indices) of an image."""
        return self.image_codes(row)[np.asarray(patches, dtype=np.int64)].max(axis=0)

    def search(self, positives_NS: np.ndarray, negatives_NS: np.ndarray) -> Any:
        """Latents that fire on the positive examples and not on the negatives, best first.

        Examples are score vectors [n, S] (images: `image_scores`; patch regions:
        `region_scores`). Ranked by firing-rate gap (rate on positives - rate on negatives),
        ties by the gap in mean score; latents that fire on no positive are left out.
        """

        if len(positives_NS) == 0:
            raise TraitsaeError("choose at least one positive example to search by example.")
        negatives_NS = np.asarray(negatives_NS).reshape(-1, self.d_sae)
        empty = len(negatives_NS) == 0
        table = pd.DataFrame(
            {
                "latent": np.arange(self.d_sae),
                "rate_pos": (positives_NS > 0).mean(0),
                "rate_neg": 0.0 if empty else (negatives_NS > 0).mean(0),
                "mean_pos": positives_NS.mean(0),
                "mean_neg": 0.0 if empty else negatives_NS.mean(0),
            }
        )
        table["rate_gap"] = table.rate_pos - table.rate_neg
        table["score_gap"] = table.mean_pos - table.mean_neg
        table = table[table.rate_pos > 0]
        return table.sort_values(["rate_gap", "score_gap"], ascending=False, kind="stable")

    # ------------------------------------------------------------------ groups

    def group_scores(self, mask_a: np.ndarray, mask_b: np.ndarray) -> Any:
        """discovery.GroupScores of two groups of store rows, from the codes (no re-encoding)."""
        from traitsae.evaluation.discovery.candidates import (
            GroupScores,  # lazy: torch (launch stays torch-free)
        )

        has_codes_N = self.position >= 0
        rows = np.flatnonzero((mask_a | mask_b) & has_codes_N)
        return GroupScores(rows, mask_a[rows], self.image_scores(rows))
