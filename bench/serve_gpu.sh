#!/bin/bash
# Issue 25's GPU measurement in one device call: the engine (this tree) against the pre-engine server, on one card.
#
# Before the call, on the CPU machine (the device has no package index; KINDS.md lists what it has):
#   mkdir -p .dev/old && git archive 1b21fc9^ chatlora bench | tar -x -C .dev/old     # the server before the engine
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl fastapi starlette uvicorn pydantic pydantic-core annotated-doc \
#     annotated-types typing-inspection typing-extensions h11 click anyio opentelemetry-api httpx httpcore certifi \
#     idna pytest pluggy iniconfig pygments      # the versions of .venv (one of each)
#   (.dev/ and .whl/ are in .git/info/exclude)
# The call: run(command="bash bench/serve_gpu.sh", carry=[".dev/old", ".whl"], timeout_s=560): about 8 minutes.
export PYTHONUNBUFFERED=1
R=$PWD; O=$R/.dev/old
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
export PYTHONPATH=/tmp/site:$R
AD="--adapter a1=/dev/shm/yi6b-adapter-1 --adapter a2=/dev/shm/yi6b-adapter-2 --adapter a3=/dev/shm/yi6b-adapter-3 --adapter a4=/dev/shm/yi6b-adapter-4"
S="--model /dev/shm/yi6b --device cuda --max-tokens 64"
L="--max-batch 64 --duration 30 --grace 15 --max-tokens 64"
echo "== make random $(date +%T)"; timeout 120 python3 bench/generate_speed.py --make-random /dev/shm/yi6b --adapters 4 --device cuda 2>&1 | tail -2
echo "== serve OLD 64 $(date +%T)"; (cd $O && PYTHONPATH=/tmp/site:$O timeout 90 python3 $R/bench/serve_load.py --serve "$S" $L --clients 64 2>&1 | tail -12)
echo "== serve NEW 64 $(date +%T)"; timeout 90 python3 bench/serve_load.py --serve "$S" $L --clients 64 2>&1 | tail -12
echo "== serve NEW 64, 4 adapters $(date +%T)"; timeout 90 python3 bench/serve_load.py --serve "$S $AD" $L --clients 64 --model a1,a2,a3,a4 2>&1 | tail -12
echo "== serve NEW 256 $(date +%T)"; timeout 90 python3 bench/serve_load.py --serve "$S" $L --clients 256 2>&1 | tail -12
echo "== gpu tier, engine $(date +%T)"; timeout 60 python3 -m pytest -q -m gpu tests/unit/test_gpu.py -k engine -p no:cacheprovider 2>&1 | tail -6
for f in /tmp/serve_load.server.*.log; do echo "== $f"; grep -v " 200 \| 503 " $f | grep -iv 'loading' | tail -8; done
