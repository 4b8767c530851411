import Glibc

/// Rows per block when moving between row-major `W`/`A` and the column-major panel: each
/// column's run of a block fills whole cache lines instead of touching one line per element.
private let transposeBlock = 16

/// The frozen part of an adapter: the pretrained weight and its rank-`r` LDU factors.
///
/// `W = P L D U` by LU with partial pivoting (`k = min(m, n)`); of it we keep
/// - `W` itself (`m × n`, row-major, bit for bit as given: a copy, or the caller's buffer when
///   borrowed) and the optional bias (a copy),
/// - `A = P L_r` (`m × r`, rows already permuted, so `P` costs nothing at run time),
/// - `D_r = diag(U)[:r]` and `U_r = D_r⁻¹ U[:r, :]` (`r × n`, unit diagonal),
/// - LAPACK's first `r` pivots (1-based row interchanges).
///
/// Only the first `r` elimination steps matter and they depend only on the first `r` columns,
/// so the factorisation is one `getrf` of the `m × r` panel, the panel's row swaps applied to
/// the top `r` rows, and one `trsm` for `U₁₂ = L₁₁⁻¹ (PᵀW)[:r, r:]`: `O((m + n) r²)` flops
/// against the full factorisation's `O(m n k)`. The elimination runs in `Double` whatever the
/// element type (the conversion of `W`'s values is exact), and the factors are rounded to the
/// element type once at the end: the pivots are those of the first `r` steps of LAPACK's
/// `dgetrf` on `W`'s values, and `L_r`, `D_r`, `U_r` equal its factors to one rounding.
///
/// Degenerate pivots: when `|D_j| ≤ 2¹⁶ · ε_double · max(m, r) · g`, with `g` the largest
/// magnitude in the panel and its computed `U₁₁` (the elimination's own scale), the pivot is
/// zero to the rounding of the elimination — the first `r` columns have numerical rank below
/// `r`. Such a row `U_r[j, :]` cannot be normalised; it is set to `e_jᵀ` (unit diagonal, zeros
/// elsewhere), so every factor stays finite, and the stored `W` keeps the layer exact. Past the
/// first degenerate pivot, the pivots are chosen among rounding noise: any choice gives a valid
/// factorisation, but they may differ from another LAPACK's (or from a full `getrf`'s). A weight
/// whose entries are rounded from a low-rank product (float32 data from a double product, say)
/// is not rank deficient as given: its small trailing pivots are genuine, and kept.
/// A subnormal pivot, whose reciprocal overflows, is divided by instead, as reference LAPACK does.
/// A factor that overflows the element type when rounded to it is refused (`notFinite`).
///
/// Element types: `W` is kept in its element type `E` (bf16, f16, f32 or f64) and the bias is
/// widened to the compute type `P`; `A`, `D_r`, `U_r` are kept in `P`. The GEMMs run on operands
/// of type `G`: `E` itself where the CPU multiplies it natively (f32, f64, bf16 on bf16 units),
/// with `A` and `U_r` also rounded to `G` once; or `P` (a half type widened), with `W` widened
/// once at creation.
///
/// Immutable after creation: may be shared read-only across threads and adapters.
public final class LDUFactors<E: Element, G: GEMMOperand>: @unchecked Sendable where G.Compute == E.Compute {
    public typealias P = E.Compute
    public let m: Int
    public let n: Int
    public let rank: Int
    /// `W`: ``weightStorage`` or, when borrowed, the caller's buffer.
    public let weight: UnsafePointer<E>
    private let weightStorage: HeapBuffer<E>?
    public let bias: HeapBuffer<P>?
    public let lower: HeapBuffer<P>
    public let upper: HeapBuffer<P>
    public let diagonal: [P]
    public let pivots: [Int32]
    /// How many of the first `r` pivots were degenerate (see the type's documentation).
    public let degeneratePivots: Int
    /// `W`, `A` and `U_r` as GEMM operands (the buffers above when their type is `G`).
    let weightOperand: UnsafePointer<G>
    let lowerOperand: UnsafePointer<G>
    let upperOperand: UnsafePointer<G>
    private let operandStorage: [HeapBuffer<G>]
    /// The fingerprint of `W`'s values (see ``fingerprint(_:)``), computed at creation (a
    /// base's property, as its factors are: loading a checkpoint onto the base only compares it):
    /// of their float32 bytes for float32, bfloat16 and float16 weights (so that a bf16 model and
    /// its float32 copy have the same), of their float64 bytes for float64. Factors converted to
    /// another element type keep the fingerprint of the weight they factor.
    public let weightFingerprint: String
    /// `AᵀA`, `U Uᵀ` (`rank × rank` each) and `‖W‖²`, once asked for (see ``grams()``).
    private var gramCache: (lower: HeapBuffer<P>, upper: HeapBuffer<P>, weight: Double)?
    /// `max |W|`, `max |A|`, `max |U_r|`, once asked for (see ``magnitudes()``).
    private var magnitudeCache: (weight: Double, lower: Double, upper: Double)?
    /// Guards `gramCache` and `magnitudeCache`.
    private let cacheLock: UnsafeMutablePointer<pthread_mutex_t>

