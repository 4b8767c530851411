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

/// The number of threads BLAS uses for every later call in this process.
public enum BLASThreads {
    public static var count: Int { Int(openblas_get_num_threads()) }

    public static func set(_ count: Int) {
        openblas_set_num_threads(Int32(count))
    }

    /// OpenBLAS's build description, for benchmark reports (e.g. "DYNAMIC_ARCH ... SkylakeX").
    public static var description: String {
        let config = openblas_get_config().map { String(cString: $0) } ?? "unknown"
        let core = openblas_get_corename().map { String(cString: $0) } ?? "unknown"
        return "OpenBLAS \(config), core \(core)"
    }
}
