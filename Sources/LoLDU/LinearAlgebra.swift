import Glibc
import CDNNL
import CLinearAlgebra

/// A floating-point type with BLAS and LAPACK kernels: `Float` or `Double`.
///
/// Every raw BLAS/LAPACK call of the library goes through these few wrappers. All matrices
/// passed to the BLAS wrappers are row-major; `getrf` works on a column-major panel, as
/// LAPACK does. Callers guarantee that every dimension fits in a 32-bit BLAS integer
/// (the API validates this once, at the boundary).
public protocol BLASScalar: BinaryFloatingPoint, Sendable {
    static var dtype: DType { get }

    /// Whether every element is finite, copying them to `destination` in the same pass when
    /// given (see `checkFinite`).
    static func allFinite(
        _ x: UnsafePointer<Self>, count: Int, copyingTo destination: UnsafeMutablePointer<Self>?
    ) -> Bool

    /// `C = alpha · op(A) · op(B) + beta · C`, row-major, `op(A)` is `m × k`, `op(B)` is `k × n`.
    static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Self, a: UnsafePointer<Self>, lda: Int,
        b: UnsafePointer<Self>, ldb: Int,
        beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)

    /// Solves `op(A) · X = B` in place of `B` (`m × n`, row-major) with `A` triangular `m × m`.
    static func trsm(
        upper: Bool, transA: Bool, unitDiagonal: Bool, m: Int, n: Int,
        a: UnsafePointer<Self>, lda: Int, b: UnsafeMutablePointer<Self>, ldb: Int)

    /// LU with partial pivoting of a column-major `m × n` matrix (LAPACK `?getrf`).
    /// `ipiv` receives `min(m, n)` 1-based row interchanges. Returns LAPACK's `info`:
    /// `0`, or `j > 0` when `U[j-1, j-1]` is exactly zero (the factorisation is still complete).
    static func getrf(
        m: Int, n: Int, a: UnsafeMutablePointer<Self>, lda: Int,
        ipiv: UnsafeMutablePointer<Int32>) -> Int32

    // Elementwise loops, as requirements so that each type runs them as concrete code: written
    // in a generic adapter, every arithmetic operation would go through a witness table.
    /// `out[k] = a[k] · b[k]`.
    static func hadamard(_ a: UnsafePointer<Self>, _ b: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int)
    /// `out[k] += a[k] · b[k]`.
    static func addHadamard(_ a: UnsafePointer<Self>, _ b: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int)
    /// `out[k] += a[k]`.
    static func add(_ a: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int)
    /// `out[k] += s · a[k]`.
    static func addScaled(_ s: Self, _ a: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int)
    /// `Σ_k a[k] · b[k]`.
    static func dot(_ a: UnsafePointer<Self>, _ b: UnsafePointer<Self>, count: Int) -> Self
    /// `out[k] = s · a[k] − t · b[k]`.
    static func combine(_ s: Self, _ a: UnsafePointer<Self>, _ t: Self, _ b: UnsafePointer<Self>,
                        into out: UnsafeMutablePointer<Self>, count: Int)
    /// `out[k] = v[k] · (s · a[k] − t · b[k])`, rounded as ``combine`` then ``hadamard``.
    static func hadamardCombination(_ v: UnsafePointer<Self>, _ s: Self, _ a: UnsafePointer<Self>, _ t: Self,
                                    _ b: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int)
}

extension BLASScalar {
    public static func hadamard(_ a: UnsafePointer<Self>, _ b: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int) {
        // In place (`out == a`, as for `h ⊙ c` into `h`) as its own loop: the vectoriser's
        // overlap check would send `out == a` to the scalar loop.
        if UnsafePointer(out) == a {
            for k in 0..<count { out[k] *= b[k] }
        } else {
            for k in 0..<count { out[k] = a[k] * b[k] }
        }
    }

    public static func addHadamard(_ a: UnsafePointer<Self>, _ b: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int) {
        for k in 0..<count { out[k] += a[k] * b[k] }
    }

