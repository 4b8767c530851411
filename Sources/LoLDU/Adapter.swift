import Glibc

/// One LoLDU-adapted linear layer: `y = x W_effᵀ + b` with
/// `W_eff = W + A diag(c) U_r`, `c = σ z − σ₀ z_ref` (`A = P L_r`).
///
/// This is `W_res + σ P L_r diag(z) U_r` with `W_res = W − σ₀ P L_r diag(z_ref) U_r`, written
/// so that the pretrained `W` is kept bit for bit: at initialisation `c = 0` exactly, so the
/// output is exactly the pretrained layer's, and a disabled adapter computes `x Wᵀ + b` exactly.
///
/// Trainable: `z` (`r` values) and, if configured, `σ`, stored together in ``params``
/// (`z` then `σ`) at a fixed address. Backward accumulates `dz`, `dσ` into ``grads`` and `db`
/// into ``biasGrad`` until ``zeroGrad()``; `dX` is written, not accumulated.
///
/// Not thread-safe: one thread at a time per adapter. The frozen ``factors`` are immutable and
/// may be shared by several adapters (``clone()``).
public final class Adapter<T: BLASScalar>: @unchecked Sendable {
    public let factors: LDUFactors<T>
    public let config: AdapterConfig
    public let params: HeapBuffer<T>
    public let grads: HeapBuffer<T>
    public let biasGrad: HeapBuffer<T>?
    /// `σ₀ z_ref`: the part of the update already inside `W`.
    let reference: HeapBuffer<T>

    public private(set) var enabled = true
    public private(set) var merged = false
    public var path: ComputePath = .auto

    /// `W_eff` for the coefficients in `effectiveCoef`, when `effectiveValid`.
    private var effective: HeapBuffer<T>?
    private let effectiveCoef: HeapBuffer<T>
    private var effectiveValid = false
    /// The coefficients of the last forward and how many forwards in a row used them (for
    /// caching `W_eff` when it pays off, as in evaluation).
    private let forwardCoef: HeapBuffer<T>
    private var forwardsAtCoef = 0
    private let coef: HeapBuffer<T>
    private let scores: HeapBuffer<T>
    // Reusable work buffers. Every method takes what it needs before it writes anything, so a
    // failed allocation leaves outputs and gradients untouched.
    private var scratchH = Scratch<T>()      // h (B × r), or Aᵀ G (r × n)
    private var scratchG = Scratch<T>()      // g = dY A, or h ⊙ c (B × r)
    private var scratchScaled = Scratch<T>() // A diag(c) (m × r)
    private var scratchLarge = Scratch<T>()  // G = dYᵀ x (m × n)

    public var m: Int { factors.m }
    public var n: Int { factors.n }
    public var rank: Int { factors.rank }
    public var trainableCount: Int { rank + (config.trainSigma ? 1 : 0) }
    public var sigma: T { params.pointer[rank] }

