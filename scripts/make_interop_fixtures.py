"""Save small SAE checkpoints with other libraries' own code, plus their own encode/decode.

Run by hand, in a separate venv holding the libraries (never traitsae's: CI does not install
them); see docs/guide/interop.md:

    python3.11 -m venv /work/venv-peers
    /work/venv-peers/bin/pip install torch==2.14.1 sae-lens eai-sparsify overcomplete \
        dictionary-learning saev==0.1.0
    /work/venv-peers/bin/python scripts/make_interop_fixtures.py [--saev-src <saev checkout>/src]

Writes tests/fixtures/interop/: `inputs.safetensors` (x [B, D], one batch for all), one folder per
fixture (the library's files + `expected.safetensors` with the library's `codes` [B, S] of x and
`recon` [B, D] = its decode of those codes) and `manifest.json` (library, version, variant,
folder). A library that is not installed is skipped and named in the manifest.

`--saev-src` also makes saev schema-5 fixtures (TopK, BatchTopK) with saev's current code from
a source checkout (saev's current code is not on PyPI, and its package needs Python >= 3.12 to
install; its nn module imports on 3.11 with `orjson` added), and with `--traitsae-python
.venv/bin/python` checks that saev's own `load` reads traitsae's export to saev's layout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, BATCH, K = 32, 64, 16, 6
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "interop"


def version(dist: str) -> str:
    return importlib.metadata.version(dist)


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # an offset, so that whether b_dec is removed from the input matters
    return torch.randn(BATCH, D_IN, generator=g) * 2.0 + torch.linspace(-1, 1, D_IN)


def randomise_biases(*params: torch.nn.Parameter, seed: int) -> None:
    """Non-zero biases (fresh SAEs start at zero, which would hide b_dec/b_enc handling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


class Writer:
    def __init__(self, out: Path, x: torch.Tensor) -> None:
        self.out, self.x = out, x
        self.entries: list[dict] = []
        self.skipped: dict[str, str] = {}

    def folder(self, name: str) -> Path:
        path = self.out / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def add(
        self,
        name: str,
        library: str,
        variant: str,
        codes: torch.Tensor,
        recon: torch.Tensor,
        lib_version: str | None = None,
        **extra,
    ) -> None:
        codes, recon = codes.detach().float().contiguous(), recon.detach().float().contiguous()
        assert codes.shape == (BATCH, codes.shape[1]) and recon.shape == (BATCH, D_IN), name
        save_file({"codes": codes, "recon": recon}, str(self.out / name / "expected.safetensors"))
        l0 = float((codes != 0).float().sum(1).mean())
        self.entries.append(
            {
                "name": name,
                "library": library,
                "version": lib_version or version_of[library],
                "variant": variant,
                "l0": round(l0, 2),
                **extra,
            }
        )
        print(f"  {name:<34} L0 {l0:6.2f}")

    def run(self, library: str, make: Callable[[Writer], None]) -> None:
        print(f"{library}:")
        try:
            make(self)
        except ImportError as err:
            self.skipped[library] = f"not installed here ({err})"
            print(f"  skipped: {err}")
        except Exception as err:  # keep the other libraries' fixtures; say what failed
            traceback.print_exc()
            self.skipped[library] = f"failed: {type(err).__name__}: {err}"


version_of: dict[str, str] = {}

# ---------------------------------------------------------------- SAELens


def saelens(w: Writer) -> None:
    from sae_lens import (
        SAE,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    version_of["saelens"] = version("sae-lens")

    def meta() -> SAEMetadata:
        return SAEMetadata(model_name="tiny", hook_name="blocks.3.hook_resid_post")

    def save_and_reload(sae, name: str, variant: str, inference: bool = False, **extra) -> None:
        path = w.folder(name)
        (sae.save_inference_model if inference else sae.save_model)(path)
        loaded = SAE.load_from_disk(path)  # the library's own loader and encode/decode
        loaded.eval()
        with torch.no_grad():
            codes = loaded.encode(w.x)
            w.add(name, "saelens", variant, codes, loaded.decode(codes), **extra)

    torch.manual_seed(1)
    for name, apply in (("saelens_standard", True), ("saelens_standard_no_bdec_in", False)):
        sae = StandardSAE(
            StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply, metadata=meta())
        )
        randomise_biases(sae.b_enc, sae.b_dec, seed=2)
        save_and_reload(sae, name, "standard")
    for name, rescale in (("saelens_topk", False), ("saelens_topk_rescaled", True)):
        sae = TopKSAE(
            TopKSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta(), rescale_acts_by_decoder_norm=rescale
            )
        )
        randomise_biases(sae.b_enc, sae.b_dec, seed=3)
        with torch.no_grad():  # decoder rows of unequal norms, so the rescaling matters
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
        save_and_reload(sae, name, "topk")
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta()))
    randomise_biases(sae.b_enc, sae.b_dec, seed=4)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.0, 1.5, D_SAE))
    save_and_reload(sae, "saelens_jumprelu", "jumprelu")

    def train_steps(sae, steps: int = 3) -> None:
        """A few training forward passes: BatchTopK learns its threshold there."""
        sae.train()
        for step in range(steps):
            batch = torch.randn(64, D_IN) * 2.0
            sae.training_forward_pass(
                TrainStepInput(
                    sae_in=batch,
                    coefficients={},
                    dead_neuron_mask=None,
                    n_training_steps=step,
                    is_logging_step=False,
                )
            )

    # topk_threshold_lr=1: the threshold is the last batch's, so a few steps give L0 ~ k
    sae = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, topk_threshold_lr=1.0, metadata=meta()
        )
    )
    randomise_biases(sae.b_enc, sae.b_dec, seed=5)
    train_steps(sae)
    save_and_reload(sae, "saelens_batchtopk", "batchtopk (saved as jumprelu)", inference=True)
    sae = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            k=K,
            matryoshka_widths=[8, 24, D_SAE],
            topk_threshold_lr=1.0,
            metadata=meta(),
        )
    )
    randomise_biases(sae.b_enc, sae.b_dec, seed=6)
    train_steps(sae)
    save_and_reload(
        sae, "saelens_matryoshka", "matryoshka_batchtopk (saved as jumprelu)", inference=True
    )
    # Refused by traitsae (per-vector rescaling): files only, for the bad-input test.
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm", metadata=meta()
        )
    )
    sae.save_model(w.folder("saelens_layer_norm_refused"))


