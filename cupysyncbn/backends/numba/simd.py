"""Channel-first rows as explicit LLVM vector loops: float64 sums, streamed writes.

The fused CPU backend's two reductions (``moments`` and ``backward_reduce``)
are built on the two intrinsics here. Why explicit vectors: the sums must not
be reassociated by the compiler (results would then depend on the vector
width it picks), numba compiles without fastmath and with the SLP vectorizer
off, and a loop over an accumulator *array* (what the compiler does vectorize
without reassociation) pays a load and a store per accumulator and step: the
reductions ran at 10-20 GB/s in cache, below memory bandwidth. Here the
accumulators are ``<8 x double>`` registers (two of each, 16 values per step),
so one rank's reductions keep up with memory; the order of every addition is
fixed by this code, the same on every CPU (``<8 x double>`` is split into
whatever registers the CPU has, lane by lane).

Both reductions walk rows ``x[i, j, t0:t1]`` for ``i0 <= i < i1`` of a
C-contiguous 3-D array ``(N, C, S)``, each row in 16-value steps, then one
8-value step, then scalars; the lanes are added pairwise at the end. Inputs
are float32, float64, or float16 as ``uint16`` bits (only where the CPU has
F16C: :data:`HW_F16`; elsewhere LLVM's ``fpext`` from half would need a
runtime library call numba does not link).

The streamed writers (:func:`norm_line_nt`, :func:`elemt_line_nt`) compute
one cache line of ``y`` or ``dx`` with the caller's formula, operation for
operation (bitwise the same values), and store it with a non-temporal store:
no read of the line before it is written, no eviction of the inputs;
:func:`store_fence` after the last line orders them. A line may hold the end
of one channel's row and the start of the next (short rows such as 7x7
maps), so each lane picks its channel's parameters. The fused backend uses
them for large outputs (``STREAM_MIN_BYTES``).

The fused ReLU (``act="relu"``): the backward intrinsics take an ``act``
argument, ``None`` (no activation: no code emitted for it) or the forward's
``(scale, bias)``; they recompute the pre-activation ``(x - m) * scale + bias``
with the forward's operations and rounding (no fused multiply-add) and count
``dy`` as 0 where it is ``<= 0``. The forward writers take ``relu`` (None or
True) and write ``max(y, 0)`` (NaN kept) the same way.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "HW_F16", "WIDTH", "COLS", "STREAMS", "LINE", "dev_sums", "dot_sums", "col_dev_sums",
    "col_dot_sums", "dev_sums_rn", "dot_sums_rn", "col_dev_sums_rn", "col_dot_sums_rn",
    "norm_line_nt", "elemt_line_nt", "norm_vline_nt", "elemt_vline_nt", "store_fence",
]

#: float16 <-> float32 as LLVM ``fpext``/``fptrunc`` (F16C instructions).
HW_F16 = bool(llb.get_host_cpu_features().get("f16c", False))
#: float64 lanes per accumulator vector.
WIDTH = 8
#: Whether the streamed (non-temporal) line writers may be used: x86-64 only,
#: where ``sfence`` orders them (:func:`store_fence`).
STREAMS = platform.machine().lower() in ("x86_64", "amd64")

#: Bytes per cache line (x86-64): the unit of a streamed store.
LINE = 64
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F64 = ir.DoubleType()
_BITS = {ir.HalfType: 16, ir.FloatType: 32, ir.DoubleType: 64}


def _convert(builder: ir.IRBuilder, v: ir.Value, to: ir.Type) -> ir.Value:
    """A float (or float16 bits), scalar or vector, as float type ``to`` (exact or rounded)."""
    vec = isinstance(v.type, ir.VectorType)
    elem = v.type.element if vec else v.type
    if isinstance(elem, ir.IntType):  # float16 bits
        half = ir.HalfType()
        v = builder.bitcast(v, ir.VectorType(half, v.type.count) if vec else half)
        elem = half
    dst = to.element if isinstance(to, ir.VectorType) else to
    if _BITS[type(elem)] < _BITS[type(dst)]:
        return builder.fpext(v, to)
    if _BITS[type(elem)] > _BITS[type(dst)]:
        return builder.fptrunc(v, to)
    return v


def _splat(builder: ir.IRBuilder, v: ir.Value, width: int = WIDTH) -> ir.Value:
    vt = ir.VectorType(v.type, width)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), v, _I32(0))
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, width), [0] * width))


def _hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Lanes of a vector added pairwise (halves first), a fixed order."""
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, _I32(0))


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """``a * b + c`` with one rounding (``llvm.fma``), scalar or vector float64."""
    t = a.type
    name = f"llvm.fma.v{t.count}f64" if isinstance(t, ir.VectorType) else "llvm.fma.f64"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), name)
    return builder.call(fn, [a, b, c])


