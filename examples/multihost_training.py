"""Training on several hosts: one process per host, one mesh over all their devices.

On a cluster, start this script once per host (SLURM, Open MPI and Cloud TPU are detected by
``jax.distributed.initialize``; elsewhere pass the coordinator's address, the number of
processes and this process's index):

    srun python examples/multihost_training.py --checkpoint-dir /shared/ckpt
    python examples/multihost_training.py --coordinator host0:1234 --num-processes 2 \
        --process-id 0 --checkpoint-dir /shared/ckpt          # and --process-id 1 on host1

To try it on one machine, ``--local-processes 2`` starts two processes of 4 simulated CPU
devices each, which talk over localhost with gloo collectives:

    python examples/multihost_training.py --local-processes 2 --checkpoint-dir /tmp/ckpt

Every process runs the same program: it builds the global mesh (processes x local devices),
splits the parameters FSDP-style over all devices (the input axis of each kernel, so the
per-unit sums of ``adam_srt`` cross hosts), feeds its own slice of each batch with
``jax.make_array_from_process_local_data``, checkpoints with ``orbax`` (each host writes its
shards to a directory all hosts share), restores and checks that the resumed run is identical.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def launch_local(args: argparse.Namespace) -> int:
    """Starts ``--local-processes`` copies of this script on this machine; their exit code."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    env["JAX_PLATFORMS"] = "cpu"
    base = [sys.executable, os.path.abspath(__file__), "--coordinator", f"localhost:{port}"]
    base += ["--num-processes", str(args.local_processes), "--steps", str(args.steps)]
    base += ["--checkpoint-dir", args.checkpoint_dir, "--cpu-collectives", "gloo"]
    procs = [
        subprocess.Popen([*base, "--process-id", str(i)], env=env)
        for i in range(args.local_processes)
    ]
    return max(p.wait() for p in procs)


def train(args: argparse.Namespace) -> None:
    import jax

    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    else:
        jax.distributed.initialize()  # cluster environments are detected
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_sphere

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in (64, 64):
                x = nn.Dense(width, use_bias=False)(x)
                x = nn.relu(nn.LayerNorm(use_scale=False, use_bias=False)(x))
            return nn.Dense(10)(x)

    me = jax.process_index()
    mesh = Mesh(np.array(jax.devices()).reshape(jax.process_count(), -1), ("data", "fsdp"))
    every_device = ("data", "fsdp")
    model = Mlp()
    x0 = jnp.zeros((1, 32))
    params = jax.jit(model.init)(jax.random.key(0), x0)["params"]  # the same on every host
    # the groups, measured on the model: each kernel, followed by a LayerNorm, is one group
    groups = optax_sphere.find_groups(model, {"params": params}, x0 + 1.0)
    if me == 0:
        print(groups, flush=True)

    def layout(leaf):  # kernels: input axis over every device; the rest replicated
        if leaf.ndim == 2 and leaf.shape[0] % len(jax.devices()) == 0:
            return NamedSharding(mesh, P(every_device, None))
        return NamedSharding(mesh, P())

    shardings = jax.tree.map(layout, params)
    params = jax.tree.map(
        lambda p, s: jax.make_array_from_callback(p.shape, s, lambda i: np.asarray(p)[i]),
        params,
        shardings,
    )
    tx = optax_sphere.adam_srt(learning_rate=1e-2, weight_decay=1e-4, groups=groups)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch_sharding = NamedSharding(mesh, P(every_device))
    local_rows = 16 * jax.local_device_count()

    def batch(step):  # this host's rows of the global batch of the step
        rng = np.random.default_rng([step, me])
        x = rng.normal(size=(local_rows, 32)).astype(np.float32)
        y = (x[:, :10].argmax(1)).astype(np.int32)
        return (
            jax.make_array_from_process_local_data(batch_sharding, x),
            jax.make_array_from_process_local_data(batch_sharding, y),
        )

    checkpointer = ocp.StandardCheckpointer()
    resume_at = args.steps // 2
    state = (params, opt_state)
    for step in range(args.steps):
        if step == resume_at:
            path = os.path.join(os.path.abspath(args.checkpoint_dir), f"step_{step}")
            checkpointer.save(path, {"params": state[0], "opt_state": state[1]}, force=True)
            checkpointer.wait_until_finished()
            saved = state
        *state, loss = train_step(*state, *batch(step))
    final = state

    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        {"params": saved[0], "opt_state": saved[1]},
    )
    restored = checkpointer.restore(path, target)
    state = (restored["params"], restored["opt_state"])
    for step in range(resume_at, args.steps):
        *state, _ = train_step(*state, *batch(step))
    same = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(multihost_utils.process_allgather(state, tiled=True)),
            jax.tree.leaves(multihost_utils.process_allgather(final, tiled=True)),
        )
    )
    final_loss = float(loss.addressable_shards[0].data)  # replicated: every host has it
    # one write per report: the processes of a local launch share one stdout, and a print
    # writes its text and its newline separately, so two reports could interleave
    verdict = "identical" if same else "DIFFERENT"
    sys.stdout.write(
        f"process {me}: final loss {final_loss:.6f}\n"
        f"process {me}: resumed from step {resume_at}: {verdict}\n"
    )
    sys.stdout.flush()
    multihost_utils.sync_global_devices("done")
    if not same:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-processes", type=int, default=0, help="start N local processes")
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per local process")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--cpu-collectives", default=None, help="gloo for CPU processes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpoint-dir", required=True, help="shared by every host")
    args = parser.parse_args(argv)
    if args.local_processes:
        raise SystemExit(launch_local(args))
    train(args)


if __name__ == "__main__":
    main()
