"""A small OpenAI-compatible inference server around torch (and transformers for real models),
built to be swapped: the reference engine of jupyter-swapserve.

    python -m jupyter_swapserve.reference --model shape:llama-3.1-8b --port 8001 \
        --gpu-memory-utilization 0.4 --compile --cuda-graphs

``--model`` is a local Hugging Face directory (weights loaded with transformers) or
``shape:NAME`` (a randomly initialised Llama of a known shape, bf16, nothing downloaded; a
byte-level tokenizer) for benchmarks where no weights can be fetched.

Its cold start has vLLM's parts: load the weights, size and allocate a KV-cache pool from
``--gpu-memory-utilization`` (util * total - what the process already uses), compile the decode
layer (``--compile``, torch.compile/inductor) and capture the decode step as a CUDA graph
(``--cuda-graphs``). The breakdown is logged (one ``STARTUP_TIMINGS {json}`` line) and served
at ``GET /startup_timings``.

It speaks vLLM's sleep protocol: ``POST /sleep?level=1`` releases the KV pool's device memory
(discarded) at once, then copies the weights to pinned host staging buffers (allocated on the
first sleep, kept across cycles: pinning is slow, copying is not) and releases them; ``level=2``
discards the weights too. Inference never writes the weights, so after the first cycle the host
copy is still exact and a level-1 sleep skips the copy (``--copy-out always`` copies every time).
``POST /wake_up`` maps the memory back and copies the weights in;
``GET /is_sleeping``. ``GET /integrity`` reports what a swap must leave unchanged: a bit-exact
digest of the weights and the logits of a fixed prompt (``--record-integrity`` also keeps the
report taken just before the first sleep, the baseline of the swap tests). The memory is
released either through torch-memory-saver (virtual addresses are kept, so CUDA graphs stay
valid) or with plain torch (storage resized to zero and the cache emptied; graphs are
re-captured when the addresses moved).

Weights live in one flat buffer (every parameter is a view into it), so sleeping and waking are
one device↔host copy each, at PCIe speed.

Requests are served one at a time (the swap service forwards one at a time by default); the
decode step runs batch 1. It also runs on the CPU (``--device cpu``), which is how CI tests it.

The package, by room: ``model`` (shapes and the decoder layer, pure torch), ``tokenizer``,
``memory`` (releasing and re-mapping device memory, sleep and wake), ``engine`` (cold start and
the forward passes), ``server`` (the HTTP API and the command line), ``__main__``.
Nothing here imports the swap service: the engine is a separate program the service launches.
"""