    public static func add(_ a: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int) {
        for k in 0..<count { out[k] += a[k] }
    }

    public static func addScaled(_ s: Self, _ a: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int) {
        for k in 0..<count { out[k] += s * a[k] }
    }

    /// Eight partial sums (a single one waits on every addition: the compiler may not reorder
    /// floating-point sums), added pairwise at the end.
    public static func dot(_ a: UnsafePointer<Self>, _ b: UnsafePointer<Self>, count: Int) -> Self {
        var s0: Self = 0, s1: Self = 0, s2: Self = 0, s3: Self = 0
        var s4: Self = 0, s5: Self = 0, s6: Self = 0, s7: Self = 0
        var k = 0
        while k + 8 <= count {
            s0 += a[k] * b[k]; s1 += a[k + 1] * b[k + 1]; s2 += a[k + 2] * b[k + 2]; s3 += a[k + 3] * b[k + 3]
            s4 += a[k + 4] * b[k + 4]; s5 += a[k + 5] * b[k + 5]; s6 += a[k + 6] * b[k + 6]; s7 += a[k + 7] * b[k + 7]
            k += 8
        }
        while k < count { s0 += a[k] * b[k]; k += 1 }
        return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    }

    public static func combine(_ s: Self, _ a: UnsafePointer<Self>, _ t: Self, _ b: UnsafePointer<Self>,
                               into out: UnsafeMutablePointer<Self>, count: Int) {
        for k in 0..<count { out[k] = s * a[k] - t * b[k] }
    }

    public static func hadamardCombination(_ v: UnsafePointer<Self>, _ s: Self, _ a: UnsafePointer<Self>, _ t: Self,
                                           _ b: UnsafePointer<Self>, into out: UnsafeMutablePointer<Self>, count: Int) {
        if UnsafePointer(out) == v {  // (in place as its own loop, as in ``hadamard``)
            for k in 0..<count {
                let c = s * a[k] - t * b[k]
                out[k] *= c
            }
        } else {
            for k in 0..<count {
                let c = s * a[k] - t * b[k]
                out[k] = v[k] * c
            }
        }
    }
}

/// The element types GEMMs multiply: `Float`, `Double`, and `BFloat16` where the CPU has bf16
/// units. `C` (row-major, `m × n`, in `Compute`) = `op(A) op(B)` (`beta` 0) or `+= op(A) op(B)`
/// (`beta` 1); or `op(A) op(B)` plus a bias row added to every row. Which library runs each
/// type is ``GEMMBackend``'s choice.
public protocol GEMMOperand: Element {
    /// `C = op(A) op(B) + 1 biasᵀ` with `bias` (`n` values, added to every row of `C`; then
    /// `accumulate` is false), else `C (+)= op(A) op(B)`. A library that adds the bias in its
    /// kernel (oneDNN) saves a pass over `C`; otherwise ``biasRows`` starts `C` as the bias and
    /// the product is accumulated onto it.
    static func multiply(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        a: UnsafePointer<Self>, lda: Int, b: UnsafePointer<Self>, ldb: Int,
        bias: UnsafePointer<Compute>?, accumulate: Bool, c: UnsafeMutablePointer<Compute>, ldc: Int)
}

extension GEMMOperand {
    /// `C (+)= op(A) op(B)`.
    @inline(__always)
    public static func multiply(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        a: UnsafePointer<Self>, lda: Int, b: UnsafePointer<Self>, ldb: Int,
        accumulate: Bool, c: UnsafeMutablePointer<Compute>, ldc: Int
    ) {
        multiply(transA: transA, transB: transB, m: m, n: n, k: k, a: a, lda: lda, b: b, ldb: ldb,
                 bias: nil, accumulate: accumulate, c: c, ldc: ldc)
    }

