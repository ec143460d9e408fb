#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py; docs/gpu.md) with the repository's .venv if set up, else python3 (a GPU host).
cd "$(dirname "$0")/.." && exec "$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)" benchmarks/gpu_check.py "$@"
