"""The Triton backend's own parts: launch plans and tuning, the sm_90 machine code, and the GPU runs.

What every backend shares (values and gradients against the oracle, layouts, dtypes, autograd,
torch.compile) is in ``test_loss_backends.py``. Without CUDA the kernels run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), float32 and small shapes (16-bit
short rows too: their gradients take another permutation); the rest of bf16/fp16, CUDA graphs,
Inductor and B = 2^24 are marked ``gpu`` and run in ``make gpu-check``.
Tolerances: ``tests/loss_cases.py``.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from loss_cases import CONFIGS, EPS_KINDS, assert_close, check, compile_matches_eager, make_inputs, oracle, run
from nla_fast.loss import nla_loss
from nla_fast.reference import nla_loss_reference


def test_small_batches_are_one_launch_with_a_fixed_config_and_nothing_is_tuned_here():
    """B * BLOCK_C <= 4096 is one program whose config depends on B and C only (same loss bits in
    every process); the interpreter and the CPU never autotune."""
    from nla_fast.kernels import launch

    assert launch.fixed_config(32, 8) == launch.Config(32, 1, 1)  # the trainer's batch: one warp, one tile
    assert launch.fixed_config(512, 8).block_b == 512 and launch.is_single_program(512, 8)
    assert not launch.is_single_program(513, 8)  # from 513 rows: the large-batch heuristic
    assert launch.fixed_config(513, 8, 2) == launch.fixed_config(2**20, 8, 2) != launch.fixed_config(513, 8, 4)
    assert not launch.may_tune(torch.device("cpu")) and not launch.tunable_device(torch.device("cpu"))
    z, zf, y = make_inputs(2600, 7, seed=25)
    run("triton", z, zf, y, 0.37, CONFIGS["paper"])
    assert launch._tuned == {}


def test_large_batches_without_the_weights():
    """A call without the weights launches another kernel (the 64-register configs: the one
    that carries the bandwidth, ``launch.capped``) than ``check``'s: values and gradients against
    the oracle over full tiles and a partial one, every kind of eps, both consistency terms."""
    from nla_fast.kernels import launch

    z, zf, y = make_inputs(1000, 7, seed=32)  # float32: tiles of 256 rows, the last one partial
    for i, name in enumerate(("paper", "official", "paper-jsd")):
        check("triton", z, zf, y, EPS_KINDS[i], CONFIGS[name], weights=False)
    flags = dict(JSD=False, FLAT_ROWS=True, WRITE_W=False)
    assert launch.capped(flags) and not launch.capped(dict(flags, WRITE_W=True))
    assert not launch.capped(dict(flags, JSD=True)) and not launch.capped(dict(flags, FLAT_ROWS=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,classes", [(33, 7), (256, 5), (70, 3), (2 * 1024 + 5, 7)])
def test_16_bit_short_rows_in_the_interpreter(dtype, batch, classes):
    """16-bit gradients leave through the column-major permutation (``_flat_rows``): one
    program's partial tile and full one, flat rows spanning two and three rows (C = 5 in slots
    of 8), C = 3 in slots of 4, and 1024-row tiles (the large-batch config: two full, one
    partial), with and without the weights (two kinds of kernel), against the oracle."""
    for i, name in enumerate(("paper", "official-jsd")):
        z, zf, y = make_inputs(batch, classes, dtype=dtype, seed=50 + i)
        check("triton", z, zf, y, EPS_KINDS[i + 1], CONFIGS[name], weights=bool(i))


def test_strided_logits_are_planned_per_stride_pattern(monkeypatch):
    """A compiled kernel is specialised on its stride arguments (1, multiples of 16) and a
    remembered plan is launched as compiled: two strided layouts of one (B, C) get a plan each,
    and both give the oracle's values."""
    from nla_fast.kernels import launch

    monkeypatch.setattr(launch, "_plans", {})
    z, zf, y = make_inputs(40, 7, seed=31)
    ref_loss, ref_gz, ref_gzf, ref_w = oracle(z, zf, y, 0.37, CONFIGS["paper"])
    for layout in ("transposed", "sliced"):
        if layout == "transposed":  # strides (1, 40)
            bases = [v.t().contiguous().requires_grad_() for v in (z, zf)]
            a, b = (base.t() for base in bases)
        else:  # strides (16, 1)
            bases = [torch.cat([v, torch.zeros(40, 9)], 1).requires_grad_() for v in (z, zf)]
            a, b = (base[:, :7] for base in bases)
        assert not a.is_contiguous() and not b.is_contiguous()
        loss, w = nla_loss(a, b, y, 0.37, CONFIGS["paper"], backend="triton", validate=False, return_weights=True)
        loss.backward()
        grads = [base.grad.t() if layout == "transposed" else base.grad[:, :7] for base in bases]
        assert_close(loss, ref_loss, 2e-5, what=f"{layout} loss")
        assert_close(w, ref_w, 2e-5, 1e-6, f"{layout} weights")
        assert_close(grads[0], ref_gz, 2e-5, 1e-7, f"{layout} d/dlogits")
        assert_close(grads[1], ref_gzf, 2e-5, 1e-7, f"{layout} d/dlogits_flip")
    assert len(launch._plans) == 2


