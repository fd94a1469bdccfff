"""Any OpenAI-compatible server given its command line (``{port}``, ``{host}``, ``{model}``,
``{python}`` (this interpreter) substituted)."""

from __future__ import annotations

import shlex
import sys

from .base import EngineAdapter, EngineError, LaunchSpec


class CommandAdapter(EngineAdapter):
    name = "command"

    def launch_spec(self, port: int) -> LaunchSpec:
        command = self.model.command
        argv = shlex.split(command) if isinstance(command, str) else list(command or [])
        if not argv:
            raise EngineError("field 'command' is empty")
        values = {"port": str(port), "host": self.bind_host, "model": self.model.model or "", "python": sys.executable}
        try:
            argv = [part.format(**values) for part in argv] + list(self.model.args)
        except (KeyError, IndexError, ValueError) as exc:
            raise EngineError(f"field 'command': bad placeholder {exc}") from None
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env))
