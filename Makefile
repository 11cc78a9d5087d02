# The two commands a newcomer needs; both set kiln up first (scripts/setup.sh is idempotent).
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m kiln.examples.demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/cpu_peers.py