def test_strided_views_whose_tile_is_not_32_bit_addressable_are_copied():
    """Strided short rows are addressed by 32-bit offsets within a tile: a view whose tile could
    span 2^31 elements is made contiguous first; others are used as they are (meta tensors: no
    memory)."""
    from nla_fast.kernels import launch

    small = torch.empty(64, 7, device="meta").t().contiguous().t()
    assert launch._tile_addressable(small, 7) is small
    huge = torch.empty(8, 2**20, device="meta")[:, :7]  # a tile of 4096 rows spans ~2^32 elements
    copied = launch._tile_addressable(huge, 7)
    assert copied is not huge and copied.is_contiguous() and copied.shape == huge.shape
    wide = torch.empty(8, 2**20, device="meta")[:, :100]  # wide rows keep 64-bit offsets
    assert launch._tile_addressable(wide, 100) is wide


def _stand_in_tuning(monkeypatch, times):
    """Tuning as on a GPU, with the interpreted kernel: candidate i 'takes' times[i] ms (None: it
    spills); every timed candidate is launched for real, so its outputs are checked too."""
    from nla_fast.kernels import launch

    timed = []

    def time_candidate(config, flags, args_for, batch, device):
        index = launch.tuning_candidates(flags["BLOCK_C"], 4, cap=launch.capped(flags)).index(config)  # float32
        timed.append((config, flags["GRAD_Z"]))
        kwargs = launch._config_kwargs(flags, config)
        grid = launch.grid_size(batch, device, config, 1)
        launch._nla_fwd_kernel[(grid,)](*args_for(grid), **kwargs)
        return times[index]

    allowed = {"now": True}
    monkeypatch.setattr(launch, "tunable_device", lambda device: True)
    monkeypatch.setattr(launch, "may_tune", lambda device: allowed["now"])
    monkeypatch.setattr(launch, "time_candidate", time_candidate)
    monkeypatch.setattr(launch, "_tuned", {})
    monkeypatch.setattr(launch, "_plans", {})
    return launch, timed, allowed


@pytest.mark.parametrize("which", [1, -1])
def test_tuning_picks_the_fastest_non_spilling_candidate_once_per_kind_of_call(monkeypatch, which):
    """The GPU-only tuning path, its Python side: the fastest candidate that does not spill wins
    (the spilling one is faster and still loses), the choice is remembered per kind of call, and
    a forward-only call is tuned apart from a forward + backward one (their kernels differ)."""
    from nla_fast.kernels import launch as module

    candidates = module.tuning_candidates(8, 4, cap=False)  # check() asks for the weights too
    assert len(candidates) == len(module.tuning_candidates(8, 4, cap=True))  # (the forward-only call's)
    times = [5.0] * len(candidates)
    times[which] = 1.0
    times[0] = None  # "spills": never chosen, although it would be timed as fastest
    launch, timed, _ = _stand_in_tuning(monkeypatch, times)
    z, zf, y = make_inputs(1000, 7, seed=26)
    for _ in range(2):
        check("triton", z, zf, y, 0.37, CONFIGS["paper"])
    assert len(timed) == len(candidates)  # tuned once, then remembered
    assert list(launch._tuned.values()) == [candidates[which]]
    with torch.no_grad():  # another kind of call: tuned for itself
        loss = nla_loss(z, zf, y, 0.37, CONFIGS["paper"], backend="triton", validate=False)
    assert len(timed) == 2 * len(candidates) and [g for _, g in timed[len(candidates):]] == [False] * len(candidates)
    ref_loss = oracle(z, zf, y, 0.37, CONFIGS["paper"])[0]
    assert_close(loss, ref_loss, 2e-5)