def _terms(builder: ir.IRBuilder, dot: bool, loads: list, c: ir.Value, cty: ir.Type,
           f: ir.Type, act: tuple | None = None) -> tuple:
    """``(a, p, q)`` of one step: ``a`` is summed, and ``p * q``, in float type ``f``.

    dev: ``d = f(x) - c``. dot (``loads = [x, dy]``): ``g = f(dy)`` and
    ``x - m`` in ``m``'s (compute) dtype ``cty``, then widened, as the NumPy
    backend; with ``act`` (the ReLU's scale and bias, compute dtype) ``g`` is
    masked (:func:`_mask_dy`). Scalars or vectors alike.
    """
    if dot:
        x, g = loads
        vec = isinstance(f, ir.VectorType)
        xm = builder.fsub(_convert(builder, x, ir.VectorType(cty, f.count) if vec else cty), c)
        g = _convert(builder, _mask_dy(builder, _convert(builder, g, xm.type), xm, act), f)
        return g, g, _convert(builder, xm, f)
    d = builder.fsub(_convert(builder, loads[0], f), c)
    return d, d, d


def _is_on(t: types.Type) -> bool:
    """Whether an ``act``/``relu`` argument type turns the activation on (None: off)."""
    return not isinstance(t, (types.NoneType, types.Omitted))


def _cut(builder: ir.IRBuilder, pre: ir.Value) -> ir.Value:
    """``pre <= 0`` (False for NaN: the ReLU keeps NaN), scalar or per lane."""
    return builder.fcmp_ordered("<=", pre, ir.Constant(pre.type, None))


