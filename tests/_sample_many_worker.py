"""One process of a multi-process ``sample_many`` run on CPU (gloo collectives), and the tiny test model.

    python tests/_sample_many_worker.py MODEL_DIR OUT COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID

MODEL_DIR holds ``tiny_bundle()`` as the test wrote it: the processes load it instead of initialising the model
themselves (no init program to compile in each).
"""

import sys

import jax
import numpy as np

from tests import _tiny
from varjax.core.model_dir import ModelBundle
from varjax.models.var import VARConfig
from varjax.models.vqvae import VQVAEConfig
from varjax.sampling.var import SampleOptions

CLASSES = np.asarray([3, 7], np.int32)
OPTS = SampleOptions(cfg=1.5, top_k=900, top_p=0.96)


def tiny_bundle() -> ModelBundle:
    """A tiny random model (32px, 4 scales) so the sampler compiles in seconds; the same in every process."""
    pn = (1, 2, 3, 4)
    vae_cfg = VQVAEConfig(vocab_size=32, z_channels=8, ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, using_sa=False,
                          using_mid_sa=False, patch_nums=pn, num_groups=4)
    var_cfg = VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=10, vocab_size=32, Cvae=8, patch_nums=pn,
                        init_head=1.0)
    return ModelBundle("var", vae_cfg, _tiny.vq_params(vae_cfg, seed=0), var_cfg, _tiny.var_params(var_cfg, seed=1))


if __name__ == "__main__":
    model_dir, out, address, n, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    from varjax.core.model_dir import load_model_dir
    from varjax.eval.sample_many import sample_many

    bundle = load_model_dir(model_dir, need_generator=True)
    sample_many(bundle, out, classes=CLASSES, per_class=5, opts=OPTS, seed=0, batch_size=8)