def test_a_plan_made_where_tuning_is_impossible_is_not_remembered(monkeypatch):
    """Under capture or tracing nothing is timed: the heuristic config runs, and the next eager
    call (where timing is allowed) still tunes."""
    launch, timed, allowed = _stand_in_tuning(monkeypatch, [1.0] * 16)
    z, zf, y = make_inputs(1000, 7, seed=27)
    allowed["now"] = False
    check("triton", z, zf, y, 0.37, CONFIGS["paper"])
    assert timed == [] and launch._plans == {}
    allowed["now"] = True
    check("triton", z, zf, y, 0.37, CONFIGS["paper"])
    assert len(timed) == len(launch.tuning_candidates(8, 4, cap=False)) and len(launch._plans) == 1


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys, triton
    from triton.backends.compiler import GPUTarget
    from nla_fast.kernels.nla_loss import _nla_fwd_kernel as kernel

    # Scalars typed as Inductor passes them: Python floats as fp64, sizes and strides as i64.
    case = json.loads(sys.argv[1])
    signature, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + {"y_ptr": "i64", "loss_ptr": "fp32", "w_ptr": "fp32",
                                     "eps_ptr": "fp32"}.get(name, case["dtype"])
            attrs[(index,)] = [["tt.divisibility", 16]]  # what the launcher says of aligned tensors
        elif name in ("B", "C") or name.startswith("stride"):
            signature[name] = "i64"
        else:
            signature[name] = "fp64"
    constexprs = {k: v for k, v in case["constexprs"].items() if k in signature}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=case["num_warps"], num_stages=1))
    print(json.dumps({"ttgir": compiled.asm["ttgir"], "ptx": compiled.asm["ptx"]}))
    """
)

_FLAGS = dict(C=7, EPS_FROM_PTR=False, HAS_FLIP=True, JSD=False, REG_MEAN=False, WRITE_LOSS=True, GRAD_Z=True,
              GRAD_ZF=True, WRITE_W=True, FLAT_ROWS=True, BLOCK_B=512, BLOCK_C=8, FAST_MATH=True)


def _compile_for_sm90(dtype, num_warps=8, **flags):
    """Compile the forward kernel for an sm_90 target in a subprocess WITHOUT the interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 in this process): what Inductor does on a GPU."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    case = json.dumps({"dtype": dtype, "num_warps": num_warps, "constexprs": {**_FLAGS, **flags}})
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, case], env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip(f"no ptxas for a CUDA compile here: {done.stderr[-300:]}")
    assert done.returncode == 0, f"sm_90 compile of _nla_fwd_kernel failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "dtype,flags",
    [
        ("fp32", dict(JSD=True, REG_MEAN=True, EPS_FROM_PTR=True, FLAT_ROWS=False, BLOCK_B=4, BLOCK_C=1024,
                      C=1000)),
        ("fp16", dict(HAS_FLIP=False, WRITE_LOSS=False, GRAD_Z=False, GRAD_ZF=False, C=8)),
        # C a power of two with gradients (FERPlus's 8 classes): no permutation to compile
        ("bf16", dict(C=8, BLOCK_C=8)),
    ],
)
def test_kernel_compiles_for_sm90_with_fp64_scalars(dtype, flags):
    """Would have caught the Inductor fault on the CPU: the kernel compiled to PTX for sm_90 with
    fp64 float scalars and i64 sizes ('Loop-carried variable acc ... re-assigned to fp64' before)."""
    compiled = _compile_for_sm90(dtype, **flags)
    assert ".entry _nla_fwd_kernel" in compiled["ptx"]


