"""Compile the library's GPU programs for an H100 or H200 on a machine without a GPU.

    PYTHONPATH=. python bench/cross_compile.py reattention --length 32768 --kv-heads 32
    PYTHONPATH=. python bench/cross_compile.py reattention --set mgpu_merge=rows
    PYTHONPATH=. python bench/cross_compile.py reattention-decode --length 16384 --kv-heads 8
    PYTHONPATH=. python bench/cross_compile.py decode-step --attention cca --context 131072
    PYTHONPATH=. python bench/cross_compile.py cca --length 131072       # forward + backward
    PYTHONPATH=. python bench/cross_compile.py prefill --attention cca --length 32768 --layers 2

XLA compiles for a GPU described by a target config (``bench/gpu_specs/*.txtpb``) through a
compile-only device, and Mosaic GPU and Triton kernels go through ptxas as they would on the
GPU. Nothing runs. Reports what a GPU call would otherwise be spent finding out:

* whether every kernel compiles (a Mosaic GPU or ptxas error surfaces here);
* the launch sequence (XLA's thunk sequence): every kernel, copy and custom call of one call
  of the program, named by the jax operation it came from;
* registers, spills and shared memory of every kernel (``ptxas -v`` on the PTX that XLA and
  Mosaic GPU wrote), and the program's device memory.

Needs the CUDA plugin of the installed jaxlib, without its CUDA libraries::

    pip install --no-deps jax-cuda12-plugin==$V jax-cuda12-pjrt==$V   # V: jaxlib's version

and a ``ptxas`` (CUDA's, or the one Triton's wheel carries; ``--ptxas``). The environment
variable ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK`` is set here, before jax is imported, so that the
plugin loads without a driver. Trace-time checks that look for a GPU (``jax.default_backend``,
``pallas_mgpu.available``) are answered as on a Hopper GPU while the program is traced.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

SPECS = Path(__file__).resolve().parent / "gpu_specs"
CUDNN_VERSION = 90800  # the specs' dnn_version_info, as cuDNN's version number


def compile_only_device(target: str):
    """A device of the CUDA plugin that compiles for ``target`` (a spec name or file)."""
    from jax.experimental import topologies

    path = Path(target) if target.endswith(".txtpb") else SPECS / f"{target}.txtpb"
    if not path.is_file():
        known = sorted(p.stem for p in SPECS.glob("*.txtpb"))
        raise SystemExit(f"no GPU spec {path}; known: {known}")
    try:
        topology = topologies.get_topology_desc("cross", "cuda", target_config=path.read_text(),
                                                topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        v = jax.lib.__version__
        raise SystemExit(
            f"cannot make a compile-only CUDA device ({e}). Install the CUDA plugin of jaxlib "
            f"{v}: pip install --no-deps jax-cuda12-plugin=={v} jax-cuda12-pjrt=={v}") from e
    return topology.devices[0]


@contextlib.contextmanager
def as_on_hopper():
    """Trace-time GPU checks answer as on a Hopper GPU; restored afterwards."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from kernels.cca import pallas_mgpu

    saved = jax.default_backend, pallas_mgpu.available, cudnn_attention.check_cudnn_version
    jax.default_backend = lambda: "gpu"
    pallas_mgpu.available = lambda: True
    cudnn_attention.check_cudnn_version = lambda: CUDNN_VERSION
    try:
        yield
    finally:
        (jax.default_backend, pallas_mgpu.available,
         cudnn_attention.check_cudnn_version) = saved


def compile_program(fn, args, device, dump: Path, options: dict | None = None):
    """Compiles jit(fn)(*args) with XLA's and Mosaic GPU's dumps written under ``dump``."""
    (dump / "xla").mkdir(parents=True, exist_ok=True)
    (dump / "mosaic").mkdir(parents=True, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_TO"] = str(dump / "mosaic")
    os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"
    opts = {"xla_dump_to": str(dump / "xla"), "xla_dump_hlo_pass_re": "NONE"}
    if tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11):
        opts["xla_dump_emitter_re"] = ".*"  # XLA writes the kernels' PTX only when asked
    opts.update(options or {})
    t0 = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)  # keep a jit's donations
    with as_on_hopper(), jax.default_device(device):  # jax 0.11's Triton lowering asks it
        lowered = jitted.lower(*args)
    compiled = lowered.compile(compiler_options=opts)
    return compiled, time.perf_counter() - t0


# --- reading the dumps -----------------------------------------------------------------------

