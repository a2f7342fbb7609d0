"""``trajguard train``: the training commands of several features under one Typer app.

It mounts ``align`` (:mod:`training.finetune.cli`), ``rwi`` and ``qi``
(:mod:`training.rwi.cli`) and ``probe`` (:mod:`training.probes.cli`). It sits above every
feature package, so none of them imports another one just to mount its command.
"""

from __future__ import annotations

import typer

from training.finetune.cli import align
from training.probes.cli import rwi as rwi_probe
from training.rwi.cli import qi, rwi

app = typer.Typer(no_args_is_help=True, help="Safety fine-tuning.")


@app.callback()
def _main() -> None:
    """Safety fine-tuning."""


app.command()(align)
app.command()(rwi)
app.command()(qi)
app.command("probe", help="Fit the RWI probe (same as `trajguard probe rwi`).")(rwi_probe)


if __name__ == "__main__":
    app()
