import CLinearAlgebra
import CLoLDU
import Foundation
import Testing

// Helpers shared by the tests. The library is reached only through include/loldu.h; LAPACK and
// BLAS are used directly only as independent oracles.

/// `Float` or `Double`, with the library's dtype tag and oracle kernels.
protocol TestScalar: BinaryFloatingPoint, BitwiseCopyable, Sendable {
    static var dtype: loldu_dtype { get }
}

extension Float: TestScalar {
    static var dtype: loldu_dtype { LOLDU_FLOAT32 }
}

extension Double: TestScalar {
    static var dtype: loldu_dtype { LOLDU_FLOAT64 }
}

/// Row-major full LU with partial pivoting of `W`'s values in double (LAPACK's `dgetrf`, the
/// library's documented reference), in place; returns `info`.
func oracleGetrf(m: Int, n: Int, a: inout [Double], ipiv: inout [Int32]) -> Int32 {
    LAPACKE_dgetrf(LAPACK_ROW_MAJOR, Int32(m), Int32(n), &a, Int32(n), &ipiv)
}

/// Deterministic test data (SplitMix64).
struct TestRandom {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    mutating func symmetric() -> Double { Double(next() >> 11) * 0x1p-52 - 1 }
    mutating func array<T: TestScalar>(_ count: Int, _: T.Type = T.self) -> [T] {
        (0..<count).map { _ in T(symmetric()) }
    }
}

/// Plain matrix product in Double for oracles: `a` is `m × k`, `b` is `k × n`, row-major.
func matmul<T: TestScalar>(_ a: [T], _ b: [T], _ m: Int, _ k: Int, _ n: Int) -> [Double] {
    var c = [Double](repeating: 0, count: m * n)
    for i in 0..<m {
        for p in 0..<k {
            let aip = Double(a[i * k + p])
            if aip == 0 { continue }
            for j in 0..<n { c[i * n + j] += aip * Double(b[p * n + j]) }
        }
    }
    return c
}

func transpose<T>(_ a: [T], _ rows: Int, _ cols: Int) -> [T] {
    (0..<(rows * cols)).map { idx in a[(idx % rows) * cols + idx / rows] }
}

/// `|actual − expected| ≤ atol + rtol · |expected|` elementwise, reporting the worst element.
func expectClose<A: BinaryFloatingPoint, B: BinaryFloatingPoint>(
    _ actual: [A], _ expected: [B], rtol: Double, atol: Double, _ what: String,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(actual.count == expected.count, "\(what): sizes differ", sourceLocation: sourceLocation)
    var worst = 0.0, worstIndex = -1
    for i in 0..<min(actual.count, expected.count) {
        let a = Double(actual[i]), e = Double(expected[i])
        let excess = abs(a - e) - (atol + rtol * abs(e))
        if !(excess <= worst) { worst = excess.isNaN ? .infinity : excess; worstIndex = i }
    }
    #expect(worstIndex < 0,
            "\(what): element \(worstIndex) is \(worstIndex >= 0 ? Double(actual[worstIndex]) : 0), expected \(worstIndex >= 0 ? Double(expected[worstIndex]) : 0)",
            sourceLocation: sourceLocation)
}

/// Whether the library multiplies `T` with the BLAS `bareLayer` calls (OpenBLAS), so that the
/// same product gives the same bits: float32 goes to oneDNN where OpenBLAS runs kernels older
/// than the CPU (`OPENBLAS_CORETYPE=Prescott`, say).
func sameGEMM<T: TestScalar>(as _: T.Type) -> Bool {
    var backend = LOLDU_BACKEND_OPENBLAS
    #expect(loldu_gemm_backend(T.dtype, &backend, nil) == LOLDU_OK)
    return backend == LOLDU_BACKEND_OPENBLAS
}

func tolerance<T: TestScalar>(_: T.Type) -> Double { T.self == Float.self ? 2e-4 : 1e-10 }

/// `loldu_adapter_get_info` of a handle.
func adapterInfo(_ handle: OpaquePointer) -> loldu_adapter_info {
    var info = loldu_adapter_info()
    #expect(loldu_adapter_get_info(handle, &info, MemoryLayout<loldu_adapter_info>.size) == LOLDU_OK)
    return info
}

/// An adapter handle, freed with the test object; every method calls the C ABI.
final class TestAdapter<T: TestScalar> {
    let handle: OpaquePointer
    let m: Int, n: Int, rank: Int
    let weight: [T]
    let bias: [T]?