def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the jax operation it came from (metadata op_name), optimized HLO."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def custom_calls(hlo_text: str) -> list[str]:
    """op_name of each Mosaic GPU custom call of the entry computation, in schedule order."""
    starts = [m.start() for m in re.finditer(r"^ENTRY ", hlo_text, re.M)]
    entry = hlo_text[starts[-1]:] if starts else ""
    return [m.group(1) for m in re.finditer(
        r"custom_call_target=\"mosaic_gpu[\w]*\".*?op_name=\"([^\"]*)\"", entry)]


def launches(thunks: str, names: dict[str, str], mosaic: list[str]) -> list[dict]:
    """The thunk sequence as records: kind, kernel name, grid, the jax op it came from."""
    out, mosaic = [], list(mosaic)
    for line in thunks.splitlines():
        m = re.match(r"\s*\d+: (k\w+)\s+\[[^\]]*\]\s+(\S+)(?: grid: \[([\d, ]+)\])?", line)
        if not m:
            continue
        kind, name, grid = m.group(1), m.group(2), m.group(3)
        rec = {"kind": kind, "name": name}
        if grid:
            rec["grid"] = [int(x) for x in grid.split(",")]
        if kind == "kCustomCall" and mosaic:
            rec["op"] = mosaic.pop(0)
        elif name in names:
            rec["op"] = names[name]
        out.append(rec)
    return out


PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'")
PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[dict]:
    """``ptxas -v`` output -> one record per entry function."""
    out, cur = [], None
    for line in text.splitlines():
        if m := PTXAS_FUNC.search(line):
            cur = {"function": m.group(1)}
            out.append(cur)
        elif cur is not None:
            if m := PTXAS_SPILL.search(line):
                cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
            if m := PTXAS_USED.search(line):
                cur["registers"] = int(m.group(1))
                if s := PTXAS_SMEM.search(line):
                    cur["smem"] = int(s.group(1))
    return out


def find_ptxas(given: str | None) -> str:
    for cand in (given, os.environ.get("MOSAIC_GPU_CUDA_ROOT", "") + "/bin/ptxas",
                 shutil.which("ptxas")):
        if cand and Path(cand).is_file():
            return cand
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
        if cand.is_file():
            return str(cand)
    except ImportError:
        pass
    raise SystemExit("no ptxas found: pass --ptxas, put CUDA's on PATH, or install triton")


def wgmma_overlap(sass: str) -> list[dict]:
    """Per window from a wait that leaves one wgmma group in flight (``WARPGROUP.DEPBAR.LE
    gsb0, 0x1``) to the next wait for all (``0x0``): the exponentials and spill accesses in it.
    In the pipelined attention step the window is the softmax that runs under ``P V``: ptxas
    may hoist the second wait to the first and leave it empty."""
    out, cur = [], None
    for line in sass.splitlines():
        if "DEPBAR.LE gsb0, 0x1" in line:
            cur = {"exp2": 0, "spills": 0}
        elif cur is not None:
            if "MUFU.EX2" in line:
                cur["exp2"] += 1
            elif re.search(r"\b(LDL|STL)\b", line):
                cur["spills"] += 1
            elif "DEPBAR.LE gsb0, 0x0" in line:
                out.append(cur)
                cur = None
    return out


def find_nvdisasm(ptxas: str) -> str | None:
    """Next to ptxas, on PATH, or the one Triton's wheel carries (it reads sm_90a cubins that
    a newer ptxas wrote)."""
    cands = [Path(ptxas).with_name("nvdisasm"), shutil.which("nvdisasm")]
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm")
    except ImportError:
        pass
    return next((str(c) for c in cands if c and Path(c).is_file()), None)


def kernel_resources(dump: Path, ptxas: str) -> list[dict]:
    """Registers, spills and shared memory of every kernel in the dumped PTX (sm_90a); for
    Mosaic GPU kernels with wgmma waits, where an ``nvdisasm`` is found (next to ptxas, or on
    PATH), also :func:`wgmma_overlap` of their SASS."""
    out = []
    nvdisasm = find_nvdisasm(ptxas)
    files = sorted((dump / "xla").glob("*.ptx")) + sorted((dump / "mosaic").glob("*.ptx"))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"  # each file's, read by nvdisasm before the next
        for ptx in files:
            if not ptx.stat().st_size:  # a module without kernels
                continue
            res = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                                 capture_output=True, text=True)
            if res.returncode:
                out.append({"file": ptx.name, "error": res.stderr.strip()[-800:]})
                continue
            overlap = None
            if (ptx.parent.name == "mosaic" and nvdisasm
                    and "wgmma.wait_group.sync.aligned 1" in ptx.read_text()):
                sass = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True)
                overlap = wgmma_overlap(sass.stdout)
            for rec in parse_ptxas(res.stdout + res.stderr):
                rec["file"] = ptx.name
                if ptx.parent.name == "mosaic":
                    rec["source"] = mosaic_source(ptx.with_suffix(".mlir-passes.log"))
                    if overlap is not None:
                        rec["wgmma_overlap"] = overlap
                out.append(rec)
    return out