def test_flat_path_compiles_for_sm90_row_per_thread_with_vector_stores():
    """The trainer's flat path, eps by value (the fault of the first GPU run), compiled with fp64
    scalars; and the bandwidth design as compiled (sm_90, bf16, C = 7): whole rows in one thread
    (no shuffles in the row reductions), gradients stored as 16-byte vectors."""
    compiled = _compile_for_sm90("bf16")
    assert ".entry _nla_fwd_kernel" in compiled["ptx"]
    assert "sizePerThread = [1, 8], threadsPerWarp = [32, 1]" in compiled["ttgir"], "compute tile is not row-per-thread"
    assert "st.global.v4" in compiled["ptx"], "no 16-byte vector stores of the gradients"
    assert compiled["ptx"].count("shfl.sync") <= 8, "row reductions use warp shuffles"


# ---------------------------------------------------------------------------------------
# GPU only (make gpu-check)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,classes", [(1, 2), (33, 7), (257, 8), (4097, 13), (65, 1000), (17, 1024)]
)
def test_low_precision_gpu(dtype, batch, classes):
    for i, name in enumerate(CONFIGS):
        z, zf, y = make_inputs(batch, classes, dtype=dtype, seed=i, device="cuda")
        check("triton", z, zf, y, EPS_KINDS[i], CONFIGS[name])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [3 * 1024 + 5, 2**16])  # full tiles and a partial one / full only
def test_large_batches_without_the_weights_gpu(dtype, batch):
    """The compiled kernels that carry the bandwidth (official loss, contiguous rows, no weights:
    the 64-register heuristic, or the tuned candidate), against the oracle at C = 7."""
    for i, name in enumerate(("paper", "official", "paper-mean")):
        z, zf, y = make_inputs(batch, 7, dtype=dtype, seed=40 + i, device="cuda")
        check("triton", z, zf, y, EPS_KINDS[i], CONFIGS[name], weights=False)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,classes", [(1, 7), (32, 7), (1000, 7), (4097, 1000), (3, 1024)])
def test_float32_gpu(batch, classes):
    for i, name in enumerate(CONFIGS):
        z, zf, y = make_inputs(batch, classes, seed=i, device="cuda")
        check("triton", z, zf, y, EPS_KINDS[i], CONFIGS[name])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [32, 1000])  # one launch / partial sums + reduction
@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
def test_cuda_graph_capture_and_replay(batch, config_name):
    cfg = CONFIGS[config_name]
    classes = 7
    z, zf, y = make_inputs(batch, classes, seed=17, device="cuda")
    static_z = z.clone().requires_grad_()
    static_zf = zf.clone().requires_grad_()
    static_y = y.clone()
    eps = torch.tensor(0.1, device="cuda")

    def step():
        loss, w = nla_loss(static_z, static_zf, static_y, eps, cfg, backend="triton", validate=False,
                           return_weights=True)
        loss.backward()
        return loss, w

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compile the kernels before capture
        for _ in range(2):
            static_z.grad = static_zf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    static_z.grad = static_zf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_w = step()

    for seed, eps_value in ((18, 0.8), (19, 0.0)):
        new_z, new_zf, new_y = make_inputs(batch, classes, seed=seed, device="cuda")
        with torch.no_grad():
            static_z.copy_(new_z)
            static_zf.copy_(new_zf)
            static_y.copy_(new_y)
            eps.fill_(eps_value)
        graph.replay()
        torch.cuda.synchronize()
        loss, gz, gzf, w = run("triton", new_z, new_zf, new_y, eps_value, cfg)
        assert_close(static_loss, loss, 1e-6, what="replayed loss")
        assert_close(static_z.grad, gz, 1e-6, what="replayed d/dlogits")
        assert_close(static_zf.grad, gzf, 1e-6, what="replayed d/dlogits_flip")
        assert_close(static_w, w, 1e-6, what="replayed weights")
        ref_loss = oracle(new_z, new_zf, new_y, eps_value, cfg)[0]
        assert_close(static_loss, ref_loss, 2e-5, what="replayed loss vs oracle")


@pytest.mark.gpu
@pytest.mark.parametrize("eps_kind", ["tensor", "float"])
def test_torch_compile_inductor_gpu(eps_kind):
    """The first GPU run's fault: Inductor passed the float scalars as fp64 and the persistent
    loop's sum turned fp64 (a compile error). Both eps kinds, single-program and persistent grids."""
    compile_matches_eager("triton", "inductor", (32, 1000, 999, 4097), eps_kind)
    compile_matches_eager("triton", "inductor", (3, 65), eps_kind, classes=1000)