    /// The scale of the degeneracy test, in units of `ε_double · max(m, r) · g`.
    static var degenerateScale: Double { 0x1p16 }

    /// The factorisation proper: what adapters of different element types may share.
    public struct Factorization: @unchecked Sendable {
        let lower: HeapBuffer<P>, upper: HeapBuffer<P>
        let diagonal: [P], pivots: [Int32], degeneratePivots: Int
    }

    /// Factors `weight` (`m × n`, row-major). Refuses NaN and ±Inf with `notFinite`.
    /// With `borrowWeight`, keeps `source` itself instead of a copy: the caller guarantees that it
    /// outlives every adapter on these factors and does not change.
    public convenience init(
        m: Int, n: Int, rank r: Int, weight source: UnsafePointer<E>, bias biasSource: UnsafePointer<E>?,
        borrowWeight: Bool = false
    ) throws(LoLDUError) {
        let storage = borrowWeight ? nil : try HeapBuffer<E>(count: m * n)
        try checkFinite(source, count: m * n, copyingTo: storage?.pointer, name: "weight", columns: n)
        let weight = storage.map { UnsafePointer($0.pointer) } ?? source
        let parts = try Self.factorize(m: m, n: n, rank: r, weight: weight)
        try self.init(m: m, n: n, weight: weight, storage: storage, bias: try Self.bias(biasSource, m: m), parts: parts)
    }

    /// `factorization` (of another element type's weight with the same compute type) for its
    /// weight rounded to `E`: `fill` writes the `m × n` rounded weight; `bias` is shared. The
    /// fingerprint stays `sourceFingerprint`, that of the weight the factorisation is of: a
    /// checkpoint saved on these factors loads onto factors of that weight, not onto the
    /// different factorisation of the rounded one.
    public convenience init(
        m: Int, n: Int, sharing parts: Factorization, sourceFingerprint: String, bias: HeapBuffer<P>?,
        weight fill: (UnsafeMutablePointer<E>) -> Void
    ) throws(LoLDUError) {
        let storage = try HeapBuffer<E>(count: m * n)
        fill(storage.pointer)
        do {
            try checkFinite(UnsafePointer(storage.pointer), count: m * n, name: "weight", columns: n)
        } catch {
            throw LoLDUError(.notFinite, "dtype = \(E.dtype.name): the weight does not fit it once rounded (\(error.message))")
        }
        try self.init(m: m, n: n, weight: UnsafePointer(storage.pointer), storage: storage, bias: bias, parts: parts,
                      fingerprint: sourceFingerprint)
    }

    private static func bias(_ source: UnsafePointer<E>?, m: Int) throws(LoLDUError) -> HeapBuffer<P>? {
        guard let source else { return nil }
        try checkFinite(source, count: m, name: "bias")
        let b = try HeapBuffer<P>(count: m)
        E.widen(source, to: b.pointer, count: m)
        return b
    }

