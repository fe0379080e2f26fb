# The two commands of the README. Both set up .venv on first use (tools/bootstrap.sh).
PY := .venv/bin/python
.PHONY: demo test venv bench

venv:
	@bash tools/bootstrap.sh

demo: venv
	$(PY) tools/demo.py $(ARGS)

test: venv
	$(PY) -m pytest -q tests $(ARGS)

bench: venv
	$(PY) benchmarks/bench_stats.py