@pytest.mark.gpu
def test_batch_2_pow_24_int64_offsets():
    """B = 2^24 rows with a row stride of 160: row * stride exceeds int32."""
    batch, classes, stride = 2**24, 7, 160
    cfg = CONFIGS["official-jsd"]  # every term is a batch mean, so chunks of the oracle add up
    gen = torch.Generator(device="cuda").manual_seed(20)
    base = torch.empty(batch, stride, dtype=torch.bfloat16, device="cuda")
    base_f = torch.empty(batch, stride, dtype=torch.bfloat16, device="cuda")
    base[:, :classes] = torch.randn(batch, classes, generator=gen, device="cuda") * 3
    base_f[:, :classes] = torch.randn(batch, classes, generator=gen, device="cuda") * 3
    z, zf = base[:, :classes], base_f[:, :classes]
    y = torch.randint(0, classes, (batch,), generator=gen, device="cuda")
    zl, zfl = z.detach().requires_grad_(), zf.detach().requires_grad_()
    loss, w = nla_loss(zl, zfl, y, 0.37, cfg, backend="triton", validate=False, return_weights=True)
    loss.backward()
    chunk = 2**20
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        with torch.no_grad():
            total += nla_loss_reference(z[rows].double(), zf[rows].double(), y[rows], 0.37, cfg) * chunk
    assert_close(loss, total / batch, 1e-4, what="loss")
    for rows in (slice(0, chunk), slice(batch - chunk, batch)):
        _, ref_gz, ref_gzf, ref_w = oracle(z[rows], zf[rows], y[rows], 0.37, cfg)
        assert_close(zl.grad[rows], ref_gz * chunk / batch, 1e-2, 1e-12, "d/dlogits")
        assert_close(zfl.grad[rows], ref_gzf * chunk / batch, 1e-2, 1e-12, "d/dlogits_flip")
        assert_close(w[rows], ref_w, 2e-5, 1e-6, "weights")


_LEAN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "bench")
    import torch
    import triton_host_bench as hb

    calls = []

    class Recorder(hb._NoLauncher):
        def __call__(self, *args):
            grid, stream, function, packed, meta, enter, leave = args[:3], args[3], args[4], args[5], args[6], args[7], args[8]
            rest = [("tensor", str(a.dtype), list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args[9:]]
            calls.append({"grid": list(grid), "rest": rest, "hooks": [enter is None or not enter.calls,
                                                                     leave is None or not leave.calls]})

    hb._StubbedDriver.launcher_cls = Recorder
    hb.stub_the_launcher()
    from nla_fast.kernels import launch
    cases = hb.make_cases(int(sys.argv[1]), 7)
    fwd_bwd = cases["triton, fwd + autograd.grad"]
    fwd_bwd()                      # compiles; launches through JITFunction.run; remembers the kernels
    ordinary = list(calls); calls.clear()
    fwd_bwd()                      # the lean launches
    lean = list(calls)
    plans = [p.forward is not None for p in launch._plans.values()]
    print(json.dumps({"ordinary": ordinary, "lean": lean, "plans": plans}))
    """
)


@pytest.mark.parametrize("batch", [32, 3000])  # one program / a persistent grid + the partial-sum kernel
def test_lean_launch_passes_the_launcher_what_jitfunction_run_does(batch):
    """With only Triton's C launcher stubbed (no GPU needed): a remembered kernel launched directly
    gets the same grid and the same arguments, in the same order (constexprs included, as
    JITFunction.run passes them), as the first launch through JITFunction.run; hooks are None
    only where no hook is registered."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _LEAN_SCRIPT, str(batch)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["plans"] == [True]
    ordinary, lean = result["ordinary"], result["lean"]
    assert len(ordinary) == len(lean) >= 2  # forward (+ partial sums) and the in-place scale
    for first, again in zip(ordinary, lean):
        assert again["grid"] == first["grid"]
        assert again["rest"] == first["rest"]
        assert again["hooks"] == [True, True]