    /// Copies `bias` into the `m` rows of `C` when given; returns whether the product must then
    /// be accumulated (`beta` 1).
    static func biasRows(_ bias: UnsafePointer<Compute>?, m: Int, n: Int, accumulate: Bool,
                         c: UnsafeMutablePointer<Compute>, ldc: Int) -> Bool {
        guard let bias else { return accumulate }
        assert(!accumulate, "a bias is added to a product, not accumulated")
        for row in 0..<m { (c + row * ldc).update(from: bias, count: n) }
        return true
    }
}

extension Float: GEMMOperand {
    /// oneDNN when it is the float32 backend and the product is not tiny
    /// (``OneDNN/isTiny(m:n:k:)``); OpenBLAS otherwise.
    public static func multiply(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        bias: UnsafePointer<Float>?, accumulate: Bool, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        if GEMMBackend.float32 == .oneDNN, !OneDNN.isTiny(m: m, n: n, k: k),
           OneDNN.gemm(type: dnnl_f32, transA: transA, transB: transB, m: m, n: n, k: k, a: a, lda: lda,
                       b: b, ldb: ldb, bias: bias, accumulate: accumulate, c: c, ldc: ldc) {
            return
        }
        let beta: Float = biasRows(bias, m: m, n: n, accumulate: accumulate, c: c, ldc: ldc) ? 1 : 0
        gemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 1, a: a, lda: lda, b: b, ldb: ldb,
             beta: beta, c: c, ldc: ldc)
    }
}

extension Double: GEMMOperand {
    public static func multiply(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        a: UnsafePointer<Double>, lda: Int, b: UnsafePointer<Double>, ldb: Int,
        bias: UnsafePointer<Double>?, accumulate: Bool, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        let beta: Double = biasRows(bias, m: m, n: n, accumulate: accumulate, c: c, ldc: ldc) ? 1 : 0
        gemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 1, a: a, lda: lda, b: b, ldb: ldb,
             beta: beta, c: c, ldc: ldc)
    }
}

extension BFloat16: GEMMOperand {
    /// oneDNN's bf16 matmul (float32 accumulation and output). Only chosen where oneDNN runs;
    /// should a shape have no primitive, the operands are widened and multiplied in float32.
    static func multiply(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        a: UnsafePointer<BFloat16>, lda: Int, b: UnsafePointer<BFloat16>, ldb: Int,
        bias: UnsafePointer<Float>?, accumulate: Bool, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        if OneDNN.gemm(type: dnnl_bf16, transA: transA, transB: transB, m: m, n: n, k: k, a: a, lda: lda,
                       b: b, ldb: ldb, bias: bias, accumulate: accumulate, c: c, ldc: ldc) {
            return
        }
        widenedProduct(transA: transA, transB: transB, m: m, n: n, k: k, a: a, lda: lda, b: b, ldb: ldb,
                       accumulate: biasRows(bias, m: m, n: n, accumulate: accumulate, c: c, ldc: ldc), c: c, ldc: ldc)
    }
}

/// `C (+)= op(A) op(B)` for half-precision operands by widening one row of `op(A)` and one
/// column block at a time (no allocation: a fixed stack buffer), then float32 dot products. The
/// last resort when oneDNN cannot run a shape: correct, never fast.
func widenedProduct<E: Element>(
    transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
    a: UnsafePointer<E>, lda: Int, b: UnsafePointer<E>, ldb: Int,
    accumulate: Bool, c: UnsafeMutablePointer<E.Compute>, ldc: Int
) {
    for i in 0..<m {
        for j in 0..<n {
            var sum: E.Compute = 0
            for p in 0..<k {
                let x = E.wide(transA ? a[p * lda + i] : a[i * lda + p])
                let y = E.wide(transB ? b[j * ldb + p] : b[p * ldb + j])
                sum += x * y
            }
            c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum
        }
    }
}

/// Which library multiplies each element type in this process.
public enum GEMMBackend: Sendable, Equatable {
    case openBLAS
    case oneDNN
    /// Half-precision operands widened to float32 (then float32's backend).
    case widened