    init(m: Int, n: Int, weight: [T], bias: [T]? = nil, configure: (inout loldu_config) -> Void = { _ in }) throws {
        var config = loldu_config()
        #expect(loldu_config_default(&config) == LOLDU_OK)
        configure(&config)
        var handle: OpaquePointer?
        let status = loldu_adapter_create(&handle, T.dtype, Int64(m), Int64(n), weight, bias, &config)
        guard status == LOLDU_OK, let handle else {
            throw LibraryError(status: status, message: String(cString: loldu_last_error()))
        }
        self.handle = handle
        self.m = m
        self.n = n
        rank = Int(adapterInfo(handle).rank)  // (config.rank 0 means full rank)
        self.weight = weight
        self.bias = bias
    }

    /// Takes ownership of an existing handle.
    init(adopting handle: OpaquePointer, m: Int, n: Int, rank: Int) {
        self.handle = handle
        self.m = m
        self.n = n
        self.rank = rank
        var w = [T](repeating: 0, count: m * n)
        _ = loldu_get_factor(handle, LOLDU_FACTOR_WEIGHT, &w)
        weight = w
        var b = [T](repeating: 0, count: m)
        bias = loldu_get_factor(handle, LOLDU_FACTOR_BIAS, &b) == LOLDU_OK ? b : nil
    }

    deinit { loldu_adapter_free(handle) }

    var info: loldu_adapter_info { adapterInfo(handle) }

    func forward(_ x: [T], batch: Int, h: UnsafeMutablePointer<T>? = nil) -> [T] {
        var y = [T](repeating: .nan, count: batch * m)
        let status = loldu_forward(handle, Int64(batch), x, &y, h)
        #expect(status == LOLDU_OK, "forward: \(String(cString: loldu_last_error()))")
        return y
    }

    /// Returns dX; gradients accumulate in the adapter.
    @discardableResult
    func backward(_ x: [T], _ dy: [T], batch: Int, h: UnsafePointer<T>? = nil) -> [T] {
        var dx = [T](repeating: .nan, count: batch * n)
        let status = loldu_backward(handle, Int64(batch), x, dy, &dx, h)
        #expect(status == LOLDU_OK, "backward: \(String(cString: loldu_last_error()))")
        return dx
    }

