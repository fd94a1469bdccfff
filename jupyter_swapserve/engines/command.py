"""Any OpenAI-compatible server given its command line (``{port}``, ``{host}``, ``{model}``,
``{python}`` (this interpreter) and ``{socket}`` substituted).

``{socket}``: a command line that names it has its server listen on that Unix socket, in the
service's owner-only directory, instead of a TCP port: ``port`` is then the engine's gate
(runtime/gate.py), as for vLLM, llama.cpp and the reference engine, so only the service's own user
reaches the engine. Without it the server listens on ``{host}:{port}``, which every local user can
reach (docs/security.md)."""

from __future__ import annotations

import shlex
import string
import sys

from .base import EngineAdapter, EngineError, LaunchSpec


class CommandAdapter(EngineAdapter):
    name = "command"

    def launch_spec(self, port: int) -> LaunchSpec:
        command = self.model.command
        argv = shlex.split(command) if isinstance(command, str) else list(command or [])
        if not argv:
            raise EngineError("field 'command' is empty")
        values = {"port": str(port), "host": self.bind_host, "model": self.model.model or "", "python": sys.executable,
                  "socket": self.private_socket(port)}
        try:
            on_socket = any(name == "socket" for part in argv for _, name, _, _ in string.Formatter().parse(part))
            argv = [part.format(**values) for part in argv] + list(self.model.args)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise EngineError(f"field 'command': bad placeholder {exc}") from None
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env),
                          unix_socket=values["socket"] if on_socket else None)