    /// float32: OpenBLAS, unless its kernels were chosen for an older CPU than this one (Debian's
    /// OpenBLAS 0.3.21 runs its Prescott or Haswell kernels on recent CPUs unless the caller
    /// sets `OPENBLAS_CORETYPE`), where oneDNN, which detects the CPU itself, is up to twice as
    /// fast.
    public static let float32: GEMMBackend = {
        guard OneDNN.api != nil else { return .openBLAS }
        let core = BLASThreads.coreName.lowercased()
        let flags = cpuFlags()
        let avx512Cores = ["skylakex", "cooperlake", "sapphirerapids"]
        let avx2Cores = avx512Cores + ["haswell", "zen", "zen2", "zen3", "zen4", "skylake", "alderlake"]
        if flags.contains("avx512f") && !avx512Cores.contains(core) { return .oneDNN }
        if flags.contains("avx2") && !avx2Cores.contains(core) { return .oneDNN }
        return .openBLAS
    }()

    /// bfloat16: oneDNN's bf16 kernels on AMX tiles; on a CPU with AVX512-BF16 but no AMX, bf16
    /// GEMMs may be faster or slower than widening to float32 (0.3–2× across CPUs), so the two
    /// are timed once per process (``bfloat16Measured``); widened where the CPU has no bf16
    /// units, or when forced.
    public static var bfloat16: GEMMBackend {
        if forceWidened.load() || !OneDNN.hasNativeBFloat16 { return .widened }
        return OneDNN.hasAMX ? .oneDNN : bfloat16Measured
    }

    /// oneDNN's bf16 product, unless widening to float32 (the widened path's per-call work: the
    /// activations converted, then a float32 product against a float32 weight) ran a 256 × 1024
    /// × 1024 product at least 25% faster, best of three each: about 30 ms, once, when the first
    /// bf16 adapter is created. The margin keeps a busy machine's timing noise from choosing
    /// differently in different processes; only a CPU whose bf16 kernels are clearly slower
    /// (oneDNN's on some AVX512-BF16 Xeons) widens. `loldu_set_widened_half` pins widening.
    static let bfloat16Measured: GEMMBackend = {
        let (m, n, k) = (256, 1024, 1024)
        guard let x = try? HeapBuffer<BFloat16>(count: m * k), let w = try? HeapBuffer<BFloat16>(count: n * k),
              let wideX = try? HeapBuffer<Float>(count: m * k), let wideW = try? HeapBuffer<Float>(count: n * k),
              let c = try? HeapBuffer<Float>(count: m * n)
        else { return .widened }
        for i in 0..<(m * k) { wideX.pointer[i] = Float((i * 7919) % 1000) * 1e-3 - 0.5 }
        for i in 0..<(n * k) { wideW.pointer[i] = Float((i * 104_729) % 1000) * 1e-3 - 0.5 }
        BFloat16.narrow(wideX.pointer, to: x.pointer, count: m * k)
        BFloat16.narrow(wideW.pointer, to: w.pointer, count: n * k)
        func seconds(_ body: () -> Bool) -> Double? {
            var best = Double.infinity
            for _ in 0..<4 {  // the first run creates the primitive: best of the other three
                let start = monotonicSeconds()
                guard body() else { return nil }
                best = Swift.min(best, monotonicSeconds() - start)
            }
            return best
        }
        let native = seconds {
            OneDNN.gemm(type: dnnl_bf16, transA: false, transB: true, m: m, n: n, k: k, a: x.pointer, lda: k,
                        b: w.pointer, ldb: k, accumulate: false, c: c.pointer, ldc: n)
        }
        let widened = seconds {
            BFloat16.widen(x.pointer, to: wideX.pointer, count: m * k)
            Float.multiply(transA: false, transB: true, m: m, n: n, k: k, a: wideX.pointer, lda: k,
                           b: wideW.pointer, ldb: k, bias: nil, accumulate: false, c: c.pointer, ldc: n)
            return true
        }
        guard let native, let widened else { return .widened }
        return native > 1.25 * widened ? .widened : .oneDNN
    }()

