"""`python -m eval.lmeval ARGS`: lm-evaluation-harness's own command line (`lm_eval ARGS`, every flag as the
harness documents it) with the `needles` backend registered, e.g.

    python -m eval.lmeval --model needles --model_args pretrained=runs/s0,batch_size=8 --tasks hellaswag

lm-evaluation-harness 0.4.13 discovers no plugins (no entry points): its registry holds its own backends
and whatever code imported before the run registers, so the plain `lm_eval` command cannot know `needles`.
This module imports `eval.lmeval_backend` (which registers it) and hands over to the harness's CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import eval.lmeval_backend  # noqa: F401  registers "needles"

    if argv is not None:   # the harness's parser reads sys.argv itself
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