    private init(
        m: Int, n: Int, weight: UnsafePointer<E>, storage: HeapBuffer<E>?, bias: HeapBuffer<P>?, parts: Factorization,
        fingerprint: String? = nil
    ) throws(LoLDUError) {
        let r = parts.diagonal.count
        self.m = m
        self.n = n
        self.rank = r
        self.weight = weight
        weightStorage = storage
        self.bias = bias
        lower = parts.lower
        upper = parts.upper
        diagonal = parts.diagonal
        pivots = parts.pivots
        degeneratePivots = parts.degeneratePivots

        // The GEMM operands.
        var operands: [HeapBuffer<G>] = []
        func operand(_ values: UnsafePointer<P>, count: Int) throws(LoLDUError) -> UnsafePointer<G> {
            if G.self == P.self { return UnsafeRawPointer(values).assumingMemoryBound(to: G.self) }
            let copy = try HeapBuffer<G>(count: count)
            G.narrow(values, to: copy.pointer, count: count)
            operands.append(copy)
            return UnsafePointer(copy.pointer)
        }
        if G.self == E.self {
            weightOperand = UnsafeRawPointer(weight).assumingMemoryBound(to: G.self)
        } else {  // a half type widened: W once in float32
            let wide = try HeapBuffer<G>(count: m * n)
            E.widen(weight, to: UnsafeMutableRawPointer(wide.pointer).assumingMemoryBound(to: P.self), count: m * n)
            operands.append(wide)
            weightOperand = UnsafePointer(wide.pointer)
        }
        lowerOperand = try operand(lower.pointer, count: m * r)
        upperOperand = try operand(upper.pointer, count: r * n)
        operandStorage = operands
        if let fingerprint {
            weightFingerprint = fingerprint
        } else {
            var hasher = Fingerprinter()
            Self.forEachWeightPiece(weight, count: m * n) { values, count in
                hasher.add(UnsafeRawBufferPointer(start: values, count: count * MemoryLayout<P>.stride))
            }
            weightFingerprint = hasher.finish()
        }
        cacheLock = .allocate(capacity: 1)
        pthread_mutex_init(cacheLock, nil)
    }

    /// The factorisation, for factors of another element type on the same weight's values.
    var factorization: Factorization {
        Factorization(lower: lower, upper: upper, diagonal: diagonal, pivots: pivots, degeneratePivots: degeneratePivots)
    }

    /// Steps 1–4: the panel LU in double, `U₁₂` by one triangular solve, `D_r` and `U_r` with the
    /// degenerate-pivot fallback, and `A = P L_r`.
    private static func factorize(m: Int, n: Int, rank r: Int, weight w: UnsafePointer<E>) throws(LoLDUError) -> Factorization {
        // 1. getrf of the m × r panel W[:, :r], gathered column-major in double.
        let panel = try HeapBuffer<Double>(count: m * r)
        var scale = gatherPanel(w, n: n, into: panel.pointer, m: m, r: r)  // g, then with U₁₁ below
        var ipiv = [Int32](repeating: 0, count: r)
        let info = ipiv.withUnsafeMutableBufferPointer { Double.getrf(m: m, n: r, a: panel.pointer, lda: m, ipiv: $0.baseAddress!) }
        guard info >= 0 else { throw LoLDUError(.internal, "getrf rejected argument \(-info)") }
        if !Double.allFinite(panel.pointer, count: m * r, copyingTo: nil) {
            // A subnormal pivot: OpenBLAS scales by its reciprocal, which overflows. Redo the
            // panel as reference LAPACK does, dividing instead (see `dividingPanelLU`).
            _ = gatherPanel(w, n: n, into: panel.pointer, m: m, r: r)
            dividingPanelLU(panel.pointer, m: m, r: r, pivots: &ipiv)
        }

        // Row permutation: row i of PᵀW is W[perm[i]].
        let permutation = try HeapBuffer<Int>(count: m)  // (m can be large: an allocation that may fail)
        defer { withExtendedLifetime(permutation) {} }  // (used through its pointer below)
        let perm = permutation.pointer
        for i in 0..<m { perm[i] = i }
        for j in 0..<r { swap(&perm[j], &perm[Int(ipiv[j]) - 1]) }

        // 2. The top r rows of U: U₁₁ from the panel, U₁₂ = L₁₁⁻¹ (PᵀW)[:r, r:].
        let top = try HeapBuffer<Double>(count: r * n)
        let u = top.pointer
        let row = try HeapBuffer<P>(count: n)
        for i in 0..<r {
            for j in 0..<r {
                let v = j >= i ? panel.pointer[i + j * m] : 0
                u[i * n + j] = v
                scale = Swift.max(scale, abs(v))
            }
            if n > r {
                E.widen(w + perm[i] * n + r, to: row.pointer, count: n - r)
                for j in r..<n { u[i * n + j] = Double(row.pointer[j - r]) }
            }
        }
        if n > r {
            // The column-major panel read as row-major is L₁₁ᵀ (upper, unit): solve with its transpose.
            Double.trsm(upper: true, transA: true, unitDiagonal: true, m: r, n: n - r,
                        a: panel.pointer, lda: m, b: u + r, ldb: n)
        }

        // 3. D_r and U_r = D_r⁻¹ U[:r, :], with the degenerate-pivot fallback, rounded to P.
        let tolerance = Self.degenerateScale * Double.ulpOfOne * Double(Swift.max(m, r)) * scale
        let upper = try HeapBuffer<P>(count: r * n)
        var diagonal = [P](repeating: 0, count: r)
        var degenerate = 0
        for j in 0..<r {
            let d = u[j * n + j]
            diagonal[j] = P(d)
            let source = u + j * n, out = upper.pointer + j * n
            for c in 0..<j { out[c] = 0 }
            out[j] = 1
            var finite = abs(d) > tolerance
            if finite {
                for c in (j + 1)..<n { out[c] = P(source[c] / d) }
                finite = P.allFinite(out + j + 1, count: n - j - 1, copyingTo: nil)
            }
            if !finite {
                degenerate += 1
                for c in (j + 1)..<n { out[c] = 0 }
            }
        }
        if let j = diagonal.firstIndex(where: { !$0.isFinite }) {
            throw LoLDUError(.notFinite, "the LU of weight overflows \(P.dtype.name): pivot \(j) is \(u[j * n + j]); scale the weight down or use float64")
        }

        // 4. A = P L_r: row perm[i] of A is row i of the unit lower-trapezoidal L_r.
        let lower = try HeapBuffer<P>(count: m * r)
        let a = lower.pointer
        for block in stride(from: 0, to: m, by: transposeBlock) {
            let rows = block..<Swift.min(block + transposeBlock, m)
            for j in 0..<r {
                for i in rows {
                    a[perm[i] * r + j] = i > j ? P(panel.pointer[i + j * m]) : (i == j ? 1 : 0)
                }
            }
        }
        return Factorization(lower: lower, upper: upper, diagonal: diagonal, pivots: ipiv, degeneratePivots: degenerate)
    }

