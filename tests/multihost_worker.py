"""One process of the multi-process test (``test_multihost.py`` starts two).

    python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT_DIR

Each process has 4 simulated CPU devices; together they form one 2 x 4 mesh, process ``i``
holding row ``i``. For every alias of ``test_sharding.ALIASES``, on the tree of
``test_sharding.LEAVES`` (a group axis split over all 8 devices, so per-group sums cross the
processes; units split across the processes; one per-tensor group over every device):

1. the sharded run of 3 steps (in float64, as ``test_sharding``), gathered, equals the
   single-process run that each process computes on its own first device;
2. the run checkpointed with ``orbax`` after 2 steps (both processes write their shards to
   ``CHECKPOINT_DIR``), restored into the same shardings and stepped once equals the
   uninterrupted run bit for bit.

Prints ``ok <alias>`` per alias; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
# the comparisons of test_sharding are exact claims, checked in float64
jax.config.update("jax_enable_x64", True)


def main(coordinator: str, num_processes: int, process_id: int, checkpoint_dir: str) -> None:
    jax.distributed.initialize(coordinator, num_processes, process_id)
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_sharding as ts

    assert jax.process_count() == num_processes and len(jax.devices()) == 4 * num_processes
    mesh = ts._mesh()  # 2 x 4: "data" is the process axis
    assert {d.process_index for d in mesh.devices[process_id]} == {process_id}
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec, _) in ts.LEAVES.items()}
    local = jax.local_devices()[0]

    def gather(tree):
        return jax.tree.map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
        )

    def steps(tx, params, state, start, stop):
        @jax.jit
        def step(params, state, t):
            updates, state = tx.update(ts._gradient(params, t), state, params)
            return optax.apply_updates(params, updates), state

        for t in range(start, stop):
            params, state = step(params, state, np.float32(t))
        return params, state

    checkpointer = ocp.StandardCheckpointer()
    for name in sorted(ts.ALIASES):
        tx = ts._alias(name, groups=ts.GROUPS)
        params = ts._params()

        # the single-process run, on this process's first device only
        mine = jax.device_put(params, local)
        expected = steps(tx, mine, jax.jit(tx.init)(mine), 0, ts.STEPS)

        sharded = {
            k: jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
            for k, v in params.items()
        }
        state0 = tx.init(sharded)
        full = steps(tx, sharded, state0, 0, ts.STEPS)
        ts._assert_close(gather(full[0]), jax.device_get(expected[0]), f"{name} params")
        ts._assert_close(gather(full[1]), jax.device_get(expected[1]), f"{name} state")

        # checkpoint after 2 steps, written by both processes, restored into the same layout
        early = steps(tx, sharded, state0, 0, ts.STEPS - 1)
        path = os.path.join(checkpoint_dir, name)
        checkpointer.save(path, {"params": early[0], "opt_state": early[1]})
        checkpointer.wait_until_finished()
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"params": early[0], "opt_state": early[1]},
        )
        restored = checkpointer.restore(path, target)
        resumed = steps(tx, restored["params"], restored["opt_state"], ts.STEPS - 1, ts.STEPS)
        for a, b in zip(jax.tree.leaves(gather(resumed)), jax.tree.leaves(gather(full))):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: resume differs")
        print(f"ok {name}", flush=True)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
