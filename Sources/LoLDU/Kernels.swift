/// The GEMM sequences of a LoLDU layer over shared frozen factors, written once for one adapter
/// and for a batch whose rows belong to different adapters.
///
/// With `A = P L_R` (`m × R`), `U = U_R` (`R × n`) and a coefficient row `c_b` per batch row
/// (`c = σ z − σ₀ z_ref`, zero past the adapter's rank and for rows without adapter):
///
///     y_b  = x_b Wᵀ + ((x_b U_rᵀ) ⊙ c_b) A_rᵀ + bias         h = x U_rᵀ
///     dX_b = dY_b W + ((dY_b A_r) ⊙ c_b) U_r                   g = dY A_r
///     s_a  = Σ_{b in adapter a} h_b ⊙ g_b                      (dz_a = σ_a s_a, dσ_a = z_a · s_a)
///
/// `r` is the number of factor columns the call uses (the adapter's rank, or the largest rank in
/// a grouped call): a rank-`r` adapter uses the first `r` columns of `A` and rows of `U`.
/// Products run on operands of type `G` into `P` (see ``LDUFactors``); elementwise work is in `P`.
extension LDUFactors {
    /// Which adapter batch row `b` uses: `rows[b]` (negative: none), or 0 for every row without
    /// `rows`.
    @inline(__always) static func adapterIndex(_ rows: UnsafePointer<Int32>?, _ b: Int) -> Int {
        rows.map { Int($0[b]) } ?? 0
    }

    /// Coefficients per batch row: row `b` uses adapter ``adapterIndex(_:_:)``'s `c`, or zeros
    /// when it has none.
    struct Rows {
        enum Coefficients {
            /// Adapter `a`'s `c` is `table[a * r ..< +r]`.
            case table(UnsafePointer<P>)
            /// Adapter `a`'s `c` is computed from `sources[a]` as it is read (a grouped call: no
            /// table of every adapter's `c` written first).
            case sources(UnsafePointer<Source>)
        }
        let coefficients: Coefficients
        let rows: UnsafePointer<Int32>?
    }

    /// One adapter's coefficients, `c_k = σ z_k − σ₀ ref_k` for `k < filled` and 0 past it
    /// (`filled` 0: a disabled adapter).
    struct Source {
        let sigma: P, z: UnsafePointer<P>, sigma0: P, reference: UnsafePointer<P>, filled: Int
    }

    /// `call`, a bias given for one forward, is for layers created without one.
    func checkCallBias(_ call: UnsafePointer<E>?) throws(LoLDUError) {
        if call != nil, bias != nil {
            throw LoLDUError(.state, "this adapter was created with a bias of its own; pass bias = NULL (one bias per layer)")
        }
    }

    /// The bias a forward adds: the layer's own, or `call` (checked by ``checkCallBias``),
    /// widened into `wide` (`m` values, required then) when `E` is not the compute type.
    func forwardBias(_ call: UnsafePointer<E>?, wide: UnsafeMutablePointer<P>?) -> UnsafePointer<P>? {
        guard let call else { return bias.map { UnsafePointer($0.pointer) } }
        if E.computesInPlace { return UnsafeRawPointer(call).assumingMemoryBound(to: P.self) }
        E.widen(call, to: wide!, count: m)
        return UnsafePointer(wide!)
    }

    /// `y = x Wᵀ + bias` with `weight` (`W`, or a merged `W_eff`) as the operand; `bias` (`m`
    /// values) is the layer's own or one given for the call (``forwardBias``).
    func multiplyWeight(batch: Int, x: UnsafePointer<G>, weight: UnsafePointer<G>, bias: UnsafePointer<P>?,
                        into y: UnsafeMutablePointer<P>) {
        G.multiply(transA: false, transB: true, m: batch, n: m, k: n, a: x, lda: n, b: weight, ldb: n,
                   bias: bias, accumulate: false, c: y, ldc: m)
    }

    /// `h = x U_rᵀ` (`batch × r`).
    func project(batch: Int, r: Int, x: UnsafePointer<G>, into h: UnsafeMutablePointer<P>) {
        G.multiply(transA: false, transB: true, m: batch, n: r, k: n, a: x, lda: n, b: upperOperand, ldb: n,
                   accumulate: false, c: h, ldc: r)
    }

    /// `g = dY A_r` (`batch × r`).
    func gather(batch: Int, r: Int, dy: UnsafePointer<G>, into g: UnsafeMutablePointer<P>) {
        G.multiply(transA: false, transB: false, m: batch, n: r, k: m, a: dy, lda: m, b: lowerOperand, ldb: rank,
                   accumulate: false, c: g, ldc: r)
    }

    /// `y += (h ⊙ c) A_rᵀ`; `work` holds `h ⊙ c` as an operand (`batch × r` of `G`, the same
    /// memory as `h` may be used when `G` is `P`).
    func addLowRank(batch: Int, r: Int, h: UnsafePointer<P>, _ c: Rows, work: UnsafeMutablePointer<G>, into y: UnsafeMutablePointer<P>) {
        scaleRows(batch: batch, r: r, h, c, into: work)
        G.multiply(transA: false, transB: true, m: batch, n: m, k: r, a: work, lda: r, b: lowerOperand, ldb: rank,
                   accumulate: true, c: y, ldc: m)
    }

    /// `dX = dY weight` (`batch × n`).
    func multiplyWeightBackward(batch: Int, dy: UnsafePointer<G>, weight: UnsafePointer<G>, into dx: UnsafeMutablePointer<P>) {
        G.multiply(transA: false, transB: false, m: batch, n: n, k: m, a: dy, lda: m, b: weight, ldb: n,
                   accumulate: false, c: dx, ldc: n)
    }

    /// `dX += (g ⊙ c) U_r`, with `work` as in ``addLowRank``.
    func addLowRankBackward(batch: Int, r: Int, g: UnsafePointer<P>, _ c: Rows, work: UnsafeMutablePointer<G>, into dx: UnsafeMutablePointer<P>) {
        scaleRows(batch: batch, r: r, g, c, into: work)
        G.multiply(transA: false, transB: false, m: batch, n: n, k: r, a: work, lda: r, b: upperOperand, ldb: n,
                   accumulate: true, c: dx, ldc: n)
    }

    /// `out_b = v_b ⊙ c_b` as operands (rounded once when `G` is a half type).
    private func scaleRows(batch: Int, r: Int, _ v: UnsafePointer<P>, _ c: Rows, into out: UnsafeMutablePointer<G>) {
        withUnsafeTemporaryAllocation(of: P.self, capacity: r) { row in
            let row = row.baseAddress!
            for b in 0..<batch {
                let a = Self.adapterIndex(c.rows, b)
                let source = v + b * r
                let target = G.self == P.self ? UnsafeMutableRawPointer(out + b * r).assumingMemoryBound(to: P.self) : row
                if a < 0 {
                    target.zero(count: r)
                } else {
                    switch c.coefficients {
                    case .table(let table):
                        P.hadamard(source, table + a * r, into: target, count: r)
                    case .sources(let sources):
                        let s = sources[a]
                        P.hadamardCombination(source, s.sigma, s.z, s.sigma0, s.reference, into: target, count: s.filled)
                        (target + s.filled).zero(count: r - s.filled)
                    }
                }
                if G.self != P.self { G.narrow(row, to: out + b * r, count: r) }
            }
        }
    }

    /// `scores[a] += h_b ⊙ g_b` for every row `b` with an adapter `a` (``adapterIndex(_:_:)``;
    /// `scores`: one row of `r` per adapter).
    func accumulateScores(batch: Int, r: Int, h: UnsafePointer<P>, g: UnsafePointer<P>, rows: UnsafePointer<Int32>?,
                          into scores: UnsafeMutablePointer<P>) {
        for b in 0..<batch {
            let a = Self.adapterIndex(rows, b)
            guard a >= 0 else { continue }
            P.addHadamard(h + b * r, g + b * r, into: scores + a * r, count: r)
        }
    }

    /// `s_k = (Aᵀ G U_rᵀ)_kk` for a weight gradient `G` (`m × n`) given by the caller, on `P`
    /// operands (`loldu_weight_backward`: dz to the parameter type's rounding), with `work`
    /// (`r × n`).
    func weightScores(r: Int, _ gradient: UnsafePointer<P>, work: UnsafeMutablePointer<P>, into s: UnsafeMutablePointer<P>) {
        P.multiply(transA: true, transB: false, m: r, n: n, k: m, a: lower.pointer, lda: rank,
                   b: gradient, ldb: n, accumulate: false, c: work, ldc: n)
        diagonalScores(r: r, work, into: s)
    }

    /// ``weightScores(r:_:work:into:)`` on the step's operands: `gradient` (`dYᵀx`) already
    /// rounded to `G`, and ``lowerOperand``.
    func weightScores(r: Int, operands gradient: UnsafePointer<G>, work: UnsafeMutablePointer<P>, into s: UnsafeMutablePointer<P>) {
        G.multiply(transA: true, transB: false, m: r, n: n, k: m, a: lowerOperand, lda: rank,
                   b: gradient, ldb: n, accumulate: false, c: work, ldc: n)
        diagonalScores(r: r, work, into: s)
    }

    /// `s_k = work_k · U_r[k]` for `work = Aᵀ G` (`r × n`).
    private func diagonalScores(r: Int, _ work: UnsafePointer<P>, into s: UnsafeMutablePointer<P>) {
        for k in 0..<r { s[k] = P.dot(work + k * n, upper.pointer + k * n, count: n) }
    }

    /// `W + A_r diag(c) U_r` (`m × n`) into `out` as an operand. `exact`: the product on `P`
    /// operands, so that the result is the float32 (float64) one rounded once (what merges and
    /// `loldu_effective_weight` write); else on the step's operands, like every other product
    /// (`A_r diag(c)` formed in `P` and rounded once to `G`, and ``upperOperand``; the same when
    /// `G` is `P`). `scaled` (`m × r` of `P`, which also holds `m × r` of `G`) and, when `G` is
    /// not `P`, `wide` (`m × n` of `P`) are work space.
    func buildEffective(r: Int, _ c: UnsafePointer<P>, exact: Bool, into out: UnsafeMutablePointer<G>,
                        scaled: UnsafeMutablePointer<P>, wide: UnsafeMutablePointer<P>?) {
        let sum: UnsafeMutablePointer<P>
        if G.self == P.self {
            sum = UnsafeMutableRawPointer(out).assumingMemoryBound(to: P.self)
            sum.update(from: UnsafeRawPointer(weightOperand).assumingMemoryBound(to: P.self), count: m * n)
        } else {
            sum = wide!
            E.widen(weight, to: sum, count: m * n)
        }
        if exact || G.self == P.self {
            for i in 0..<m { P.hadamard(lower.pointer + i * rank, c, into: scaled + i * r, count: r) }
            P.multiply(transA: false, transB: false, m: m, n: n, k: r, a: scaled, lda: r,
                       b: upper.pointer, ldb: n, accumulate: true, c: sum, ldc: n)
        } else {
            let operand = UnsafeMutableRawPointer(scaled).assumingMemoryBound(to: G.self)
            withUnsafeTemporaryAllocation(of: P.self, capacity: r) { row in
                for i in 0..<m {
                    P.hadamard(lower.pointer + i * rank, c, into: row.baseAddress!, count: r)
                    G.narrow(row.baseAddress!, to: operand + i * r, count: r)
                }
            }
            G.multiply(transA: false, transB: false, m: m, n: n, k: r, a: operand, lda: r,
                       b: upperOperand, ldb: n, accumulate: true, c: sum, ldc: n)
        }
        if G.self != P.self { G.narrow(sum, to: out, count: m * n) }
    }
}

/// A buffer an element type reads as operands of type `G`: `source` itself when the types agree,
/// else widened into `work` (which must hold `count` elements of `G`).
@inline(__always)
func asOperand<E: Element, G: Element>(_ source: UnsafePointer<E>, count: Int, work: UnsafeMutablePointer<G>?) -> UnsafePointer<G>
where G.Compute == E.Compute {
    if G.self == E.self { return UnsafeRawPointer(source).assumingMemoryBound(to: G.self) }
    // The only other pairing: a half type widened to its compute type.
    let target = UnsafeMutableRawPointer(work!).assumingMemoryBound(to: E.Compute.self)
    E.widen(source, to: target, count: count)
    return UnsafePointer(work!)
}