def _relu(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """``0 if v <= 0 else v``, scalar or per lane."""
    return builder.select(_cut(builder, v), ir.Constant(v.type, None), v)


def _mask_dy(builder: ir.IRBuilder, g: ir.Value, xm: ir.Value, act: tuple | None) -> ir.Value:
    """``g`` zeroed where the forward's ``xm * scale + bias <= 0`` (``act``: their values)."""
    if act is None:
        return g
    sc, b = act
    pre = builder.fadd(builder.fmul(xm, sc), b)
    return builder.select(_cut(builder, pre), ir.Constant(g.type, None), g)


def _accumulate(builder: ir.IRBuilder, acc_a: ir.Value, acc_pq: ir.Value, terms: tuple,
                fused: bool = True) -> None:
    """``acc_a += a``, ``acc_pq += p * q`` (one rounding, or two unless ``fused``): allocas."""
    a, p, q = terms
    builder.store(builder.fadd(builder.load(acc_a), a), acc_a)
    if fused:
        builder.store(_fma(builder, p, q, builder.load(acc_pq)), acc_pq)
    else:  # the reproducible mode's order: the product rounded, then added
        builder.store(builder.fadd(builder.load(acc_pq), builder.fmul(p, q)), acc_pq)


def _vec_ptr(context, builder, aty, arr, idx, elem, width):  # noqa: ANN001, ANN202
    """Pointer to ``width`` elements of type ``elem`` at ``arr[idx]`` (no checks)."""
    p = cgutils.get_item_pointer(context, builder, aty, arr, idx, wraparound=False,
                                 boundscheck=False)
    return builder.bitcast(p, ir.VectorType(elem, width).as_pointer())


def _require_c(arrays: tuple, ndim: int) -> None:
    """Typing check of an intrinsic: every argument a C-contiguous ``ndim``-D array."""
    for a in arrays:
        if not (isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C"):
            raise TypeError(f"expected a C-contiguous {ndim}-D array, got {a}")


def _codegen(dot: bool, fused: bool = True):
    """Code generator of :func:`dev_sums` (``dot=False``) or :func:`dot_sums` (``_rn``: unfused)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202 - numba lowering hook
        nargs = 2 if dot else 1
        aty = sig.args[0]
        arrays = [context.make_array(t)(context, builder, a)
                  for t, a in zip(sig.args[:nargs], args[:nargs])]
        i0, i1, j, t0, t1 = (context.cast(builder, v, t, types.intp)
                             for v, t in zip(args[nargs:nargs + 5], sig.args[nargs:nargs + 5]))
        ety = context.get_data_type(aty.dtype)
        # dev: d = f64(x) - c.  dot: x - m in m's (compute) dtype, as the NumPy backend.
        last = nargs + 5  # the shift c (dev) or the mean m (dot)
        cty = context.get_data_type(sig.args[last]) if dot else _F64
        cval = args[last] if dot else context.cast(builder, args[last], sig.args[last],
                                                   types.float64)
        act = None  # dot: the ReLU's (scale, bias), as scalars and as vectors
        if dot and _is_on(sig.args[last + 1]):
            act = [builder.extract_value(args[last + 1], k) for k in (0, 1)]
        vact = None if act is None else [_splat(builder, v) for v in act]
        v64 = ir.VectorType(_F64, WIDTH)
        zero = ir.Constant(v64, [0.0] * WIDTH)
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
        tail = [cgutils.alloca_once_value(builder, _F64(0.0)) for _ in range(2)]
        cvec = _splat(builder, cval)
        align = context.get_abi_sizeof(ety)  # element alignment: rows start anywhere

        def step(rows, t, k):  # WIDTH values at t into accumulator pair k
            vt = ir.VectorType(ety, WIDTH).as_pointer()
            loads = [builder.load(builder.bitcast(builder.gep(r, [t]), vt), align=align)
                     for r in rows]
            _accumulate(builder, acc[2 * k], acc[2 * k + 1],
                        _terms(builder, dot, loads, cvec, cty, v64, vact), fused)

        width = t1.type(WIDTH)
        n = builder.sub(t1, t0)
        steps = builder.sdiv(n, t1.type(2 * WIDTH))
        with cgutils.for_range_slice(builder, i0, i1, _I64(1), inc=True) as (i, _):
            rows = [cgutils.get_item_pointer(context, builder, t, a, [i, j, t0],
                                             wraparound=False, boundscheck=False)
                    for t, a in zip(sig.args[:nargs], arrays)]
            with cgutils.for_range(builder, steps) as loop:
                t = builder.mul(loop.index, t1.type(2 * WIDTH))
                step(rows, t, 0)
                step(rows, builder.add(t, width), 1)
            done = builder.mul(steps, t1.type(2 * WIDTH))
            with builder.if_then(builder.icmp_signed(">=", builder.sub(n, done), width)):
                step(rows, done, 0)
            rest = builder.add(done, builder.mul(
                builder.sdiv(builder.sub(n, done), width), width))
            with cgutils.for_range_slice(builder, rest, n, _I64(1), inc=True) as (t, _):
                loads = [builder.load(builder.gep(r, [t])) for r in rows]
                _accumulate(builder, tail[0], tail[1],
                            _terms(builder, dot, loads, cval, cty, _F64, act), fused)
        out = [builder.fadd(_hsum(builder, builder.fadd(builder.load(acc[k]),
                                                        builder.load(acc[k + 2]))),
                            builder.load(tail[k])) for k in (0, 1)]
        return context.make_tuple(builder, sig.return_type, out)

    return codegen


@intrinsic
def dev_sums(typingctx, x, i0, i1, j, t0, t1, c):  # noqa: ANN001, ANN202 - numba typing hook
    """``(sum(d), sum(d*d))`` in float64 of ``d = x[i0:i1, j, t0:t1] - c``.

    ``x`` float32/float64 (or float16 bits, only with :data:`HW_F16`); ``c``
    a float64 shift. ``d*d`` is added with one rounding (fused multiply-add).
    """
    _require_c((x,), 3)
    return types.UniTuple(types.float64, 2)(x, i0, i1, j, t0, t1, c), _codegen(False)


@intrinsic
def dot_sums(typingctx, x, dy, i0, i1, j, t0, t1, m, act):  # noqa: ANN001, ANN202
    """``(sum(g), sum(g * (x - m)))`` in float64, ``g = dy[i0:i1, j, t0:t1]``.

    ``x - m`` is computed in ``m``'s dtype (the compute dtype) and then
    widened, as the NumPy backend does; ``x`` and ``dy`` share their dtype.
    ``act``: None, or the fused ReLU's ``(scale, bias)`` of channel ``j`` in
    ``m``'s dtype: ``g`` is 0 where ``(x - m) * scale + bias <= 0``.
    """
    _require_c((x, dy), 3)
    return (types.UniTuple(types.float64, 2)(x, dy, i0, i1, j, t0, t1, m, act),
            _codegen(True))


# ------------------------------------------------------------ channel-last blocks
#: Columns (channels) per block of :func:`col_dev_sums` / :func:`col_dot_sums`.
COLS = 2 * WIDTH


def _col_codegen(dot: bool, fused: bool = True):
    """Code generator of :func:`col_dev_sums` (``dot=False``) or :func:`col_dot_sums` (``_rn``)."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202 - numba lowering hook
        nargs = 2 if dot else 1
        tys, vals = sig.args, args
        arrays = [context.make_array(t)(context, builder, a)
                  for t, a in zip(tys[:nargs], vals[:nargs])]
        r0, r1, j = (context.cast(builder, v, t, types.intp)
                     for v, t in zip(vals[nargs:nargs + 3], tys[nargs:nargs + 3]))
        vecs = [context.make_array(t)(context, builder, a)
                for t, a in zip(tys[nargs + 3:nargs + 6], vals[nargs + 3:nargs + 6])]  # c, s1, s2
        ety = context.get_data_type(tys[0].dtype)
        cty = context.get_data_type(tys[nargs + 3].dtype)  # f64 shift, or the compute dtype
        v64 = ir.VectorType(_F64, WIDTH)
        align = context.get_abi_sizeof(ety)

        def vptr(aty, arr, idx, elem):
            return _vec_ptr(context, builder, aty, arr, idx, elem, WIDTH)

        cty_ = tys[nargs + 3]
        halves = [builder.add(j, j.type(h * WIDTH)) for h in range(2)]
        cvec = [builder.load(vptr(cty_, vecs[0], [jh], cty), align=context.get_abi_sizeof(cty))
                for jh in halves]
        acts = [None, None]  # dot: the ReLU's (scale, bias) vectors of each half
        if dot and _is_on(tys[nargs + 6]):
            aty = tys[nargs + 6]
            pair = [context.make_array(aty[k])(context, builder,
                                               builder.extract_value(vals[nargs + 6], k))
                    for k in (0, 1)]
            acts = [[builder.load(vptr(aty[k], pair[k], [jh], cty),
                                  align=context.get_abi_sizeof(cty)) for k in (0, 1)]
                    for jh in halves]
        acc = [cgutils.alloca_once_value(builder, ir.Constant(v64, [0.0] * WIDTH))
               for _ in range(4)]
        with cgutils.for_range_slice(builder, r0, r1, _I64(1), inc=True) as (r, _):
            for h, jh in enumerate(halves):
                loads = [builder.load(vptr(t, a, [r, jh], ety), align=align)
                         for t, a in zip(tys[:nargs], arrays)]
                _accumulate(builder, acc[2 * h], acc[2 * h + 1],
                            _terms(builder, dot, loads, cvec[h], cty, v64, acts[h]), fused)
        for h, jh in enumerate(halves):  # out[j:j+16] += block sums
            for k, out in ((0, 1), (1, 2)):
                ptr = vptr(tys[nargs + 3 + out], vecs[out], [jh], _F64)
                builder.store(builder.fadd(builder.load(ptr, align=8),
                                           builder.load(acc[2 * h + k])), ptr, align=8)
        return context.get_dummy_value()

    return codegen


@intrinsic
def col_dev_sums(typingctx, x, r0, r1, j, c, sd, q):  # noqa: ANN001, ANN202 - numba typing hook
    """Add ``sum(d)`` to ``sd[j:j+16]`` and ``sum(d*d)`` to ``q[j:j+16]`` (float64).

    ``d = x[r0:r1, j:j+16] - c[j:j+16]`` per column (channel-last rows, a
    block of :data:`COLS` columns), accumulated row by row in registers, then
    added to the float64 vectors ``sd``, ``q``; ``d*d`` with one rounding.
    ``c`` is float64.
    """
    _require_c((x,), 2)
    _require_c((c, sd, q), 1)
    return types.void(x, r0, r1, j, c, sd, q), _col_codegen(False)


@intrinsic
def col_dot_sums(typingctx, x, dy, r0, r1, j, m, s1, s2, act):  # noqa: ANN001, ANN202
    """Add ``sum(g)`` to ``s1[j:j+16]`` and ``sum(g * (x - m))`` to ``s2[j:j+16]``.

    ``g = dy[r0:r1, j:j+16]``; ``x - m`` in ``m``'s dtype (the compute dtype),
    then widened, as :func:`dot_sums`. ``act``: None or a pair of vectors
    ``(scale, bias)`` like ``m`` (the fused ReLU's mask, as :func:`dot_sums`).
    """
    _require_c((x, dy), 2)
    _require_c((m, s1, s2), 1)
    if _is_on(act):
        _require_c(tuple(act), 1)
    return types.void(x, dy, r0, r1, j, m, s1, s2, act), _col_codegen(True)


# ------------------------------------------- the reproducible mode's variants
# The same loops with ``p * q`` rounded before it is added (no fused
# multiply-add), so that NumPy (``exact_samples``) and the CUDA kernels can
# give the same bits: the per-sample sums of the reproducible mode.
@intrinsic
def dev_sums_rn(typingctx, x, i0, i1, j, t0, t1, c):  # noqa: ANN001, ANN202 - numba typing hook
    """:func:`dev_sums` with ``d*d`` rounded, then added."""
    _require_c((x,), 3)
    return types.UniTuple(types.float64, 2)(x, i0, i1, j, t0, t1, c), _codegen(False, False)


@intrinsic
def dot_sums_rn(typingctx, x, dy, i0, i1, j, t0, t1, m, act):  # noqa: ANN001, ANN202
    """:func:`dot_sums` with ``g * (x - m)`` rounded, then added."""
    _require_c((x, dy), 3)
    return (types.UniTuple(types.float64, 2)(x, dy, i0, i1, j, t0, t1, m, act),
            _codegen(True, False))


@intrinsic
def col_dev_sums_rn(typingctx, x, r0, r1, j, c, sd, q):  # noqa: ANN001, ANN202
    """:func:`col_dev_sums` with ``d*d`` rounded, then added."""
    _require_c((x,), 2)
    _require_c((c, sd, q), 1)
    return types.void(x, r0, r1, j, c, sd, q), _col_codegen(False, False)


@intrinsic
def col_dot_sums_rn(typingctx, x, dy, r0, r1, j, m, s1, s2, act):  # noqa: ANN001, ANN202
    """:func:`col_dot_sums` with ``g * (x - m)`` rounded, then added."""
    _require_c((x, dy), 2)
    _require_c((m, s1, s2), 1)
    return types.void(x, dy, r0, r1, j, m, s1, s2, act), _col_codegen(True, False)


# ------------------------------------------------------------- streamed writes
def _to_out(builder: ir.IRBuilder, v: ir.Value, ety: ir.Type) -> ir.Value:
    """A compute-dtype value as the output element (float16 bits via float32)."""
    if not isinstance(ety, ir.IntType):
        return _convert(builder, v, ir.VectorType(ety, v.type.count)
                        if isinstance(v.type, ir.VectorType) else ety)
    vec = isinstance(v.type, ir.VectorType)
    f32 = ir.VectorType(ir.FloatType(), v.type.count) if vec else ir.FloatType()
    half = ir.VectorType(ir.HalfType(), v.type.count) if vec else ir.HalfType()
    h = builder.fptrunc(_convert(builder, v, f32), half)
    return builder.bitcast(h, ir.VectorType(ety, v.type.count) if vec else ety)


def _emit_line(context, builder, bwd, ptrs, params, ety, cty, vw, act):  # noqa: ANN001, ANN202
    """One line: load the inputs, apply the formula, stream the result.

    Inputs at ``ptrs[:-1]``, per-lane ``params`` in the compute dtype, the
    output line at ``ptrs[-1]``. ``act``: forward, whether to apply the
    ReLU; backward, None or the per-lane ReLU ``(scale, bias)`` (the mask).
    """
    ct = ir.VectorType(cty, vw)
    ld = [_convert(builder, builder.load(p, align=context.get_abi_sizeof(ety)), ct)
          for p in ptrs[:-1]]
    if bwd:  # (dy - mean_dy) * a - (x - mean) * b
        m, a, md, b = params
        xm = builder.fsub(ld[1], m)
        g = _mask_dy(builder, ld[0], xm, act)
        r = builder.fsub(builder.fmul(builder.fsub(g, md), a), builder.fmul(xm, b))
    else:  # (x - mean) * scale + bias
        m, sc, b = params
        r = builder.fadd(builder.fmul(builder.fsub(ld[0], m), sc), b)
        if act:
            r = _relu(builder, r)
    st = builder.store(_to_out(builder, r, ety), ptrs[-1], align=LINE)
    st.set_metadata("nontemporal", builder.module.add_metadata([_I32(1)]))


def _line_codegen(bwd: bool):
    """Code generator of :func:`norm_line_nt` (``bwd=False``) or :func:`elemt_line_nt`."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202 - numba lowering hook
        na = 3 if bwd else 2  # arrays: (dy, x, dx) or (x, y)
        np_ = 4 if bwd else 3  # parameters per channel
        arrays = [context.make_array(t)(context, builder, a)
                  for t, a in zip(sig.args[:na], args[:na])]
        i, t, k = (context.cast(builder, args[q], sig.args[q], types.intp)
                   for q in (na, na + 1, len(args) - 2))
        on = _is_on(sig.args[-1])
        ety = context.get_data_type(sig.args[0].dtype)
        cty = context.get_data_type(sig.args[na + 2])
        vw = LINE // context.get_abi_sizeof(ety)
        ptrs = [_vec_ptr(context, builder, ty, a, [i, t], ety, vw)
                for ty, a in zip(sig.args[:na], arrays)]
        # lanes below k take the first channel's parameters, the rest the next's
        lanes = ir.Constant(ir.VectorType(k.type, vw), list(range(vw)))
        first = builder.icmp_signed("<", lanes, _splat(builder, k, vw))
        def per_lane(p0, p1):
            return builder.select(first, _splat(builder, p0, vw), _splat(builder, p1, vw))

        params = [per_lane(p0, p1)
                  for p0, p1 in zip(args[na + 2:na + 2 + np_], args[na + 2 + np_:na + 2 + 2 * np_])]
        act = on
        if bwd and on:  # (scale0, bias0, scale1, bias1)
            sb = [builder.extract_value(args[-1], q) for q in range(4)]
            act = [per_lane(sb[0], sb[2]), per_lane(sb[1], sb[3])]
        elif bwd:
            act = None
        _emit_line(context, builder, bwd, ptrs, params, ety, cty, vw, act)
        return context.get_dummy_value()

    return codegen


def _check_line(arrays: tuple, params: tuple) -> None:
    _require_c(arrays, 2)
    if len({a.dtype for a in arrays}) != 1 or len(set(params)) != 1 or not all(
            isinstance(p, types.Float) for p in params):
        raise TypeError(f"expected arrays of one dtype and float parameters of one dtype,"
                        f" got {arrays} and {params}")


@intrinsic
def norm_line_nt(typingctx, x, y, i, t, m0, sc0, b0, m1, sc1, b1, k, relu):  # noqa: ANN001, ANN202
    """One cache line of ``y[i, t:]``: ``(x - m) * sc + b``, a streamed store.

    ``x``, ``y``: 2-D ``(N, C*S)`` views of channel-first arrays; ``y[i, t]``
    starts a 64-byte line (``64 // itemsize`` values). The first ``k`` values
    take the parameters ``m0, sc0, b0`` (their channel), the rest
    ``m1, sc1, b1`` (the next channel; rows of at least one line cross at
    most one channel boundary per line). The same operations in the same
    order as the plain loop (no fused multiply-add), in the parameters'
    dtype: bitwise the same values. Call :func:`store_fence` when done.
    ``relu`` (None or True): ``max(y, 0)``, NaN kept.
    """
    _check_line((x, y), (m0, sc0, b0, m1, sc1, b1))
    return types.void(x, y, i, t, m0, sc0, b0, m1, sc1, b1, k, relu), _line_codegen(False)


@intrinsic
def elemt_line_nt(typingctx, dy, x, dx, i, t, m0, a0, md0, b0,  # noqa: ANN001, ANN202
                  m1, a1, md1, b1, k, act):
    """One line of ``dx[i, t:]``: ``(dy - md) * a - (x - m) * b``, a streamed store.

    Parameters per channel as in :func:`norm_line_nt`. ``act``: None, or the
    fused ReLU's ``(scale0, bias0, scale1, bias1)``: ``dy`` is 0 where
    ``(x - m) * scale + bias <= 0``.
    """
    _check_line((dy, x, dx), (m0, a0, md0, b0, m1, a1, md1, b1))
    return (types.void(dy, x, dx, i, t, m0, a0, md0, b0, m1, a1, md1, b1, k, act),
            _line_codegen(True))


def _vline_codegen(bwd: bool):
    """Code generator of :func:`norm_vline_nt` (``bwd=False``) or :func:`elemt_vline_nt`."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202 - numba lowering hook
        na = 3 if bwd else 2  # flat arrays: (dy, x, dx) or (x, y)
        np_ = 4 if bwd else 3  # parameter vectors
        tys = sig.args
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(tys[:na], args[:na])]
        pars = [context.make_array(t)(context, builder, a)
                for t, a in zip(tys[na:na + np_], args[na:na + np_])]
        t, j = (context.cast(builder, args[q], tys[q], types.intp)
                for q in (na + np_, na + np_ + 1))
        on = _is_on(tys[-1])
        ety = context.get_data_type(tys[0].dtype)
        cty = context.get_data_type(tys[na].dtype)
        vw = LINE // context.get_abi_sizeof(ety)
        ptrs = [_vec_ptr(context, builder, ty, a, [t], ety, vw)
                for ty, a in zip(tys[:na], arrays)]
        def line_of(ty, a):
            return builder.load(_vec_ptr(context, builder, ty, a, [j], cty, vw),
                                align=context.get_abi_sizeof(cty))

        params = [line_of(ty, a) for ty, a in zip(tys[na:na + np_], pars)]
        act = on
        if bwd and on:  # the ReLU's (scale, bias) vectors, laid out as the parameters
            aty = tys[-1]
            act = [line_of(aty[q], context.make_array(aty[q])(
                context, builder, builder.extract_value(args[-1], q))) for q in (0, 1)]
        elif bwd:
            act = None
        _emit_line(context, builder, bwd, ptrs, params, ety, cty, vw, act)
        return context.get_dummy_value()

    return codegen


def _check_vline(arrays: tuple, params: tuple) -> None:
    _require_c((*arrays, *params), 1)
    if len({a.dtype for a in arrays}) != 1 or len({p.dtype for p in params}) != 1:
        raise TypeError(f"expected arrays of one dtype and parameters of one dtype,"
                        f" got {arrays} and {params}")


@intrinsic
def norm_vline_nt(typingctx, x, y, m, sc, b, t, j, relu):  # noqa: ANN001, ANN202
    """One cache line of a flat channel-last ``y[t:]``: ``(x - m) * sc + b``, streamed.

    ``y[t]`` starts a 64-byte line; lane ``l`` takes the parameters at
    ``j + l`` of ``m``, ``sc``, ``b`` (the channels of those values, laid out
    by the caller: per-channel vectors repeated so that a line that crosses a
    row boundary reads on into the next row's first channels). The same
    operations as the plain loop; call :func:`store_fence` when done.
    ``relu`` (None or True): ``max(y, 0)``, NaN kept.
    """
    _check_vline((x, y), (m, sc, b))
    return types.void(x, y, m, sc, b, t, j, relu), _vline_codegen(False)


@intrinsic
def elemt_vline_nt(typingctx, dy, x, dx, m, a, md, b, t, j, act):  # noqa: ANN001, ANN202
    """One line of a flat channel-last ``dx[t:]``: ``(dy - md) * a - (x - m) * b``, streamed.

    Parameters laid out as in :func:`norm_vline_nt`; ``act``: None, or the
    fused ReLU's ``(scale, bias)`` vectors laid out the same way (the mask).
    """
    _check_vline((dy, x, dx), (m, a, md, b) + (tuple(act) if _is_on(act) else ()))
    return types.void(dy, x, dx, m, a, md, b, t, j, act), _vline_codegen(True)


@intrinsic
def store_fence(typingctx):  # noqa: ANN001, ANN202 - numba typing hook
    """``sfence``: streamed stores become visible in order to every other thread."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        if STREAMS:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen
