/// A batch whose rows belong to different adapters on the same frozen factors, at one adapter's
/// cost: one pass of the factored kernels (``LDUFactors``) with a coefficient row per batch row.
///
///     y_b = x_b Wᵀ + ((x_b U_Rᵀ) ⊙ c_{a(b)}) A_Rᵀ + bias,   c_a = σ_a z_a − σ₀ z_ref,a
///
/// `R` is the largest rank among the adapters the rows use; a smaller adapter's `c` is padded
/// with zeros, a row without adapter (`-1`) or of a disabled adapter has `c = 0` (the pretrained
/// layer). A merged adapter computes with its merged coefficients, which are its current ones.
/// The path is always the factored one, so that a row's result never depends on which other
/// rows share its batch.
extension Adapter {
    /// The adapters a grouped call uses, each once, and the batch rows as indices into them.
    public struct Group {
        let adapters: [Adapter]
        let rows: UnsafePointer<Int32>
        /// The largest rank among `adapters` (at least 1).
        var width: Int {
            var r = 1
            for adapter in adapters { r = Swift.max(r, adapter.rank) }
            return r
        }

        public init(adapters: [Adapter], rows: UnsafePointer<Int32>) {
            self.adapters = adapters
            self.rows = rows
        }
    }

    /// The rows' coefficients, each adapter's `c` computed as its rows read it (no table of every
    /// adapter's `c` written first): `work` (one ``LDUFactors/Source`` per adapter) holds where
    /// each `c` comes from while `body` runs.
    private static func withCoefficients<R>(
        _ group: Group, work: HeapBuffer<LDUFactors<E, G>.Source>, _ body: (LDUFactors<E, G>.Rows) -> R
    ) -> R {
        // Index loops: `enumerated()` in generic code instantiates tuple metadata at run time;
        // through the buffer, no reference count changes per adapter.
        group.adapters.withUnsafeBufferPointer { adapters in
            // (The group's adapters share the factors, and with them D_r.)
            (adapters.first?.factors.diagonal ?? []).withUnsafeBufferPointer { diagonal in
                for i in adapters.indices {
                    work.pointer[i] = adapters[i].coefficientSource(diagonal: diagonal.baseAddress!)
                }
                return body(.init(coefficients: .sources(work.pointer), rows: group.rows))
            }
        }
    }

    /// `y = x W_effᵀ + b` with every row's own adapter (the rows of ``Group``); `base` gives the
    /// factors when no row uses an adapter. `b`: the layer's own bias or `callBias` (as in
    /// ``forward``).
    public static func groupedForward(
        _ group: Group, base: Adapter, batch: Int, x: UnsafePointer<E>, y: UnsafeMutablePointer<E>,
        bias callBias: UnsafePointer<E>? = nil
    ) throws(LoLDUError) {
        let factors = base.factors
        try factors.checkCallBias(callBias)
        guard batch > 0 else { return }
        let (m, n, r, count) = (factors.m, factors.n, group.width, group.adapters.count)
        // Everything this call needs, before anything is written.
        let sources = try HeapBuffer<LDUFactors<E, G>.Source>(count: Swift.max(count, 1))
        let h = try HeapBuffer<P>(count: batch * r)
        let work = G.self == P.self ? nil : try HeapBuffer<G>(count: batch * r)
        let wideX = E.self == G.self ? nil : try HeapBuffer<G>(count: batch * n)
        let out = E.computesInPlace ? nil : try HeapBuffer<P>(count: batch * m)
        let wideBias = callBias == nil || E.computesInPlace ? nil : try HeapBuffer<P>(count: m)
        let yP = out?.pointer ?? UnsafeMutableRawPointer(y).assumingMemoryBound(to: P.self)

        let xG = asOperand(x, count: batch * n, work: wideX?.pointer)
        factors.multiplyWeight(batch: batch, x: xG, weight: factors.weightOperand,
                               bias: factors.forwardBias(callBias, wide: wideBias?.pointer), into: yP)
        if count > 0 {
            factors.project(batch: batch, r: r, x: xG, into: h.pointer)
            withCoefficients(group, work: sources) { rows in
                factors.addLowRank(batch: batch, r: r, h: h.pointer, rows,
                                   work: work?.pointer ?? UnsafeMutableRawPointer(h.pointer).assumingMemoryBound(to: G.self),
                                   into: yP)
            }
        }
        if let out { E.narrow(out.pointer, to: y, count: batch * m) }
    }

    /// Backward of ``groupedForward``: writes `dX` (when given) for every row, and accumulates
    /// each adapter's `dz`, `dσ` (enabled, unmerged adapters) and `db` from its own rows only.
    /// With `gradsOut` (one entry per adapter of the group, `rank + 1` values each, or nil to
    /// skip one), this call's `dz`, `dσ` are written there instead and `db` is not computed.
    public static func groupedBackward(
        _ group: Group, base: Adapter, batch: Int, x: UnsafePointer<E>, dy: UnsafePointer<E>,
        dx: UnsafeMutablePointer<E>?, gradsOut: [UnsafeMutablePointer<P>?]? = nil
    ) throws(LoLDUError) {
        func zeroGradsOut() {  // after every allocation: a failed call writes nothing
            if let gradsOut { for i in gradsOut.indices { gradsOut[i]?.zero(count: group.adapters[i].rank + 1) } }
        }
        guard batch > 0 else { return zeroGradsOut() }
        let factors = base.factors
        let (m, n, r, count) = (factors.m, factors.n, group.width, group.adapters.count)
        // Everything this call needs, before anything is written (gradients included).
        var grads: [UnsafeMutablePointer<P>?] = [], biasGrads: [UnsafeMutablePointer<P>?] = []
        grads.reserveCapacity(count)
        biasGrads.reserveCapacity(count)
        try group.adapters.withUnsafeBufferPointer { adapters throws(LoLDUError) in
            for i in adapters.indices {
                let live = adapters[i].enabled && !adapters[i].merged
                if let gradsOut {
                    grads.append(live ? gradsOut[i] : nil)
                    biasGrads.append(nil)
                } else {
                    grads.append(live ? try adapters[i].grads() : nil)
                    biasGrads.append(try adapters[i].biasGrad())
                }
            }
        }
        // One row of `r` per adapter: its scores.
        let perAdapter = try HeapBuffer<P>(zeros: Swift.max(count, 1) * r)
        let sources = dx == nil ? nil : try HeapBuffer<LDUFactors<E, G>.Source>(count: Swift.max(count, 1))
        let h = try HeapBuffer<P>(count: batch * r), g = try HeapBuffer<P>(count: batch * r)
        let work = G.self == P.self ? nil : try HeapBuffer<G>(count: batch * r)
        let wideX = E.self == G.self ? nil : try HeapBuffer<G>(count: batch * n)
        let wideDY = E.self == G.self ? nil : try HeapBuffer<G>(count: batch * m)
        let out = dx == nil || E.computesInPlace ? nil : try HeapBuffer<P>(count: batch * n)
        let row = try HeapBuffer<P>(count: m)
        zeroGradsOut()

        let xG = asOperand(x, count: batch * n, work: wideX?.pointer)
        let dyG = asOperand(dy, count: batch * m, work: wideDY?.pointer)
        if count > 0 {
            factors.project(batch: batch, r: r, x: xG, into: h.pointer)
            factors.gather(batch: batch, r: r, dy: dyG, into: g.pointer)
            factors.accumulateScores(batch: batch, r: r, h: h.pointer, g: g.pointer, rows: group.rows, into: perAdapter.pointer)
            group.adapters.withUnsafeBufferPointer { adapters in
                for i in adapters.indices {
                    if let dz = grads[i] { adapters[i].accumulateScores(perAdapter.pointer + i * r, into: dz) }
                }
            }
            for b in 0..<batch {
                let a = Int(group.rows[b])
                guard a >= 0, let db = biasGrads[a] else { continue }
                E.widen(dy + b * m, to: row.pointer, count: m)
                P.add(row.pointer, into: db, count: m)
            }
        }
        guard let dx else { return }
        let dxP = out?.pointer ?? UnsafeMutableRawPointer(dx).assumingMemoryBound(to: P.self)
        factors.multiplyWeightBackward(batch: batch, dy: dyG, weight: factors.weightOperand, into: dxP)
        if count > 0, let sources {
            withCoefficients(group, work: sources) { rows in
                factors.addLowRankBackward(batch: batch, r: r, g: g.pointer, rows,
                                           work: work?.pointer ?? UnsafeMutableRawPointer(g.pointer).assumingMemoryBound(to: G.self),
                                           into: dxP)
            }
        }
        if let out { E.narrow(out.pointer, to: dx, count: batch * n) }
    }
}
