"""Runs ``varjax train`` as one process of a multi-process CPU job (CPU collectives over gloo).

    python tests/_two_process_worker.py --config ... --workdir ... --config.distributed.process_id=I ...
"""

import sys

import jax

if __name__ == "__main__":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from varjax.train.var_trainer import run_cli

    run_cli(["varjax train"] + sys.argv[1:])
