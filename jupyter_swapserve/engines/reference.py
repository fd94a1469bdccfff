"""The reference engine (``engine: reference``, alias ``transformers``): the package's own
OpenAI-compatible server around torch/transformers, with vLLM's sleep protocol, so the
engine-aware swap path (sleep → checkpoint of the residual → freeze) runs where vLLM does not.

``model`` is a local Hugging Face directory or ``shape:NAME`` (random weights of a known shape,
for benchmarks); ``args`` go to the server (``--gpu-memory-utilization``, ``--compile``,
``--cuda-graphs``, ``--max-model-len``, ``--device``, ...).
"""

from __future__ import annotations

import sys

from .base import EngineAdapter, LaunchSpec, VllmStyleSleepMixin


class ReferenceAdapter(VllmStyleSleepMixin, EngineAdapter):
    name = "reference"
    follows = "this package's reference server (vLLM's /sleep, /wake_up protocol)"

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = [
            sys.executable, "-m", "jupyter_swapserve.reference",
            "--model", self.model.model or "",
            "--served-model-name", self.upstream_model_name(),
            "--uds", self.private_socket(port),
            *self.model.args,
        ]
        # unbuffered, so the log tail shown on failures is current
        return LaunchSpec(argv=argv, port=port, env={"PYTHONUNBUFFERED": "1", **self.model.env},
                          unix_socket=self.private_socket(port))


class TransformersAdapter(ReferenceAdapter):
    """``engine: transformers``: the same server; the name says what loads the weights."""

    name = "transformers"
