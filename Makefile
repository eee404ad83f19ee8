# One command each: `make demo` (set up + run the main job on the embedded default),
# `make test` (set up + run the tests). Both work on a fresh Debian machine.
PY := .venv/bin/python
DEMO_TREE := data/digits-tree
DEMO_DATA := data/digits

.PHONY: setup demo test lint bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) convert/make_digits.py --out $(DEMO_TREE)
	$(PY) convert/imagenet_to_ffcv.py --src $(DEMO_TREE) --out $(DEMO_DATA)
	$(PY) convert/imagenet_to_dali.py --src $(DEMO_TREE) --out $(DEMO_DATA)
	$(PY) train.py --config configs/digits.toml --data $(DEMO_DATA) --labels 1pct --device cpu --out runs/demo --force

test: setup
	$(PY) -m pytest -q -ra tests

bench: setup
	$(PY) bench/loaders.py --images imagenet
	$(PY) bench/loaders.py --images cifar

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

clean:
	rm -rf runs data