    /// float16: widened to float32 (oneDNN 2.6 has no float16 matmul kernels for x86 CPUs).
    public static var float16: GEMMBackend { .widened }

    /// The backend for adapters of `dtype` created from now on.
    public static func backend(for dtype: DType) -> GEMMBackend {
        switch dtype {
        case .float32: float32
        case .float64: .openBLAS
        case .bfloat16: bfloat16
        case .float16: float16
        }
    }

    /// Forces half-precision adapters created from now on to widen to float32 (to test that
    /// path, or to compare), or lets the CPU decide again.
    public static let forceWidened = AtomicFlag()

    public var name: String {
        switch self {
        case .openBLAS: "openblas"
        case .oneDNN: "onednn"
        case .widened: "widened"
        }
    }

    /// The CPU's feature flags from /proc/cpuinfo (empty where unreadable). Read to the end of
    /// the file: /proc files report a size of 0.
    static func cpuFlags() -> Set<Substring> {
        let fd = open("/proc/cpuinfo", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while bytes.count < 1 << 24 {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            bytes += chunk[0..<n]
        }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
              let colon = line.firstIndex(of: ":") else { return [] }
        return Set(line[line.index(after: colon)...].split(separator: " "))
    }
}

/// A flag read and written from any thread.
public final class AtomicFlag: @unchecked Sendable {
    private var value = false
    private let mutex = ProcessMutex()

    public func load() -> Bool {
        mutex.withLock { value }
    }

    public func store(_ new: Bool) {
        mutex.withLock { value = new }
    }
}

extension Float: BLASScalar {
    public static var dtype: DType { .float32 }

    public static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Float, a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    public static func trsm(
        upper: Bool, transA: Bool, unitDiagonal: Bool, m: Int, n: Int,
        a: UnsafePointer<Float>, lda: Int, b: UnsafeMutablePointer<Float>, ldb: Int
    ) {
        cblas_strsm(
            CblasRowMajor, CblasLeft, upper ? CblasUpper : CblasLower,
            transA ? CblasTrans : CblasNoTrans, unitDiagonal ? CblasUnit : CblasNonUnit,
            Int32(m), Int32(n), 1, a, Int32(lda), b, Int32(ldb))
    }

    public static func getrf(
        m: Int, n: Int, a: UnsafeMutablePointer<Float>, lda: Int,
        ipiv: UnsafeMutablePointer<Int32>
    ) -> Int32 {
        LAPACKE_sgetrf_work(LAPACK_COL_MAJOR, Int32(m), Int32(n), a, Int32(lda), ipiv)
    }
}

extension Double: BLASScalar {
    public static var dtype: DType { .float64 }

    public static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Double, a: UnsafePointer<Double>, lda: Int,
        b: UnsafePointer<Double>, ldb: Int,
        beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        cblas_dgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    public static func trsm(
        upper: Bool, transA: Bool, unitDiagonal: Bool, m: Int, n: Int,
        a: UnsafePointer<Double>, lda: Int, b: UnsafeMutablePointer<Double>, ldb: Int
    ) {
        cblas_dtrsm(
            CblasRowMajor, CblasLeft, upper ? CblasUpper : CblasLower,
            transA ? CblasTrans : CblasNoTrans, unitDiagonal ? CblasUnit : CblasNonUnit,
            Int32(m), Int32(n), 1, a, Int32(lda), b, Int32(ldb))
    }