def mosaic_source(log: Path) -> str:
    """The kernel's Python file, read off the locations of its MLIR (the most named one)."""
    if not log.is_file():
        return "?"
    counts = collections.Counter(re.findall(r'loc\("([^":]+\.py)', log.read_text(errors="replace")))
    own = [(n, f) for f, n in counts.items() if "/site-packages/" not in f]
    return Path(max(own)[1]).name if own else "?"


# --- programs --------------------------------------------------------------------------------

def bf16(shape, sharding):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--set takes NAME=VALUE; got {item!r}")
        out[name] = int(value) if value.lstrip("-").isdigit() else (
            value.lower() == "true" if value.lower() in ("true", "false") else value)
    return out


def reattention_program(args, sharding):
    from kernels.reattention import pallas
    from kernels.reattention.params import default_config

    d = args.head_dim
    config = default_config(d, 2, 512 * args.heads // args.kv_heads)
    config = dataclasses.replace(config, **parse_sets(args.set))
    q = bf16((args.batch, args.length, args.heads, d), sharding)
    k = bf16((args.batch, args.length, args.kv_heads, d), sharding)
    picks = dict(key_block=args.key_block, span=args.key_block) if args.key_block > 1 else {}
    return (lambda q, k, v: pallas.reattention(q, k, v, config=config, interpret=False,
                                               **picks)), (q, k, k)


def reattention_decode_program(args, sharding):
    from kernels.reattention import pallas
    from kernels.reattention.params import default_config

    d = args.head_dim
    config = dataclasses.replace(default_config(d, 2, 1), **parse_sets(args.set))
    q = bf16((args.batch, args.heads, d), sharding)
    k = bf16((args.batch, args.length, args.kv_heads, d), sharding)
    n = jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=sharding)
    fn = lambda q, k, v, n: pallas.reattention_decode(q, k, v, n, config=config, interpret=False)
    return fn, (q, k, k, n)


def decode_step_program(args, sharding):
    """One decode step of the LLaMA-2-7B-shaped model (bench_decode's), abstract weights."""
    from bench.bench_decode import base_config, decode_fn, graphdef_of, random_state
    from jax_cca.cache import init_cache

    config = dataclasses.replace(base_config(False, args.context + 64), attention=args.attention,
                                 num_layers=args.layers)
    graphdef = graphdef_of(config)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    state = jax.tree_util.tree_map(place, jax.eval_shape(lambda: random_state(config)))

    def make_cache():
        cache = init_cache(config, args.batch, args.context + 64)
        return tuple(c.replace(lengths=jnp.full((args.batch,), args.context, jnp.int32))
                     for c in cache)

    cache = jax.tree_util.tree_map(place, jax.eval_shape(make_cache))
    tokens = jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=sharding)
    return decode_fn(graphdef), (state, tokens, cache)


def cca_program(args, sharding):
    """``jax_cca.ops.cca_attention`` forward and backward (the training path), LLaMA shapes,
    the model's defaults (g = 16, w = 1024), implementation "pallas" (as on a GPU)."""
    from jax_cca import ops

    q = bf16((args.batch, args.length, args.heads, args.head_dim), sharding)
    k = bf16((args.batch, args.length, args.kv_heads, args.head_dim), sharding)

    def fwd_bwd(q, k, v):
        def loss(q, k, v):
            out = ops.cca_attention(q, k, v, implementation="pallas")
            return jnp.sum(out.astype(jnp.float32) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    return fwd_bwd, (q, k, k)


def prefill_program(args, sharding):
    """The model's prefill (``cached_forward(prefill=True)``) of a --length prompt into a new
    cache, LLaMA-2-7B shapes (bench_decode's), abstract weights, --layers layers."""
    from bench.bench_decode import base_config, graphdef_of, prefill_fn, random_state
    from jax_cca.cache import init_cache

    config = dataclasses.replace(base_config(False, args.length), attention=args.attention,
                                 num_layers=args.layers)
    graphdef = graphdef_of(config)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    state = jax.tree_util.tree_map(place, jax.eval_shape(lambda: random_state(config)))
    cache = jax.tree_util.tree_map(place, jax.eval_shape(
        lambda: init_cache(config, args.batch, args.length)))
    ids = jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32, sharding=sharding)
    lengths = jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=sharding)
    return prefill_fn(graphdef), (state, ids, lengths, cache)