# ---------------------------------------------------------------- sparsify


def sparsify(w: Writer) -> None:
    import sparsify.sparse_coder
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import eager_decode

    version_of["sparsify"] = version("eai-sparsify")
    # sparsify decodes with a Triton kernel whenever triton imports; on a CPU it has no driver,
    # so use sparsify's own eager fallback (the same embedding-bag sum).
    sparsify.sparse_coder.decoder_impl = eager_decode
    torch.manual_seed(7)
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    randomise_biases(sae.encoder.bias, sae.b_dec, seed=8)
    root = w.folder("sparsify_topk")
    sae.save_to_disk(root / "layers.3")  # one folder per hookpoint
    loaded = SparseCoder.load_from_disk(root / "layers.3")
    with torch.no_grad():
        out = loaded.encode(w.x)
        codes = torch.zeros(BATCH, D_SAE).scatter(1, out.top_indices, out.top_acts)
        recon = loaded.decode(out.top_acts, out.top_indices)
    w.add("sparsify_topk", "sparsify", "topk", codes, recon)


# ---------------------------------------------------------------- saev


def saev_legacy(w: Writer) -> None:
    from saev import config as saev_config
    from saev import nn as saev_nn

    version_of["saev"] = version("saev")
    torch.manual_seed(9)
    sae = saev_nn.SparseAutoencoder(
        saev_config.SparseAutoencoder(d_vit=D_IN, exp_factor=D_SAE // D_IN)
    )
    randomise_biases(sae.b_enc, sae.b_dec, seed=10)
    path = w.folder("saev_legacy_relu") / "sae.pt"
    saev_nn.dump(str(path), sae)
    loaded = saev_nn.load(str(path))
    with torch.no_grad():
        _, codes, _ = loaded(w.x)
        w.add("saev_legacy_relu", "saev", "relu (legacy header)", codes, loaded.decode(codes))


def saev_current(w: Writer, src: Path, commit: str, traitsae_python: Path | None) -> None:
    for module in [m for m in sys.modules if m == "saev" or m.startswith("saev.")]:
        del sys.modules[module]  # the PyPI saev 0.1.0 imported above has the same name
    sys.path.insert(0, str(src))
    from saev.nn import modeling

    version_of["saev-src"] = (
        f"source {commit or 'checkout'} (header schema {modeling.SCHEMA_VERSION})"
    )
    for seed, (name, activation, variant) in enumerate(
        (
            ("saev_topk", modeling.TopK(top_k=K), "TopK"),
            ("saev_batchtopk", modeling.BatchTopK(top_k=K, momentum=1.0), "BatchTopK"),
            ("saev_relu", modeling.Relu(), "Relu"),
        )
    ):
        torch.manual_seed(11 + seed)
        sae = modeling.SparseAutoencoder(
            modeling.SparseAutoencoderConfig(d_model=D_IN, d_sae=D_SAE, activation=activation)
        )
        randomise_biases(sae.b_enc, sae.b_dec, seed=20 + seed)
        if variant == "BatchTopK":  # a few training batches estimate its threshold
            sae.train()
            with torch.no_grad():
                for _ in range(3):
                    sae.encode(torch.randn(64, D_IN) * 2.0)
        path = w.folder(name) / "checkpoint" / "sae.pt"
        modeling.dump(path, sae)
        loaded = modeling.load(path).eval()
        with torch.no_grad():
            codes = loaded.encode(w.x).f_x
            recon = loaded.decode(codes)[:, -1]
        w.add(name, "saev", variant, codes, recon, lib_version=version_of["saev-src"])
    if traitsae_python is not None:
        check_saev_reads_traitsae_export(w, modeling, traitsae_python)


TRAITSAE_EXPORT = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from traitsae.sae.export import load_sae, save_sae
from traitsae.sae.formats.saev_export import export
from traitsae.sae.model import build_sae
out, variant = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(30)
sae = build_sae(variant, {d_in}, {d_sae}, k={k}, threshold_momentum=0.1)
with torch.no_grad():
    sae.b_enc.normal_(0.0, 0.3); sae.b_dec.normal_(0.0, 0.3)
    if variant == "batchtopk":
        sae.activation.threshold.fill_(0.4)
save_sae(sae, out / "run", {{"backbone": "tiny", "layer": 3, "scale": 0.7}})
ours = load_sae(out / "run")
export(out / "run", out / "saev")
x = load_file(str(out / "x.safetensors"))["x"]
with torch.no_grad():
    codes = ours.encode(x)
    save_file({{"codes": codes, "recon": ours.decode(codes)}}, str(out / "ours.safetensors"))
"""


def check_saev_reads_traitsae_export(w: Writer, modeling, traitsae_python: Path) -> None:
    """saev's own `load` of traitsae's export to saev's layout (made by traitsae's venv): its
    codes and reconstructions must be traitsae's."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    tmp = w.out / "_export_check"
    code = TRAITSAE_EXPORT.format(d_in=D_IN, d_sae=D_SAE, k=K)
    w.export_check = {}
    for variant in ("relu", "topk", "batchtopk"):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({"x": w.x}, str(tmp / "x.safetensors"))
        env = {"PYTHONPATH": str(repo / "src"), "PATH": "/usr/bin:/bin"}
        subprocess.run([str(traitsae_python), "-c", code, str(tmp), variant], check=True, env=env)
        ours = load_file(str(tmp / "ours.safetensors"))
        theirs = modeling.load(tmp / "saev" / "sae.pt").eval()
        with torch.no_grad():
            diff_codes = (theirs.encode(w.x).f_x - ours["codes"]).abs().max().item()
            diff_recon = (theirs.decode(ours["codes"])[:, -1] - ours["recon"]).abs().max().item()
        print(
            f"  saev.load(traitsae export, {variant}): max |codes diff| {diff_codes:.2e}, "
            f"max |recon diff| {diff_recon:.2e}"
        )
        assert diff_codes < 1e-4 and diff_recon < 1e-4, variant
        w.export_check[variant] = {
            "max_abs_diff_codes": diff_codes,
            "max_abs_diff_recon": diff_recon,
        }
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- overcomplete