    public static func getrf(
        m: Int, n: Int, a: UnsafeMutablePointer<Double>, lda: Int,
        ipiv: UnsafeMutablePointer<Int32>
    ) -> Int32 {
        LAPACKE_dgetrf_work(LAPACK_COL_MAJOR, Int32(m), Int32(n), a, Int32(lda), ipiv)
    }
}

/// OpenBLAS's work buffers, and an address-space limit (`RLIMIT_AS`, `ulimit -v`).
///
/// OpenBLAS maps a 128 MiB buffer for each worker thread when the thread starts, and one for
/// each caller of a level-3 or LAPACK call that finds no free one (buffers are kept and reused);
/// when a mapping fails, Debian's 0.3.21 retries it forever (`blas_memory_alloc`). So the
/// library checks the room before those mappings: before its first BLAS call, and again after
/// threads were added (``ensure()``, at each adapter creation and `loldu_gemm_backend`), it
/// refuses with `outOfMemory` unless the limit leaves room for one buffer, then maps it with a
/// 2 × 2 LU; ``BLASThreads/set(_:)`` refuses threads whose buffers and stacks the room cannot
/// hold. What it cannot help: calls from several threads of the caller at the same time (each
/// may map a buffer of its own), and workers that OpenBLAS started, when it loaded, under a
/// limit too tight for their buffers (they never run: its threaded calls and the process's
/// exit wait for them).
public enum BLASWorkBuffers {
    /// OpenBLAS's `BUFFER_SIZE` on x86-64 (`32 << 22` bytes) and the page its allocator adds.
    static let bytes = (32 << 22) + 4096
    /// Room for the allocator's own needs beside the buffers.
    static let margin = 1 << 20
    /// The size of a memory page (a thread stack's guard, the unit of `/proc/self/statm`).
    private static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    /// Whether a buffer for the library's calls is mapped and free between calls.
    nonisolated(unsafe) private static var mapped = false
    /// The most threads OpenBLAS has had in this process (it never stops a thread it started).
    nonisolated(unsafe) private static var started = 0
    /// Guards `mapped`, `started`, and the check and change of a thread count.
    private static let mutex = ProcessMutex()

    /// Maps the buffers the library's BLAS calls use, if not done yet, when the address-space
    /// limit leaves room for them: one for the calling thread, and one for each worker thread,
    /// which takes a buffer of its own at its first threaded product and keeps it (so a first
    /// threaded product under a limit set later would map a new one for the caller).
    public static func ensure() throws(LoLDUError) {
        try mutex.withLock { () throws(LoLDUError) in
            guard !mapped else { return }
            let threads = Swift.max(1, BLASThreads.count)
            try check(needed: threads * bytes + margin,
                      for: threads == 1 ? "OpenBLAS's work buffer" : "OpenBLAS's work buffers for its \(threads) threads (loldu_set_num_threads(1) needs one)")
            // LAPACK's getrf takes a buffer whatever the size; this one runs on the calling thread.
            var a: [Double] = [2, 1, 1, 3], pivots: [Int32] = [0, 0]
            _ = Double.getrf(m: 2, n: 2, a: &a, lda: 2, ipiv: &pivots)
            if threads > 1 {  // a product OpenBLAS splits among all its threads (beyond 2^18 multiply-adds)
                let m = 64 * threads, k = 64
                let operands = try HeapBuffer<Double>(zeros: 2 * m * k + k * k)
                withExtendedLifetime(operands) {
                    let p = operands.pointer
                    Double.gemm(transA: false, transB: false, m: m, n: k, k: k, alpha: 1, a: p, lda: k,
                                b: p + m * k, ldb: k, beta: 0, c: p + m * k + k * k, ldc: k)
                }
            }
            mapped = true
        }
    }

    /// Sets OpenBLAS's thread count after checking that the limit has room for the buffer and
    /// stack of each thread it would start; a started thread takes the free buffer, so the next
    /// ``ensure()`` maps another.
    static func setThreads(_ count: Int) throws(LoLDUError) {
        try mutex.withLock { () throws(LoLDUError) in
            started = Swift.max(started, BLASThreads.count)
            let more = Swift.min(count, maxThreads) - started
            if more > 0 {
                var attributes = pthread_attr_t(), stack = 0
                pthread_attr_init(&attributes)
                pthread_attr_getstacksize(&attributes, &stack)
                pthread_attr_destroy(&attributes)
                let (perThread, o1) = (bytes + stack).addingReportingOverflow(pageSize)
                let (threads, o2) = perThread.multipliedReportingOverflow(by: more)
                try check(needed: o1 || o2 ? Int.max : threads &+ margin,
                          for: "OpenBLAS's work buffers and stacks for \(more) more thread(s)")
            }
            openblas_set_num_threads(Int32(count))
            if more > 0 { mapped = false }
            started = Swift.max(started, BLASThreads.count)
        }
    }