PROGRAMS = {"reattention": reattention_program, "reattention-decode": reattention_decode_program,
            "decode-step": decode_step_program, "cca": cca_program, "prefill": prefill_program}


def report(program: str, compiled, seconds: float, dump: Path, ptxas: str) -> dict:
    xla = dump / "xla"
    hlo = next(iter(sorted(xla.glob("*gpu_after_optimizations.txt"))), None)
    thunks = next(iter(sorted(xla.glob("*.thunk_sequence.txt"))), None)
    hlo_text = hlo.read_text() if hlo else ""
    seq = launches(thunks.read_text() if thunks else "", op_names(hlo_text), custom_calls(hlo_text))
    mem = compiled.memory_analysis()
    memory = None if mem is None else {
        k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                          "temp_size_in_bytes", "alias_size_in_bytes")}
    return {"program": program, "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "compile_s": round(seconds, 2), "memory": memory,
            "launch_counts": dict(collections.Counter(r["kind"] for r in seq)),
            "launches": seq, "kernels": kernel_resources(dump, ptxas)}


def print_report(rep: dict) -> None:
    print(f"{rep['program']}: compiled in {rep['compile_s']} s (jax {rep['jax']}); "
          f"launches {rep['launch_counts']}; memory {rep['memory']}")
    for i, r in enumerate(rep["launches"]):
        grid = "x".join(map(str, r.get("grid", [])))
        print(f"  {i:3d} {r['kind']:14s} {r['name'][:34]:34s} {grid:>12s}  {r.get('op', '')[-70:]}")
    print("kernels (ptxas -v, sm_90a):")
    for k in rep["kernels"]:
        if "error" in k:
            print(f"  {k['file']}: PTXAS ERROR {k['error']}")
            continue
        spill = k.get("spill_stores", 0) + k.get("spill_loads", 0)
        src = f" [{k['source']}]" if "source" in k else ""
        print(f"  {k['function'][:40]:40s}{src:28s} regs {k.get('registers', '?'):>3}  "
              f"spill st/ld {k.get('spill_stores', 0)}/{k.get('spill_loads', 0)}"
              f"{'  <-- SPILLS' if spill else ''}")
        if "wgmma_overlap" in k:
            print("    exp2 (spills) under the in-flight wgmma, per window: "
                  + ", ".join(f"{w['exp2']} ({w['spills']})" for w in k["wgmma_overlap"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("program", choices=sorted(PROGRAMS))
    ap.add_argument("--target", default="h200", help="bench/gpu_specs/<name>.txtpb, or a path")
    ap.add_argument("--length", type=int, default=32768,
                    help="tokens (ReAttention, cca, prefill)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128, help="ReAttention and cca programs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--key-block", type=int, default=1,
                    help="reattention: block picks of this many keys (span the same); 1: tokens")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a ReAttention Config field (e.g. mgpu_merge=rows)")
    ap.add_argument("--attention", default="cca",
                    help="decode-step, prefill: cca, full or reattention")
    ap.add_argument("--context", type=int, default=131072, help="decode-step: tokens held")
    ap.add_argument("--layers", type=int, default=32, help="decode-step, prefill: model layers")
    ap.add_argument("--xla", action="append", default=[], metavar="OPTION=VALUE",
                    help="an XLA compiler option")
    ap.add_argument("--ptxas", default=None)
    ap.add_argument("--dump", default=None, help="keep the dumps here (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the report as JSON")
    args = ap.parse_args(argv)

    ptxas = find_ptxas(args.ptxas)
    device = compile_only_device(args.target)
    sharding = jax.sharding.SingleDeviceSharding(device)
    fn, fn_args = PROGRAMS[args.program](args, sharding)
    with contextlib.ExitStack() as stack:
        dump = Path(args.dump) if args.dump else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="cross_compile_")))
        compiled, seconds = compile_program(fn, fn_args, device, dump, parse_sets(args.xla))
        rep = report(args.program, compiled, seconds, dump, ptxas)
    rep["args"] = vars(args)
    print_report(rep)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