    /// Factors `weight` and initialises `z` and `σ` as `config` says.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public convenience init(
        m: Int, n: Int, weight: UnsafePointer<T>, bias: UnsafePointer<T>?, config: AdapterConfig
    ) throws(LoLDUError) {
        try config.validate(m: m, n: n)
        let factors = try LDUFactors<T>(
            m: m, n: n, rank: config.rank, weight: weight, bias: bias, borrowWeight: config.borrowWeight)
        let d = factors.diagonal.map { Double($0) }
        let z0 = initialDiagonal(config.zInit, pivots: d, seed: config.seed).map { T($0) }
        let sigma0 = T(config.sigma)
        guard sigma0.isFinite, sigma0 != 0 else {
            throw .invalid("config.alpha = \(config.effectiveAlpha) gives sigma = alpha / rank = \(config.sigma), which is not a finite nonzero \(T.dtype.name)")
        }
        let zRef = config.residual == .pivots ? factors.diagonal : z0
        let reference = zRef.map { sigma0 * $0 }
        guard z0.allSatisfy(\.isFinite), reference.allSatisfy(\.isFinite) else {
            throw .invalid("config.alpha = \(config.effectiveAlpha): sigma times the initial diagonal overflows \(T.dtype.name); use a smaller alpha")
        }
        try self.init(factors: factors, config: config, z: z0, sigma: sigma0, reference: reference)
    }

    private init(
        factors: LDUFactors<T>, config: AdapterConfig, z: [T], sigma: T, reference: [T]
    ) throws(LoLDUError) {
        let r = factors.rank
        self.factors = factors
        self.config = config
        params = try HeapBuffer(repeating: 0, count: r + 1)
        for k in 0..<r { params.pointer[k] = z[k] }
        params.pointer[r] = sigma
        grads = try HeapBuffer(repeating: 0, count: r + 1)
        biasGrad = factors.bias == nil ? nil : try HeapBuffer(repeating: 0, count: factors.m)
        self.reference = try HeapBuffer(repeating: 0, count: r)
        for k in 0..<r { self.reference.pointer[k] = reference[k] }
        effectiveCoef = try HeapBuffer(repeating: 0, count: r)
        forwardCoef = try HeapBuffer(repeating: 0, count: r)
        coef = try HeapBuffer(repeating: 0, count: r)
        scores = try HeapBuffer(repeating: 0, count: r)
    }

    /// A new adapter sharing these frozen factors, with a copy of the current `z` and `σ`,
    /// zero gradients, enabled and unmerged.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func clone() throws(LoLDUError) -> Adapter<T> {
        let r = rank
        let copy = try Adapter(
            factors: factors, config: config,
            z: Array(UnsafeBufferPointer(start: params.pointer, count: r)), sigma: sigma,
            reference: Array(UnsafeBufferPointer(start: reference.pointer, count: r)))
        copy.path = path
        return copy
    }

    // MARK: Coefficients and the merged weight

    /// `c = σ z − σ₀ z_ref` into ``coef``.
    private func currentCoef() -> UnsafeMutablePointer<T> {
        let z = params.pointer, s = params.pointer[rank], ref = reference.pointer, c = coef.pointer
        for k in 0..<rank { c[k] = s * z[k] - ref[k] }
        return c
    }

    private func same(_ a: UnsafePointer<T>, _ b: UnsafePointer<T>) -> Bool {
        for k in 0..<rank where a[k] != b[k] { return false }
        return true
    }

    private func effectiveIsFresh(_ c: UnsafePointer<T>) -> Bool {
        effectiveValid && same(effectiveCoef.pointer, c)
    }

    /// Writes `W + A diag(c) U_r` to `out` (`m × n`), with `scaled` (`m × r`) as work space.
    private func buildEffective(_ c: UnsafePointer<T>, into out: UnsafeMutablePointer<T>, scaled: UnsafeMutablePointer<T>) {
        let (m, n, r) = (self.m, self.n, rank)
        out.update(from: factors.weight, count: m * n)
        let a = factors.lower.pointer
        for i in 0..<m {
            for k in 0..<r { scaled[i * r + k] = a[i * r + k] * c[k] }
        }
        T.gemm(transA: false, transB: false, m: m, n: n, k: r, alpha: 1, a: scaled, lda: r,
               b: factors.upper.pointer, ldb: n, beta: 1, c: out, ldc: n)
    }

    /// Makes sure the cached `W_eff` holds `c`; everything it needs is allocated before the
    /// cache is touched.
    private func refreshEffective(_ c: UnsafePointer<T>) throws(LoLDUError) -> UnsafePointer<T> {
        if effectiveIsFresh(c), let effective { return UnsafePointer(effective.pointer) }
        let cache: HeapBuffer<T>
        if let effective { cache = effective } else { cache = try HeapBuffer<T>(count: m * n) }
        let scaled = try scratchScaled.get(m * rank)
        effective = cache
        buildEffective(c, into: cache.pointer, scaled: scaled)
        effectiveCoef.pointer.update(from: c, count: rank)
        effectiveValid = true
        return UnsafePointer(cache.pointer)
    }

    /// The weight a disabled or merged adapter multiplies by, or `nil` when `z` is live.
    private var fixedWeight: UnsafePointer<T>? {
        if !enabled { return factors.weight }
        if merged, let effective { return UnsafePointer(effective.pointer) }
        return nil
    }

    /// The path `auto` takes for a training step on `batch` rows (or the forced path).
    public func plan(batch: Int, keepsH: Bool) -> ComputePath {
        if path != .auto { return path }
        return CostModel(m: m, n: n, rank: rank, batch: batch).cheapest(keepsH: keepsH)
    }

    /// Whether this forward goes through `W_eff`. Besides the step plan, `auto` builds the
    /// cache once forwards with unchanged coefficients (evaluation, gradient accumulation) have
    /// spent as much on the factored terms as one rebuild costs: never more than twice the best.
    private func forwardIsMerged(batch: Int, keepsH: Bool, _ c: UnsafePointer<T>) -> Bool {
        if same(forwardCoef.pointer, c) {
            forwardsAtCoef += 1
        } else {
            forwardCoef.pointer.update(from: c, count: rank)
            forwardsAtCoef = 0
        }
        let planned = plan(batch: batch, keepsH: keepsH)
        guard path == .auto else { return planned != .factored }
        if planned != .factored || effectiveIsFresh(c) { return true }
        let costs = CostModel(m: m, n: n, rank: rank, batch: batch)
        return Double(forwardsAtCoef) * (costs.project + costs.gather) >= costs.rebuild
    }

    // MARK: Forward and backward

    /// `y = x W_effᵀ + b` for `batch` rows: `x` is `batch × n`, `y` is `batch × m`, row-major.
    /// When `hOut` is given (`batch × r`) it receives `h = x U_rᵀ`, which ``backward`` can reuse.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func forward(
        batch: Int, x: UnsafePointer<T>, y: UnsafeMutablePointer<T>, h hOut: UnsafeMutablePointer<T>?
    ) throws(LoLDUError) {
        guard batch > 0 else { return }
        let (m, n, r) = (self.m, self.n, rank)
        var weight = factors.weight
        var factored: UnsafeMutablePointer<T>? = nil  // c, when the low-rank term is added here
        if let fixed = fixedWeight {
            weight = fixed
        } else {
            let c = currentCoef()
            if forwardIsMerged(batch: batch, keepsH: hOut != nil, c) {
                weight = try refreshEffective(c)
            } else {
                factored = c
            }
        }
        var h: UnsafeMutablePointer<T>? = hOut
        var hc: UnsafeMutablePointer<T>? = nil
        if factored != nil {
            if h == nil { h = try scratchH.get(batch * r) }
            hc = hOut == nil ? h : try scratchG.get(batch * r)
        }

        let beta = fillBias(y, batch: batch)
        T.gemm(transA: false, transB: true, m: batch, n: m, k: n, alpha: 1, a: x, lda: n,
               b: weight, ldb: n, beta: beta, c: y, ldc: m)
        guard let h else { return }
        T.gemm(transA: false, transB: true, m: batch, n: r, k: n, alpha: 1, a: x, lda: n,
               b: factors.upper.pointer, ldb: n, beta: 0, c: h, ldc: r)
        guard let c = factored, let hc else { return }
        for b in 0..<batch {
            for k in 0..<r { hc[b * r + k] = h[b * r + k] * c[k] }
        }
        T.gemm(transA: false, transB: true, m: batch, n: m, k: r, alpha: 1, a: hc, lda: r,
               b: factors.lower.pointer, ldb: r, beta: 1, c: y, ldc: m)
    }

    /// Copies the bias into every row of `y`; returns the `beta` for the GEMM that follows.
    private func fillBias(_ y: UnsafeMutablePointer<T>, batch: Int) -> T {
        guard let bias = factors.bias else { return 0 }
        for b in 0..<batch { (y + b * m).update(from: bias.pointer, count: m) }
        return 1
    }

    /// Backward of ``forward`` for upstream gradient `dy` (`batch × m`).
    ///
    /// Writes `dX = dY W_eff` to `dx` (`batch × n`) when given; accumulates `dz`, `dσ`
    /// (when trainable) into ``grads`` and `db` into ``biasGrad``. `h` may be the `x U_rᵀ` that
    /// ``forward`` wrote for the same `x`; otherwise it is recomputed. A disabled or merged
    /// adapter does not depend on `z`: its `dz`, `dσ` are left unchanged.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func backward(
        batch: Int, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        dx: UnsafeMutablePointer<T>?, h hIn: UnsafePointer<T>?
    ) throws(LoLDUError) {
        guard batch > 0 else { return }
        let (m, n, r) = (self.m, self.n, rank)
        if let weight = fixedWeight {
            if let dx {
                T.gemm(transA: false, transB: false, m: batch, n: n, k: m, alpha: 1, a: dy, lda: m,
                       b: weight, ldb: n, beta: 0, c: dx, ldc: n)
            }
            accumulateBiasGradient(dy, batch: batch)
            return
        }

        let c = currentCoef()
        let costs = CostModel(m: m, n: n, rank: r, batch: batch)
        let dxMerged: Bool
        let dzFromWeight: Bool
        switch path {
        case .factored: (dxMerged, dzFromWeight) = (false, false)
        case .merged: (dxMerged, dzFromWeight) = (true, false)
        case .mergedWeightGrad: (dxMerged, dzFromWeight) = (true, true)
        case .auto:
            // dX through W_eff is 2Bmn; factored adds g = dY A and (g ⊙ c) U_r.
            dxMerged = dx != nil
                && (effectiveIsFresh(c) || costs.rebuild < costs.gather + costs.project)
            let activations = (dx != nil && !dxMerged ? 0 : costs.gather) + (hIn == nil ? costs.project : 0)
            dzFromWeight = costs.weightGradient < activations
        }

        // Everything this call needs, before anything is written.
        let needG = !dzFromWeight || (dx != nil && !dxMerged)
        let g: UnsafeMutablePointer<T>? = needG ? try scratchG.get(batch * r) : nil
        let work: UnsafeMutablePointer<T>? =
            dzFromWeight ? try scratchH.get(r * n) : (hIn == nil ? try scratchH.get(batch * r) : nil)
        let gradient: UnsafeMutablePointer<T>? = dzFromWeight ? try scratchLarge.get(m * n) : nil
        let mergedWeight: UnsafePointer<T>? = dx != nil && dxMerged ? try refreshEffective(c) : nil

        // s_k = Σ_b h_bk g_bk = (Aᵀ dYᵀ x U_rᵀ)_kk; then dz = σ s and dσ = z · s.
        if let g {
            T.gemm(transA: false, transB: false, m: batch, n: r, k: m, alpha: 1, a: dy, lda: m,
                   b: factors.lower.pointer, ldb: r, beta: 0, c: g, ldc: r)
        }
        let s = scores.pointer
        if let gradient, let work {
            T.gemm(transA: true, transB: false, m: m, n: n, k: batch, alpha: 1, a: dy, lda: m,
                   b: x, ldb: n, beta: 0, c: gradient, ldc: n)
            weightScores(UnsafePointer(gradient), work: work, into: s)
        } else if let g {
            let h: UnsafePointer<T>
            if let hIn { h = hIn } else if let work {
                T.gemm(transA: false, transB: true, m: batch, n: r, k: n, alpha: 1, a: x, lda: n,
                       b: factors.upper.pointer, ldb: n, beta: 0, c: work, ldc: r)
                h = UnsafePointer(work)
            } else { return }  // unreachable: work holds h whenever h is not given
            s.update(repeating: 0, count: r)
            for b in 0..<batch {
                for k in 0..<r { s[k] += h[b * r + k] * g[b * r + k] }
            }
        }
        accumulateScores(s)
        accumulateBiasGradient(dy, batch: batch)

        guard let dx else { return }
        if let mergedWeight {
            T.gemm(transA: false, transB: false, m: batch, n: n, k: m, alpha: 1, a: dy, lda: m,
                   b: mergedWeight, ldb: n, beta: 0, c: dx, ldc: n)
        } else if let g {
            T.gemm(transA: false, transB: false, m: batch, n: n, k: m, alpha: 1, a: dy, lda: m,
                   b: factors.weight, ldb: n, beta: 0, c: dx, ldc: n)
            for b in 0..<batch {
                for k in 0..<r { g[b * r + k] *= c[k] }
            }
            T.gemm(transA: false, transB: false, m: batch, n: n, k: r, alpha: 1, a: g, lda: r,
                   b: factors.upper.pointer, ldb: n, beta: 1, c: dx, ldc: n)
        }
    }

    /// `db += Σ_b dY`.
    private func accumulateBiasGradient(_ dy: UnsafePointer<T>, batch: Int) {
        guard let db = biasGrad?.pointer else { return }
        for b in 0..<batch {
            let row = dy + b * m
            for i in 0..<m { db[i] += row[i] }
        }
    }

    /// `s_k = (Aᵀ G U_rᵀ)_kk` for a weight gradient `G` (`m × n`), with `work` (`r × n`).
    private func weightScores(_ gradient: UnsafePointer<T>, work: UnsafeMutablePointer<T>, into s: UnsafeMutablePointer<T>) {
        let (m, n, r) = (self.m, self.n, rank)
        T.gemm(transA: true, transB: false, m: r, n: n, k: m, alpha: 1, a: factors.lower.pointer, lda: r,
               b: gradient, ldb: n, beta: 0, c: work, ldc: n)
        let u = factors.upper.pointer
        for k in 0..<r {
            var sum: T = 0
            for j in 0..<n { sum += work[k * n + j] * u[k * n + j] }
            s[k] = sum
        }
    }

    /// `dz += σ s`, and `dσ += z · s` when `σ` is trainable.
    private func accumulateScores(_ s: UnsafePointer<T>) {
        let r = rank, z = params.pointer, dz = grads.pointer
        let sigma = z[r]
        var dSigma: T = 0
        for k in 0..<r {
            dz[k] += sigma * s[k]
            dSigma += z[k] * s[k]
        }
        if config.trainSigma { dz[r] += dSigma }
    }

    /// Weight-space backward: for a layer that uses `W_eff` in another way (convolution,
    /// embedding), maps its weight gradient `dW` (`m × n`) to `dz` and `dσ` (accumulated).
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func weightBackward(_ dw: UnsafePointer<T>) throws(LoLDUError) {
        guard fixedWeight == nil else { return }
        let work = try scratchH.get(rank * n)
        weightScores(dw, work: work, into: scores.pointer)
        accumulateScores(scores.pointer)
    }

    /// Writes the weight the layer currently computes with (`m × n`): `W_eff`, the merged
    /// weight while merged, `W` while disabled.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func writeEffectiveWeight(_ out: UnsafeMutablePointer<T>) throws(LoLDUError) {
        if let weight = fixedWeight {
            out.update(from: weight, count: m * n)
            return
        }
        let c = currentCoef()
        if effectiveIsFresh(c), let effective {
            out.update(from: effective.pointer, count: m * n)
        } else {
            buildEffective(c, into: out, scaled: try scratchScaled.get(m * rank))
        }
    }

    /// Writes the frozen residual `W_res = W − σ₀ A diag(z_ref) U_r` (`m × n`). Uses buffers of
    /// its own: it changes nothing in the adapter.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func writeResidual(_ out: UnsafeMutablePointer<T>) throws(LoLDUError) {
        let negated = try HeapBuffer<T>(count: rank), scaled = try HeapBuffer<T>(count: m * rank)
        for k in 0..<rank { negated.pointer[k] = -reference.pointer[k] }
        buildEffective(negated.pointer, into: out, scaled: scaled.pointer)
    }

    // MARK: State

    public func zeroGrad() {
        grads.pointer.update(repeating: 0, count: rank + 1)
        biasGrad?.pointer.update(repeating: 0, count: m)
    }

    /// Bakes the current update into a weight used by every call until ``unmerge()``.
    /// The pretrained `W` is kept, so unmerging is exact; merging twice is a no-op. Refuses
    /// (as PEFT's `safe_merge`) a merged weight that would not be finite.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func merge() throws(LoLDUError) {
        guard !merged else { return }
        let weight = try refreshEffective(currentCoef())
        guard T.allFinite(weight, count: m * n, copyingTo: nil) else {
            effectiveValid = false
            throw LoLDUError(.notFinite, "the merged weight would not be finite (sigma or z too large); not merged")
        }
        merged = true
    }

    public func unmerge() { merged = false }

    public func setEnabled(_ on: Bool) { enabled = on }

    /// Refuses to change trainable values while merged: the merged weight would go stale.
    public func checkMutable(_ what: String) throws(LoLDUError) {
        guard !merged else {
            throw .state("cannot change \(what) while the adapter is merged; unmerge it first")
        }
    }

    /// Refuses `z`, `σ` whose coefficients `σ z − σ₀ z_ref` would overflow.
    private func checkCoefficients(z: UnsafePointer<T>, sigma: T) throws(LoLDUError) {
        for k in 0..<rank where !(sigma * z[k] - reference.pointer[k]).isFinite {
            throw LoLDUError(.notFinite, "sigma * z[\(k)] = \(sigma) * \(z[k]) overflows \(T.dtype.name)")
        }
    }

    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public func setZ(_ z: UnsafePointer<T>) throws(LoLDUError) {
        try checkMutable("z")
        try setParameters(z: z, sigma: sigma)
    }

    public func setSigma(_ value: T) throws(LoLDUError) {
        try checkMutable("sigma")
        try setParameters(z: params.pointer, sigma: value)
    }

    /// Sets `z` (`rank` values) and `σ` together: everything is checked before anything is
    /// written, so a refused pair leaves both unchanged.
    public func setParameters(z: UnsafePointer<T>, sigma value: T) throws(LoLDUError) {
        try checkMutable("z and sigma")
        try checkFinite(z, count: rank, name: "z")
        guard value.isFinite else { throw LoLDUError(.notFinite, "sigma must be finite in \(T.dtype.name), got \(value)") }
        try checkCoefficients(z: z, sigma: value)
        if z != UnsafePointer(params.pointer) { params.pointer.update(from: z, count: rank) }
        params.pointer[rank] = value
    }

    /// The first trainable value that is NaN or ±Inf, or whose coefficient `σ z_k − σ₀ z_ref,k`
    /// overflows (as `"z[k]"` or `"sigma"`); `nil` when all are usable.
    public var firstNonFiniteParameter: String? {
        let z = params.pointer, s = sigma
        if !s.isFinite { return "sigma" }
        for k in 0..<rank where !z[k].isFinite || !(s * z[k] - reference.pointer[k]).isFinite { return "z[\(k)]" }
        return nil
    }

    /// Bytes held: the copies of `W` and the bias, the frozen factors, the trainable state, the
    /// cached merged weight, and reusable scratch.
    public var memory: (weight: Int, factors: Int, state: Int, mergedCache: Int, scratch: Int) {
        let size = MemoryLayout<T>.stride
        let state = (params.count + grads.count + reference.count + effectiveCoef.count + forwardCoef.count
            + coef.count + scores.count + (biasGrad?.count ?? 0)) * size
        return (factors.weightBytes + (factors.bias?.count ?? 0) * size, factors.factorBytes, state,
                (effective?.count ?? 0) * size,
                scratchH.bytes + scratchG.bytes + scratchScaled.bytes + scratchLarge.bytes)
    }
}