    /// Refuses with `outOfMemory` when the address-space limit leaves less than `needed` bytes.
    private static func check(needed: Int, for what: String) throws(LoLDUError) {
        guard let room = addressSpaceRoom(), room < needed else { return }
        throw LoLDUError(.outOfMemory, "the address-space limit (RLIMIT_AS, ulimit -v) leaves \(room >> 20) MiB of address space and \(what) needs \(needed == .max ? "more than that" : "\(needed >> 20) MiB"): raise the limit")
    }

    /// The most threads this OpenBLAS was built for (`MAX_THREADS=` in its configuration).
    private static var maxThreads: Int {
        let config = openblas_get_config().map { String(cString: $0) } ?? ""
        guard let entry = config.split(separator: " ").first(where: { $0.hasPrefix("MAX_THREADS=") }),
              let value = Int(entry.dropFirst("MAX_THREADS=".count)) else { return .max }
        return value
    }

    /// Bytes the address-space limit still allows the process to map, or nil without a limit
    /// (or when /proc cannot tell the current size).
    private static func addressSpaceRoom() -> Int? {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_AS.rawValue), &limit) == 0, limit.rlim_cur != rlim_t.max else { return nil }
        let fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var text = [UInt8](repeating: 0, count: 64)
        var count = -1
        repeat { count = text.withUnsafeMutableBytes { read(fd, $0.baseAddress, 63) } } while count < 0 && errno == EINTR
        guard count > 0 else { return nil }
        var pages = 0  // the first field: the process's size in pages, what RLIMIT_AS limits
        for byte in text[0..<count] {
            guard byte >= 48, byte <= 57, pages < Int.max / 10 - 9 else { break }
            pages = pages * 10 + Int(byte - 48)
        }
        let (used, overflow) = pages.multipliedReportingOverflow(by: pageSize)
        guard !overflow else { return 0 }
        let allowed = limit.rlim_cur > UInt(Int.max) ? Int.max : Int(limit.rlim_cur)
        return allowed > used ? allowed - used : 0
    }
}

/// The number of threads the GEMM libraries use for every later call in this process.
public enum BLASThreads {
    public static var count: Int { Int(openblas_get_num_threads()) }

    /// Sets the count; refuses with `outOfMemory` (changing nothing) when the address-space
    /// limit leaves no room for the threads OpenBLAS would start (``BLASWorkBuffers``).
    public static func set(_ count: Int) throws(LoLDUError) {
        try BLASWorkBuffers.setThreads(count)
    }

    /// The threads for one `m × n × k` product: one per `perThread` FLOPs, at most ``count``.
    /// Waking a waiting OpenMP thread costs about 45 µs on a 2-core machine with passive waits,
    /// the time of 8 MFLOP on one core: below that a second thread makes a product slower
    /// (measured: a 64 × 16 × 16 product 1.4 µs on one thread, 48 µs on two).
    static func count(m: Int, n: Int, k: Int) -> Int {
        let perThread = 8.0e6
        let useful = Int(min(2.0 * Double(m) * Double(n) * Double(k) / perThread, Double(Int32.max)))
        return Swift.max(1, Swift.min(count, useful))
    }

    /// OpenBLAS's kernel family, as it reports it (e.g. "Haswell", "SkylakeX").
    static var coreName: String { openblas_get_corename().map { String(cString: $0) } ?? "unknown" }

    /// The libraries and kernels in use, for benchmark reports.
    public static var description: String {
        let config = openblas_get_config().map { String(cString: $0) } ?? "unknown"
        var text = "OpenBLAS \(config), core \(coreName)"
        if let api = OneDNN.api { text += "; \(api.version), ISA \(OneDNN.isaName)" }
        return text
    }
}