    var z: [T] {
        get {
            var z = [T](repeating: .nan, count: rank)
            #expect(loldu_get_z(handle, &z) == LOLDU_OK)
            return z
        }
        set { #expect(loldu_set_z(handle, newValue) == LOLDU_OK) }
    }

    var sigma: Double {
        get {
            var s = Double.nan
            #expect(loldu_get_sigma(handle, &s) == LOLDU_OK)
            return s
        }
        set { #expect(loldu_set_sigma(handle, newValue) == LOLDU_OK) }
    }

    /// `dz` then `dσ`, read through the stable gradient pointer.
    var grads: [T] {
        var g: UnsafeMutableRawPointer?
        #expect(loldu_params(handle, nil, &g) == LOLDU_OK)
        return Array(UnsafeBufferPointer(start: g!.assumingMemoryBound(to: T.self), count: rank + 1))
    }

    var biasGrad: [T] {
        var db: UnsafeMutableRawPointer?
        #expect(loldu_bias_grad(handle, &db) == LOLDU_OK)
        guard let db else { return [] }
        return Array(UnsafeBufferPointer(start: db.assumingMemoryBound(to: T.self), count: m))
    }

    func factor(_ which: loldu_factor) -> [T] {
        let count: Int
        switch which {
        case LOLDU_FACTOR_LOWER: count = m * rank
        case LOLDU_FACTOR_DIAG: count = rank
        case LOLDU_FACTOR_UPPER: count = rank * n
        case LOLDU_FACTOR_BIAS: count = m
        default: count = m * n
        }
        var out = [T](repeating: .nan, count: count)
        #expect(loldu_get_factor(handle, which, &out) == LOLDU_OK)
        return out
    }

    var pivots: [Int32] {
        var p = [Int32](repeating: -1, count: rank)
        #expect(loldu_get_pivots(handle, &p) == LOLDU_OK)
        return p
    }

    var effectiveWeight: [T] {
        var w = [T](repeating: .nan, count: m * n)
        #expect(loldu_effective_weight(handle, &w) == LOLDU_OK)
        return w
    }

    func setPath(_ path: loldu_path) { #expect(loldu_set_path(handle, path) == LOLDU_OK) }
    func zeroGrad() { #expect(loldu_zero_grad(handle) == LOLDU_OK) }
}

struct LibraryError: Error, CustomStringConvertible {
    let status: loldu_status
    let message: String
    var description: String { "status \(status.rawValue): \(message)" }
}

/// The bare layer `x Wᵀ + b`: one GEMM with beta = 1 onto rows of the bias, as the library does
/// on OpenBLAS (on the small shapes of the tests, where the product is one block, this also
/// equals oneDNN's product-then-bias), so that an unchanged layer compares bit for bit.
func bareLayer<T: TestScalar>(_ x: [T], _ w: [T], _ b: [T]?, batch: Int, m: Int, n: Int) -> [T] {
    var y = [T](repeating: 0, count: batch * m)
    if let b { for r in 0..<batch { for i in 0..<m { y[r * m + i] = b[i] } } }
    let beta: T = b == nil ? 0 : 1
    if T.self == Float.self {
        x.withUnsafeBufferPointer { xp in w.withUnsafeBufferPointer { wp in y.withUnsafeMutableBufferPointer { yp in
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(batch), Int32(m), Int32(n), 1,
                        UnsafeRawPointer(xp.baseAddress!).assumingMemoryBound(to: Float.self), Int32(n),
                        UnsafeRawPointer(wp.baseAddress!).assumingMemoryBound(to: Float.self), Int32(n),
                        Float(beta), UnsafeMutableRawPointer(yp.baseAddress!).assumingMemoryBound(to: Float.self), Int32(m))
        } } }
    } else {
        x.withUnsafeBufferPointer { xp in w.withUnsafeBufferPointer { wp in y.withUnsafeMutableBufferPointer { yp in
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(batch), Int32(m), Int32(n), 1,
                        UnsafeRawPointer(xp.baseAddress!).assumingMemoryBound(to: Double.self), Int32(n),
                        UnsafeRawPointer(wp.baseAddress!).assumingMemoryBound(to: Double.self), Int32(n),
                        Double(beta), UnsafeMutableRawPointer(yp.baseAddress!).assumingMemoryBound(to: Double.self), Int32(m))
        } } }
    }
    return y
}

/// C enums import with `UInt32` raw values; the config and info structs hold `int32_t`.
protocol CEnum: RawRepresentable where RawValue == UInt32 {}
extension CEnum { var i32: Int32 { Int32(bitPattern: rawValue) } }
extension loldu_z_init: CEnum {}
extension loldu_residual: CEnum {}
extension loldu_path: CEnum {}
extension loldu_dtype: CEnum {}
extension loldu_schedule: CEnum {}
extension loldu_lora_kind: CEnum {}

let allPaths: [loldu_path] = [LOLDU_PATH_FACTORED, LOLDU_PATH_MERGED, LOLDU_PATH_MERGED_WGRAD, LOLDU_PATH_AUTO]
let allInits: [loldu_z_init] = [
    LOLDU_INIT_LU, LOLDU_INIT_CONSTANT, LOLDU_INIT_UNIFORM, LOLDU_INIT_NORMAL,
    LOLDU_INIT_S_UNIFORM, LOLDU_INIT_S_NORMAL, LOLDU_INIT_ONES, LOLDU_INIT_ZEROS,
]

/// A new empty directory for one test. All of a test process's directories are made inside one
/// directory, removed when the process exits, so that no test cleans up after itself.
func temporaryDirectory() throws -> String {
    guard let root = TestDirectories.root else { throw LibraryError(status: LOLDU_ERR_IO, message: "mkdtemp failed in \(NSTemporaryDirectory())") }
    return try makeDirectory(prefix: root + "/test")
}

private enum TestDirectories {
    static let root: String? = {
        let root = try? makeDirectory(prefix: NSTemporaryDirectory() + "loldu-test")
        atexit { if let root = TestDirectories.root { try? FileManager.default.removeItem(atPath: root) } }
        return root
    }()
}

/// `mkdtemp` of `prefix` + "-XXXXXX".
private func makeDirectory(prefix: String) throws -> String {
    var template = Array((prefix + "-XXXXXX").utf8CString)
    guard let made = mkdtemp(&template) else { throw LibraryError(status: LOLDU_ERR_IO, message: "mkdtemp failed for \(prefix)") }
    return String(cString: made)
}