    deinit {
        pthread_mutex_destroy(cacheLock)
        cacheLock.deallocate()
    }

    /// Whether `W` is the caller's buffer (``init(m:n:rank:weight:bias:borrowWeight:)``).
    var borrowsWeight: Bool { weightStorage == nil }

    /// Bytes of the copy of `W` (0 when borrowed).
    var weightBytes: Int { (weightStorage?.count ?? 0) * MemoryLayout<E>.stride }

    /// Bytes held beyond the weight and the bias: `A`, `U_r`, `D_r`, the pivots, and the GEMM
    /// operands of another type (a widened `W`, `A` and `U_r` rounded to bf16).
    var factorBytes: Int {
        (lower.count + upper.count + diagonal.count) * MemoryLayout<P>.stride + pivots.count * 4
            + operandStorage.reduce(0) { $0 + $1.count * MemoryLayout<G>.stride }
    }

    /// The largest magnitudes of `W`, `A` and `U_r` (all `rank` rows), computed once
    /// (`O(m n + (m + n) rank)`): every entry of `W + A diag(c) U_r` is at most
    /// `max|W| + ‖c‖₁ max|A| max|U_r|`, a bound that tells without computing `W_eff` that it
    /// fits a half type.
    public func magnitudes() -> (weight: Double, lower: Double, upper: Double) {
        pthread_mutex_lock(cacheLock)
        defer { pthread_mutex_unlock(cacheLock) }
        if let magnitudeCache { return magnitudeCache }
        func largest(_ values: UnsafePointer<P>, _ count: Int, _ start: P) -> P {
            var top = start
            for i in 0..<count { top = Swift.max(top, values[i].magnitude) }
            return top
        }
        var w = P(0)
        forEachWeightPiece { values, count in w = largest(values, count, w) }
        let found = (Double(w), Double(largest(lower.pointer, m * rank, 0)), Double(largest(upper.pointer, rank * n, 0)))
        magnitudeCache = found
        return found
    }

    /// `body(values, count)` over `W`'s values in the compute type, in order, in pieces of at most
    /// 4096: pieces of `W` itself when the element type is its own compute type, else widened
    /// copies.
    private func forEachWeightPiece(_ body: (UnsafePointer<P>, Int) -> Void) {
        Self.forEachWeightPiece(weight, count: m * n, body)
    }

    private static func forEachWeightPiece(_ weight: UnsafePointer<E>, count total: Int, _ body: (UnsafePointer<P>, Int) -> Void) {
        withUnsafeTemporaryAllocation(of: P.self, capacity: 4096) { chunk in
            for start in stride(from: 0, to: total, by: 4096) {
                let count = Swift.min(4096, total - start)
                if E.computesInPlace {
                    body(UnsafeRawPointer(weight + start).assumingMemoryBound(to: P.self), count)
                } else {
                    E.widen(weight + start, to: chunk.baseAddress!, count: count)
                    body(chunk.baseAddress!, count)
                }
            }
        }
    }

