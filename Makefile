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
	$(MAKE) demo-collection

# The collection workflow on a generated museum collection (dataset=collection): co-mimic pairs,
# planted differences in some, rulers/labels/colour cards around the specimens. Two SAEs, on
# every patch and on the foreground patches (flags from the masks), each through one discovery
# over all pairs (one FDR); the specimen x trait table of the foreground run's confirmed
# discoveries. About 3 min on 2 CPU cores; numbers: scripts/demo_results.py -> docs/guide/demo.md.
COLL ?= $(DEMO)/collection
COLL_SAE ?= sae=topk sae.expansion=2 sae.k=4 trainer.max_steps=600 data.batch_size=1024 optim.lr=4e-4
COLL_ARGS = $(DEMO_PATHS) backbone=tiny dataset=collection
COLL_PAIRS = 'eval.pairs=$${dataset.root}/pairs.csv'
demo-collection: install
	$(PY) extract.py -m $(COLL_ARGS) split=train,test "backbone.layers=[$(DEMO_LAYER)]" hydra.sweep.dir=$(COLL)/extract
	$(PY) train.py $(COLL_ARGS) data.layer=$(DEMO_LAYER) $(COLL_SAE) hydra.run.dir=$(COLL)/train_all
	$(PY) train.py $(COLL_ARGS) data.layer=$(DEMO_LAYER) $(COLL_SAE) data.tokens=foreground hydra.run.dir=$(COLL)/train_fg
	$(PY) evaluate.py $(COLL_ARGS) eval=discovery split=train run=$(COLL)/train_all $(COLL_PAIRS) eval.patches=all hydra.run.dir=$(COLL)/discovery_all
	$(PY) evaluate.py $(COLL_ARGS) eval=discovery split=train run=$(COLL)/train_fg $(COLL_PAIRS) eval.patches=foreground hydra.run.dir=$(COLL)/discovery_fg
	$(PY) evaluate.py $(COLL_ARGS) eval=traits_table split=train run=$(COLL)/train_fg eval.discovery=$(COLL)/discovery_fg hydra.run.dir=$(COLL)/traits_table
	@echo "Collection discovery (open in a browser): $(COLL)/discovery_fg/index.html"
	@echo "Specimen x trait table: $(COLL)/traits_table/traits_table.csv"

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

.PHONY: install demo demo-collection test
