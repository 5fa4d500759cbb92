"""``bench/cross_compile.py``: compiling the GPU programs without a GPU. The readers of XLA's and
ptxas' dumps run everywhere on canned text; the compile itself needs jaxlib's CUDA plugin (not
a CI dependency) and is skipped without it."""

from __future__ import annotations

import importlib.util

import pytest

from bench import cross_compile as cc

PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'reattention_select' for 'sm_90a'
ptxas info    : Function properties for reattention_select
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 2048 bytes smem
ptxas info    : Compiling entry function 'entry_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for entry_mosaic_gpu_kernel
ptxas warning : Registers are spilled to local memory in function 'entry_mosaic_gpu_kernel', 40 bytes spill stores, 100 bytes spill loads
    40 bytes stack frame, 40 bytes spill stores, 100 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 40 bytes cumulative stack size, 1 bytes smem
"""

THUNKS = """\
001: kCustomKernel [source       | next=002 (1) ] loop_add_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
002: kCustomCall   [prev=001 (1) | next=003 (1) ] kCustomCall
003: kCopy         [prev=002 (1) | next=004 (2) ] kCopy
004: kCustomKernel [prev=003 (1) | sink         ] reattention_select grid: [8, 1, 1] threads: [128, 1, 1]  shared_memory: 2048 bytes
"""

HLO = """\
ENTRY %main.22 (q.1: bf16[1,32,128]) -> bf16[1,32,128] {
  %loop_add_fusion = s32[1,1]{1,0} fusion(%n.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/add" scheduling_name="loop_add_fusion"}
  %mpmd_map.0 = (f32[256,4,128]{2,1,0}) custom-call(%a), custom_call_target="mosaic_gpu_v2", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(f)/jit(_mgpu_score)/entry/mpmd_map"}
}
"""


def test_ptxas_output_is_read_per_kernel():
    a, b = cc.parse_ptxas(PTXAS)
    assert a == {"function": "reattention_select", "stack": 0, "spill_stores": 0,
                 "spill_loads": 0, "registers": 32, "smem": 2048}
    assert b["registers"] == 168 and (b["spill_stores"], b["spill_loads"]) == (40, 100)


SASS = """\
        /*8330*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*8340*/                   MUFU.EX2 R25, R25 ;
        /*8350*/                   STL [R1+0x8], R7 ;
        /*8360*/                   MUFU.EX2 R26, R26 ;
        /*8370*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*8380*/                   MUFU.EX2 R27, R27 ;
        /*8390*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*83a0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*83b0*/                   MUFU.EX2 R28, R28 ;
"""


def test_exponentials_under_the_in_flight_wgmma_are_counted():
    # the second window is what a hoisted wait leaves: nothing runs under P V
    assert cc.wgmma_overlap(SASS) == [{"exp2": 2, "spills": 1}, {"exp2": 0, "spills": 0}]


def test_launches_are_named_by_their_jax_operation():
    seq = cc.launches(THUNKS, cc.op_names(HLO), cc.custom_calls(HLO))
    assert [r["kind"] for r in seq] == ["kCustomKernel", "kCustomCall", "kCopy", "kCustomKernel"]
    assert seq[0] == {"kind": "kCustomKernel", "name": "loop_add_fusion", "grid": [1, 1, 1],
                      "op": "jit(f)/add"}
    assert seq[1]["op"].endswith("_mgpu_score)/entry/mpmd_map")  # the Mosaic GPU call
    assert seq[3]["grid"] == [8, 1, 1] and "op" not in seq[3]


def test_settings_are_parsed_with_their_types():
    assert cc.parse_sets(["mgpu_merge=rows", "mgpu_slots=3", "x=true"]) == {
        "mgpu_merge": "rows", "mgpu_slots": 3, "x": True}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        cc.parse_sets(["mgpu_merge"])


def test_an_unknown_gpu_spec_is_refused():
    with pytest.raises(SystemExit, match="no GPU spec"):
        cc.compile_only_device("b300")


def _has_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


HAS_PLUGIN = _has_plugin()


@pytest.mark.skipif(not HAS_PLUGIN, reason="needs jaxlib's CUDA plugin (pip install --no-deps "
                    "jax-cuda12-plugin jax-cuda12-pjrt of jaxlib's version)")
def test_decode_step_compiles_for_an_h200(tmp_path, capsys):
    """The ReAttention decode step through XLA's GPU compiler and ptxas: every kernel
    compiles, the Mosaic GPU scoring and the Triton selection and attention among them."""
    out = tmp_path / "report.json"
    assert cc.main(["reattention-decode", "--length", "2048", "--kv-heads", "8",
                    "--out", str(out)]) == 0
    import json

    rep = json.loads(out.read_text())
    names = {r["name"] for r in rep["launches"]}
    assert {"reattention_select", "reattention_attend"} <= names
    assert rep["launch_counts"].get("kCustomCall", 0) >= 1  # the Mosaic GPU scoring
    assert rep["kernels"] and all("error" not in k for k in rep["kernels"])
