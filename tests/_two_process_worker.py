"""Runs ``varjax train`` as one process of a multi-process CPU job (varjax itself selects the gloo CPU
collectives when it starts ``jax.distributed``).

    python tests/_two_process_worker.py --config ... --workdir ... --config.distributed.process_id=I ...
"""

import sys

if __name__ == "__main__":
    from varjax import cli

    cli.main(["train", *sys.argv[1:]])