def save_overcomplete(sae, folder: Path, cls: str, kwargs: dict) -> None:
    """overcomplete has no save function: its state dict + a config.json naming the class."""
    torch.save(sae.state_dict(), folder / "sae.pt")
    running = getattr(sae, "running_threshold", None)
    config = {
        "library": "overcomplete",
        "version": version_of["overcomplete"],
        "class": cls,
        "kwargs": kwargs,
        "running_threshold": None if running is None else float(running),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def overcomplete(w: Writer) -> None:
    import overcomplete.sae as oc

    version_of["overcomplete"] = version("overcomplete")
    g = torch.Generator().manual_seed(12)
    points = torch.randn(40, D_IN, generator=g) * 2.0
    makers = {
        "SAE": (oc.SAE, {}),
        "TopKSAE": (oc.TopKSAE, {"top_k": K}),
        "BatchTopKSAE": (oc.BatchTopKSAE, {"top_k": K * 64, "threshold_momentum": 0.9}),
        "JumpSAE": (oc.JumpSAE, {"bandwidth": 1e-3}),
        "RATopKSAE": (oc.RATopKSAE, {"top_k": K, "delta": 0.5}),
        "RAJumpSAE": (oc.RAJumpSAE, {"bandwidth": 1e-3, "delta": 0.5}),
    }
    for i, (cls, (make, extra)) in enumerate(makers.items()):
        torch.manual_seed(13 + i)
        kwargs = {"input_shape": D_IN, "nb_concepts": D_SAE, **extra}
        sae = make(**({**kwargs, "points": points} if cls.startswith("RA") else kwargs))
        with torch.no_grad():
            sae.encoder.final_block[0].bias.normal_(0.0, 0.3)
            if cls.startswith("RA"):
                sae.dictionary.Relax.normal_(0.0, 0.2)
            if cls.endswith("JumpSAE"):
                sae.thresholds.copy_(torch.linspace(-3.0, 0.0, D_SAE))
        sae.train()
        with torch.no_grad():  # a few training batches (BatchTopK estimates its threshold)
            for _ in range(3):
                sae(torch.randn(64, D_IN) * 2.0)
        name = f"overcomplete_{cls.lower()}"
        folder = w.folder(name)
        save_overcomplete(sae, folder, cls, kwargs)
        sae.eval()  # overcomplete fuses its dictionary here
        with torch.no_grad():
            _, codes = sae.encode(w.x)
            w.add(name, "overcomplete", cls, codes, sae.decode(codes))


# ---------------------------------------------------------------- dictionary_learning


def dictionary_learning(w: Writer) -> None:
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import (
        MatryoshkaBatchTopKSAE,
        MatryoshkaBatchTopKTrainer,
    )
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE
    from dictionary_learning.utils import load_dictionary

    version_of["dictionary_learning"] = version("dictionary-learning")
    steps = 6
    common = {
        "steps": steps,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "layer": 3,
        "lm_name": "tiny",
        "device": "cpu",
        "seed": 0,
        "warmup_steps": 1,
    }
    topk = {"k": K, "threshold_start_step": 1, "threshold_beta": 0.0}  # last batch's threshold
    dense = {"sparsity_warmup_steps": 1}
    trainers = {
        "AutoEncoder": {
            "trainer": StandardTrainer,
            "dict_class": AutoEncoder,
            **dense,
            "resample_steps": None,
        },
        "AutoEncoderTopK": {"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, **topk},
        "BatchTopKSAE": {"trainer": BatchTopKTrainer, "dict_class": BatchTopKSAE, **topk},
        "MatryoshkaBatchTopKSAE": {
            "trainer": MatryoshkaBatchTopKTrainer,
            **topk,
            "dict_class": MatryoshkaBatchTopKSAE,
            "group_fractions": [0.125, 0.375, 0.5],
        },
        "JumpReluAutoEncoder": {
            "trainer": JumpReluTrainer,
            "dict_class": JumpReluAutoEncoder,
            **dense,
        },
        "GatedAutoEncoder": {"trainer": GatedSAETrainer, **dense},  # refused by traitsae
    }
    g = torch.Generator().manual_seed(14)
    # activations of norm ~ 20: normalize_activations folds the norm factor into the weights
    data = [torch.randn(64, D_IN, generator=g) * 3.5 + 1.0 for _ in range(steps + 1)]
    tmp = w.out / "_dictionary_learning_run"
    shutil.rmtree(tmp, ignore_errors=True)
    configs = [{**common, **extra} for extra in trainers.values()]
    trainSAE(
        iter(data),
        configs,
        steps=steps,
        save_dir=str(tmp),
        normalize_activations=True,
        device="cpu",
    )
    for i, cls in enumerate(trainers):
        name = f"dictionary_learning_{cls.lower()}"
        folder = w.folder(name)
        for file in ("ae.pt", "config.json"):
            shutil.copy(tmp / f"trainer_{i}" / file, folder / file)
        if cls == "GatedAutoEncoder":
            continue
        ae, _ = load_dictionary(str(folder), device="cpu")  # the library's own loader
        with torch.no_grad():
            codes = ae.encode(w.x)
            w.add(name, "dictionary_learning", cls, codes, ae.decode(codes))
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saev-src", type=Path, help="saev source checkout's src/ (schema 5)")
    parser.add_argument("--saev-commit", default="", help="the saev checkout's commit, recorded")
    parser.add_argument(
        "--traitsae-python",
        type=Path,
        help="a Python with traitsae's dependencies (its .venv), for the export check",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    x = inputs()
    save_file({"x": x}, str(args.out / "inputs.safetensors"))
    w = Writer(args.out, x)
    w.run("saelens", saelens)
    w.run("sparsify", sparsify)
    w.run("saev", saev_legacy)
    if args.saev_src:
        w.run(
            "saev-src",
            lambda w: saev_current(w, args.saev_src, args.saev_commit, args.traitsae_python),
        )
    w.run("overcomplete", overcomplete)
    w.run("dictionary_learning", dictionary_learning)
    manifest = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "batch": BATCH,
        "torch": torch.__version__,
        "fixtures": w.entries,
        "skipped": w.skipped,
        "saev_load_of_traitsae_export": getattr(w, "export_check", None),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert load_file(str(args.out / "inputs.safetensors"))["x"].equal(x)
    print(f"{len(w.entries)} fixtures in {args.out}; skipped: {w.skipped or 'none'}")


if __name__ == "__main__":
    main()
