"""Performance tools: the activation micro-benchmarks (``speed``), whole-model training steps
(``model_speed``), the training harness against a plain loop (``overhead``), compile time
(``compile_time``) and the GPU cost model (``gpu_cost``). Each is run as ``python -m actlab.perf.NAME``
and states the machine it ran on (``actlab.machine``)."""
