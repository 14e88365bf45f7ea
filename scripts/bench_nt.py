#!/usr/bin/env python
"""neural-tangents timings for the kernel benchmark, run in its own (JAX) environment.

``scripts/bench_ntk.py`` calls this script with the interpreter of a virtual environment
holding ``jax``, ``jaxlib`` and ``neural-tangents`` and reads one JSON line from stdout:
``{"case": ..., "mode": ..., "implementation": ..., "seconds": median, "jax": version,
"neural_tangents": version}``. The architectures match the PyTorch cases exactly (layer
sizes, 3x3 SAME convolutions, ReLU, flatten, standard parameterisation); the input is
NHWC, as stax expects. Timings exclude compilation (one untimed warm-up call) and block
until the result is ready.

    /tmp/nt-venv/bin/python scripts/bench_nt.py --case mlp --n 128 --mode full
"""

import argparse
import json
import statistics
import time


def build(case: str, n: int):
    from neural_tangents import stax

    if case == "mlp":
        layers = [stax.Dense(512, parameterization="standard"), stax.Relu(),
                  stax.Dense(512, parameterization="standard"), stax.Relu(),
                  stax.Dense(10, parameterization="standard")]
        shape = (n, 784)
    elif case == "cnn":
        layers = [stax.Conv(32, (3, 3), padding="SAME", parameterization="standard"), stax.Relu(),
                  stax.Conv(64, (3, 3), padding="SAME", parameterization="standard"), stax.Relu(),
                  stax.Flatten(), stax.Dense(10, parameterization="standard")]
        shape = (n, 16, 16, 3)
    else:
        raise SystemExit(f"unknown case {case!r}; expected mlp or cnn")
    return stax.serial(*layers), shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", required=True, choices=["mlp", "cnn"])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--mode", required=True, choices=["full", "trace"])
    parser.add_argument("--implementation", default="structured",
                        choices=["jacobian", "ntk_vp", "structured", "auto"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import neural_tangents as nt

    (init_fn, apply_fn, _), shape = build(args.case, args.n)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape)
    _, params = init_fn(key, shape)
    implementation = {
        "jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION,
        "ntk_vp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
        "structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
        "auto": nt.NtkImplementation.AUTO,
    }[args.implementation]
    kernel_fn = jax.jit(nt.empirical_ntk_fn(
        apply_fn, trace_axes=(-1,) if args.mode == "trace" else (), vmap_axes=0,
        implementation=implementation,
    ))
    kernel_fn(x, None, params).block_until_ready()  # compile
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        kernel_fn(x, None, params).block_until_ready()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({
        "case": args.case, "mode": args.mode, "implementation": args.implementation,
        "seconds": statistics.median(seconds), "jax": jax.__version__,
        "neural_tangents": getattr(nt, "__version__", "unknown"),
    }))


if __name__ == "__main__":
    main()
