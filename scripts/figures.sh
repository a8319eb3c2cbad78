#!/usr/bin/env bash
# This machine's figures (`make figures`): every CPU measurement the docs quote, each table written by the
# tool that measured it into docs/figures/<machine>.md (a table is replaced when its command runs again).
# Run it with nothing else running: the timings are interleaved against ReLU, but a busy machine still
# moves them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
FIG="${FIG:-docs/figures}"
$PY -m actlab.perf.speed --figures "$FIG"
$PY -m actlab.perf.model_speed --suite cpu --repeats 10 --figures "$FIG"
$PY -m actlab.perf.overhead --repeats 4 --figures "$FIG"
$PY -m actlab.perf.compile_time --model resnet26 --acts relu,iieu_b,iieu_dc --figures "$FIG"
$PY -m actlab.perf.compile_time --model vit_tiny --acts relu,dpa,iieu_b --image 32 --classes 100 --figures "$FIG"
# the CUDA path on CPU tensors: what a GPU step launches, moves and calls (Triton launches counted, not run)
export TRITON_INTERPRET=1 ACTLAB_EMULATE_CUDA=1
$PY -m actlab.perf.gpu_cost --model resnet26 --act iieu_b --figures "$FIG"
$PY -m actlab.perf.gpu_cost --model resnet26 --act iieu_dc --figures "$FIG"
$PY -m actlab.perf.gpu_cost --model resnet50 --act dpa --figures "$FIG"
$PY -m actlab.perf.gpu_cost --model vit_tiny --act iieu_b --batch 256 --image 32 --classes 100 --figures "$FIG"
$PY -m actlab.perf.gpu_cost --model vit_tiny --act dpa --batch 256 --image 32 --classes 100 --figures "$FIG"
# the whole-step counts of the GPU speed suite, from which model_speed predicts its GPU steps
$PY -m actlab.perf.gpu_cost --suite gpu --figures "$FIG"
unset TRITON_INTERPRET ACTLAB_EMULATE_CUDA
$PY -m actlab.convert.matrix --figures "$FIG"