    /// `AᵀA` and `U Uᵀ` (`rank × rank`, row-major) and `‖W‖_F²`, computed once
    /// (`O((m + n) rank² + m n)`) and shared by every adapter on these factors: a rank-`r`
    /// adapter uses the Gram matrices' leading `r × r` blocks.
    func grams() throws(LoLDUError) -> (lower: UnsafePointer<P>, upper: UnsafePointer<P>, weight: Double) {
        pthread_mutex_lock(cacheLock)
        defer { pthread_mutex_unlock(cacheLock) }
        if gramCache == nil {
            let r = rank
            let lowerGram = try HeapBuffer<P>(count: r * r), upperGram = try HeapBuffer<P>(count: r * r)
            P.multiply(transA: true, transB: false, m: r, n: r, k: m, a: lower.pointer, lda: r,
                       b: lower.pointer, ldb: r, accumulate: false, c: lowerGram.pointer, ldc: r)
            P.multiply(transA: false, transB: true, m: r, n: r, k: n, a: upper.pointer, lda: n,
                       b: upper.pointer, ldb: n, accumulate: false, c: upperGram.pointer, ldc: r)
            var squares = 0.0
            forEachWeightPiece { values, count in squares += Double(P.dot(values, values, count: count)) }
            gramCache = (lowerGram, upperGram, squares)
        }
        return (UnsafePointer(gramCache!.lower.pointer), UnsafePointer(gramCache!.upper.pointer), gramCache!.weight)
    }

    /// The fingerprint of the first `r` pivots: what an adapter of rank `r` on these factors uses.
    public func pivotsFingerprint(rank r: Int) -> String {
        pivots.withUnsafeBytes { fingerprint(UnsafeRawBufferPointer(rebasing: $0[0..<(r * 4)])) }
    }
}

/// Copies the first `r` columns of the row-major `m × n` weight into the column-major panel, in
/// double (exactly); returns their largest magnitude.
private func gatherPanel<E: Element>(
    _ w: UnsafePointer<E>, n: Int, into panel: UnsafeMutablePointer<Double>, m: Int, r: Int
) -> Double {
    var largest = 0.0
    for block in stride(from: 0, to: m, by: transposeBlock) {
        let rows = block..<Swift.min(block + transposeBlock, m)
        for j in 0..<r {
            for i in rows {
                let v = Double(E.wide(w[i * n + j]))
                panel[i + j * m] = v
                largest = Swift.max(largest, abs(v))
            }
        }
    }
    return largest
}

/// Unblocked LU with partial pivoting of the column-major `m × r` panel, as reference LAPACK's
/// `?getf2`: the first largest `|a|` is the pivot, and a column is scaled by the reciprocal of its
/// pivot only when that reciprocal is finite, divided by the pivot otherwise. So a subnormal
/// pivot leaves `|L| ≤ 1` finite. `O(m r²)` scalar work: only for the rare panel that BLAS
/// cannot factor in finite arithmetic.
private func dividingPanelLU(_ a: UnsafeMutablePointer<Double>, m: Int, r: Int, pivots: inout [Int32]) {
    for j in 0..<Swift.min(m, r) {
        let column = a + j * m
        var p = j
        for i in (j + 1)..<m where abs(column[i]) > abs(column[p]) { p = i }
        pivots[j] = Int32(p + 1)
        let pivot = column[p]
        guard pivot != 0 else { continue }
        if p != j {
            for c in 0..<r { a.swapAt(j + c * m, p + c * m) }
        }
        if abs(pivot) >= Double.leastNormalMagnitude {
            let reciprocal = 1 / pivot
            for i in (j + 1)..<m { column[i] *= reciprocal }
        } else {
            for i in (j + 1)..<m { column[i] /= pivot }
        }
        for c in (j + 1)..<r {
            let u = a[j + c * m]
            guard u != 0 else { continue }
            for i in (j + 1)..<m { a[i + c * m] -= column[i] * u }
        }
    }
}

private extension UnsafeMutablePointer {
    func swapAt(_ i: Int, _ j: Int) {
        let t = self[i]
        self[i] = self[j]
        self[j] = t
    }
}
