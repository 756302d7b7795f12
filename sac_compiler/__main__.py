"""``python -m sac_compiler``: the ``sac-compiler`` command line (``sac_compiler.cli``).

``python -m sac_compiler plan MODULE:FACTORY ...`` plans your own model, ``estimate`` prints its
SAC statistics, and with no subcommand the built-in demo runs: a small GPT-style Transformer
captured on fake tensors and planned for half its saved activations, on any machine in seconds.
"""

from __future__ import annotations

from sac_compiler.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
