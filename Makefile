# The two commands of the README. Each does its own set-up (scripts/setup.sh).
.PHONY: calibrate test setup bench
calibrate:
	bash scripts/calibrate.sh
test:
	bash scripts/test.sh
setup:
	bash scripts/setup.sh
bench:
	bash scripts/setup.sh && .venv/bin/python benchmarks/bench_channel_stats.py
