# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the wheels this workplace keeps on disk (CPU/GPU build alike).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: .venv/installed

# The embedded demo, stage by stage through the real CLI (re-running resumes / skips what is done).
DEMO ?= logs/demo
# Block 1 of the tiny random ViT: its last blocks' near-uniform random attention blurs patches.
DEMO_LAYER ?= 1
DEMO_PATHS ?= paths.activations_dir=$(DEMO)/activations
# A small dictionary (128 latents, 4 active): with 512 latents in 64 dimensions random directions
# already tile the space so densely that an untrained SAE scores almost like a trained one, and
# cub_traits could not tell them apart (README, "What the demo shows").
# lr 4e-4: the demo's 144 images x 64 patches were tuned at it; the default (2e-3) is set for
# the dictionary benchmark's 2.5 M-vector budget (README, "Ground truth").
DEMO_SAE ?= sae=topk sae.expansion=2 sae.k=4 trainer.max_steps=1200 data.batch_size=1024 optim.lr=4e-4
# Steering (eval=steer) reads the model's final embedding. tiny's CLS read-out does not carry the
# planted traits on held-out images (a class probe on it is at chance on the test split), so the
# demo steers through backbone=tiny_maxpool (same blocks, final embedding = max over the patch
# tokens) with its own SAE at block 2 (docs/guide/causal.md, "What it shows").
DEMO_STEER_LAYER ?= 2
DEMO_STEER_TARGET ?= 001.Alpha_warbler
demo: install
	$(PY) extract.py -m $(DEMO_PATHS) backbone=tiny dataset=synthetic split=train,test "backbone.layers=[$(DEMO_LAYER)]" hydra.sweep.dir=$(DEMO)/extract
	$(PY) train.py $(DEMO_PATHS) backbone=tiny dataset=synthetic data.layer=$(DEMO_LAYER) $(DEMO_SAE) hydra.run.dir=$(DEMO)/train
	$(PY) evaluate.py $(DEMO_PATHS) eval=cub_traits dataset=synthetic run=$(DEMO)/train hydra.run.dir=$(DEMO)/cub_traits
	$(PY) evaluate.py $(DEMO_PATHS) eval=discovery dataset=synthetic split=train run=$(DEMO)/train hydra.run.dir=$(DEMO)/discovery
	$(PY) extract.py -m $(DEMO_PATHS) backbone=tiny_maxpool dataset=synthetic split=train,test "backbone.layers=[$(DEMO_STEER_LAYER)]" hydra.sweep.dir=$(DEMO)/steer-extract
	$(PY) train.py $(DEMO_PATHS) backbone=tiny_maxpool dataset=synthetic data.layer=$(DEMO_STEER_LAYER) $(DEMO_SAE) hydra.run.dir=$(DEMO)/steer-train
	$(PY) evaluate.py $(DEMO_PATHS) eval=steer dataset=synthetic split=test run=$(DEMO)/steer-train eval.target_class=$(DEMO_STEER_TARGET) hydra.run.dir=$(DEMO)/steer
	@echo "Demo done. Trait scores: $(DEMO)/cub_traits/cub_traits.json"
	@echo "Discovery report (open in a browser): $(DEMO)/discovery/index.html"
	@echo "Steering (verdict at the end of the table): $(DEMO)/steer/steer.json"

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

.PHONY: install demo test
