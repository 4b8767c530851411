import Glibc

/// What defines an adapter on its factors (its configuration, `z`, `σ`, `z_ref`, path), in
/// `Double`, exact for both compute types: to copy it onto the same or converted factors.
public struct AdapterDefinition: Sendable {
    let config: AdapterConfig
    let params: [Double]
    let zRef: [Double]?
    let sigma0: Double
    let path: ComputePath
}

/// One LoLDU adapter on a base layer: `y = x W_effᵀ + b` with
/// `W_eff = W + A diag(c) U_r`, `c = σ z − σ₀ z_ref` (`A = P L_r`).
///
/// This is `W_res + σ P L_r diag(z) U_r` with `W_res = W − σ₀ P L_r diag(z_ref) U_r`, written
/// so that the pretrained `W` is kept bit for bit: at initialisation `c = 0` exactly, so the
/// output is exactly the pretrained layer's, and a disabled adapter computes `x Wᵀ + b` exactly.
///
/// The frozen ``factors`` are immutable and shared: a clone or a derived adapter (of any rank up
/// to the factors') uses them read-only, so thousands of adapters cost one set of factors plus,
/// each, `z` and `σ` (`r + 1` values) and a little bookkeeping. Gradients, the bias gradient and
/// the caches and work space of single-adapter calls are allocated on first use.
///
/// Trainable: `z` (`r` values) and, if configured, `σ`, stored together in ``params``
/// (`z` then `σ`, in the compute type `P`) at a fixed address. Backward accumulates `dz`, `dσ`
/// into ``grads`` and `db` into ``biasGrad`` until ``zeroGrad()``; `dX` is written.
///
/// Threads: the compute calls (``forward``, ``backward``, ``weightBackward``,
/// ``writeEffectiveWeight``, ``merge``) hold a lock of the adapter, so several threads may make
/// them at once (they run one at a time); the lock is not recursive, so none of them may call
/// another. Every other call must not overlap another call on the same adapter. Grouped calls
/// take no lock: they use no per-adapter work space and, unless they accumulate into the
/// adapters' gradients, only read the adapters.
public final class Adapter<E: Element, G: GEMMOperand>: @unchecked Sendable where G.Compute == E.Compute {
    public typealias P = E.Compute
    public let factors: LDUFactors<E, G>
    public let config: AdapterConfig
    /// `z` then `σ` (`rank + 1` values).
    public let params: UnsafeMutablePointer<P>
    /// `σ₀`, the scale folded into `W` (`W_res = W − σ₀ A diag(z_ref) U_r`).
    let sigma0: P
    /// ``initialChange()`` once computed (NaN before): a `Float`, a ratio reported to a few
    /// digits, beside `sigma0` in the padding before the next pointer, so that it costs an
    /// adapter no memory.
    private var initialChangeCache: Float = .nan
    /// `z_ref` when it is not `D_r` (residual `init` with an init other than `lu`).
    private let zRef: UnsafeMutablePointer<P>?
    private var gradStorage: UnsafeMutablePointer<P>?
    private var biasGradStorage: UnsafeMutablePointer<P>?
    /// Caches and work space of single-adapter calls, on first use.
    private var local: Local?
    /// Held by the compute calls, which share `local`.
    private let callLock = CallLock()

    public private(set) var enabled = true
    public private(set) var merged = false
    public var path: ComputePath = .auto

    public var m: Int { factors.m }
    public var n: Int { factors.n }
    public var rank: Int { config.rank }
    public var trainableCount: Int { rank + (config.trainSigma ? 1 : 0) }
    public var sigma: P { params[rank] }

    /// Factors `weight` and initialises `z` and `σ` as `config` says.
    public convenience init(
        m: Int, n: Int, weight: UnsafePointer<E>, bias: UnsafePointer<E>?, config: AdapterConfig
    ) throws(LoLDUError) {
        let config = config.resolved(fullRank: Swift.min(m, n))
        try config.validate(m: m, n: n)
        let factors = try LDUFactors<E, G>(
            m: m, n: n, rank: config.rank, weight: weight, bias: bias, borrowWeight: config.borrowWeight)
        try self.init(factors: factors, config: config)
    }

    /// A new adapter of rank `config.rank ≤ factors.rank` on existing factors, initialised as
    /// `config` says: O(r), no factorisation, no copy of `W`.
    public init(factors: LDUFactors<E, G>, config: AdapterConfig) throws(LoLDUError) {
        let config = config.resolved(fullRank: factors.rank)
        let r = config.rank
        guard r >= 1, r <= factors.rank else {
            throw .invalid("config.rank must be 0 (the shared factors' rank) or in [1, \(factors.rank)], got \(r)")
        }
        try config.validate(m: factors.m, n: factors.n)
        let d = factors.diagonal[0..<r].map { Double($0) }
        let z0 = initialDiagonal(config.zInit, pivots: d, seed: config.seed).map { P($0) }
        if let why = config.unusableSigma(as: P.dtype) { throw .invalid("config.\(why)") }
        let s0 = P(config.sigma)
        let referenceIsInit = config.residual == .initial && config.zInit != .lu
        for k in 0..<r {  // (σ₀ z₀, σ₀ z_ref and the coefficient σ₀ z₀ − σ₀ z_ref, as every call computes them)
            let own = s0 * z0[k], reference = s0 * (referenceIsInit ? z0[k] : factors.diagonal[k])
            guard own.isFinite, reference.isFinite, (own - reference).isFinite else {
                throw .invalid("config.alpha = \(config.effectiveAlpha): sigma times the initial diagonal overflows \(P.dtype.name); use a smaller alpha")
            }
        }
        guard let params = Self.allocate(r + 1) else { throw LoLDUError(.outOfMemory, "out of memory allocating z") }
        var zRef: UnsafeMutablePointer<P>? = nil
        if referenceIsInit {
            guard let made = Self.allocate(r) else {
                free(params)
                throw LoLDUError(.outOfMemory, "out of memory allocating z_ref")
            }
            for k in 0..<r { made[k] = z0[k] }
            zRef = made
        }
        for k in 0..<r { params[k] = z0[k] }
        params[r] = s0
        self.factors = factors
        self.config = config
        self.params = params
        self.sigma0 = s0
        self.zRef = zRef
    }

    public var definition: AdapterDefinition {
        AdapterDefinition(config: config, params: (0...rank).map { Double(params[$0]) },
                   zRef: zRef.map { z in (0..<rank).map { Double(z[$0]) } }, sigma0: Double(sigma0), path: path)
    }

    /// An adapter with `definition` on `factors` (the same factors, or converted ones), with
    /// zero gradients, enabled and unmerged.
    public init(factors: LDUFactors<E, G>, definition d: AdapterDefinition) throws(LoLDUError) {
        let r = d.config.rank
        guard let params = Self.allocate(r + 1) else { throw LoLDUError(.outOfMemory, "out of memory allocating z") }
        for k in 0...r { params[k] = P(d.params[k]) }
        var zRef: UnsafeMutablePointer<P>? = nil
        if let values = d.zRef {
            guard let made = Self.allocate(r) else {
                free(params)
                throw LoLDUError(.outOfMemory, "out of memory allocating z_ref")
            }
            for k in 0..<r { made[k] = P(values[k]) }
            zRef = made
        }
        self.factors = factors
        config = d.config
        self.params = params
        sigma0 = P(d.sigma0)
        self.zRef = zRef
        path = d.path
    }

    deinit {
        free(params)
        free(zRef)
        free(gradStorage)
        free(biasGradStorage)
    }

    /// `count` values of `P` from malloc (small buffers: no alignment beyond malloc's 16 bytes,
    /// no object around them), or nil.
    private static func allocate(_ count: Int) -> UnsafeMutablePointer<P>? {
        malloc(Swift.max(count, 1) * MemoryLayout<P>.stride)?.bindMemory(to: P.self, capacity: count)
    }

    /// A new adapter sharing these frozen factors, with a copy of the current `z` and `σ`,
    /// zero gradients, enabled and unmerged.
    public func clone() throws(LoLDUError) -> Adapter { try Adapter(factors: factors, definition: definition) }

    // MARK: Gradients, allocated on first use

    /// `dz` then `dσ`; zero until a backward accumulates into them.
    public func grads() throws(LoLDUError) -> UnsafeMutablePointer<P> {
        if let gradStorage { return gradStorage }
        guard let made = Self.allocate(rank + 1) else { throw LoLDUError(.outOfMemory, "out of memory allocating gradients") }
        made.zero(count: rank + 1)
        gradStorage = made
        return made
    }

    /// `db` (`m` values), or nil for a layer without bias.
    public func biasGrad() throws(LoLDUError) -> UnsafeMutablePointer<P>? {
        guard factors.bias != nil else { return nil }
        if let biasGradStorage { return biasGradStorage }
        guard let made = Self.allocate(m) else { throw LoLDUError(.outOfMemory, "out of memory allocating the bias gradient") }
        made.zero(count: m)
        biasGradStorage = made
        return made
    }

    public func zeroGrad() {
        gradStorage?.zero(count: rank + 1)
        biasGradStorage?.zero(count: m)
    }

    // MARK: Coefficients

    /// `σ₀ z_ref,k`: the part of the update already inside `W`.
    @inline(__always) func reference(_ k: Int) -> P { sigma0 * (zRef?[k] ?? factors.diagonal[k]) }

    /// `‖A diag(c₀) U_r‖_F / ‖W‖_F` with `c₀ = σ₀ (z₀ − z_ref)` the coefficients the adapter was
    /// created with: how much it moved the pretrained weight before any training. 0 when
    /// `z₀ = z_ref` (`z_init = lu`, or `residual = init`); otherwise computed on request from the
    /// Gram matrices `AᵀA` and `U_r U_rᵀ` that the shared factors keep (``LDUFactors/grams()``), as
    /// `Σ_jk c_j c_k (AᵀA)_jk (U_r U_rᵀ)_jk`, and `‖W‖` (`O(r²)` per adapter).
    public func initialChange() throws(LoLDUError) -> Double {
        if !initialChangeCache.isNaN { return Double(initialChangeCache) }
        let change = Float(try computeInitialChange())
        initialChangeCache = change
        return Double(change)
    }

    private func computeInitialChange() throws(LoLDUError) -> Double {
        let r = rank
        let z0 = initialDiagonal(config.zInit, pivots: factors.diagonal[0..<r].map { Double($0) }, seed: config.seed)
        let c = (0..<r).map { Double(sigma0) * (Double(P(z0[$0])) - Double(zRef?[$0] ?? factors.diagonal[$0])) }
        guard c.contains(where: { $0 != 0 }) else { return 0 }
        let (lowerGram, upperGram, weight) = try factors.grams()
        let stride = factors.rank
        var change = 0.0
        for j in 0..<r {
            for k in 0..<r { change += c[j] * c[k] * Double(lowerGram[j * stride + k]) * Double(upperGram[j * stride + k]) }
        }
        return weight > 0 ? (Swift.max(change, 0) / weight).squareRoot() : .infinity
    }

    /// `c = σ z − σ₀ z_ref` into `c` (`rank` values).
    func coefficients(into c: UnsafeMutablePointer<P>) {
        factors.diagonal.withUnsafeBufferPointer { d in
            P.combine(params[rank], params, sigma0, zRef.map { UnsafePointer($0) } ?? d.baseAddress!, into: c, count: rank)
        }
    }

    /// Where ``coefficients(into:)`` takes `c` from, with the factors' `D_r` at hand
    /// (`diagonal`), for a grouped call (a disabled adapter: no coefficients).
    @inline(__always) func coefficientSource(diagonal: UnsafePointer<P>) -> LDUFactors<E, G>.Source {
        .init(sigma: params[rank], z: params, sigma0: sigma0, reference: zRef.map { UnsafePointer($0) } ?? diagonal,
              filled: enabled ? rank : 0)
    }

    // MARK: Single-adapter state: the merged-weight cache and work space

    final class Local {
        /// `W_eff` for `effectiveCoef`, when `effectiveValid`; `effectiveExact` when built as
        /// merges write it (``LDUFactors/buildEffective(r:_:exact:into:scaled:wide:)``).
        var effective: HeapBuffer<G>?
        let effectiveCoef: HeapBuffer<P>
        var effectiveValid = false
        var effectiveExact = false
        /// The coefficients of the last forward and how many forwards in a row used them.
        let forwardCoef: HeapBuffer<P>
        var forwardsAtCoef = 0
        let coef: HeapBuffer<P>
        let scores: HeapBuffer<P>
        // Reusable work buffers. Every method takes what it needs before it writes anything, so
        // a failed allocation leaves outputs and gradients untouched.
        var h = Scratch<P>()        // h (B × r), or Aᵀ G (r × n)
        var g = Scratch<P>()        // g = dY A (B × r)
        var work = Scratch<G>()     // (h or g) ⊙ c as operands (B × r)
        var input = Scratch<G>()    // x widened (B × n)
        var input2 = Scratch<G>()   // dY widened (B × m)
        var output = Scratch<P>()   // y or dX before rounding (B × max(m, n))
        var scaled = Scratch<P>()   // A diag(c) (m × r)
        var large = Scratch<P>()    // G = dYᵀ x, or W_eff before rounding (m × n)
        var gradient = Scratch<G>() // G = dYᵀ x rounded to operands, on bf16 units (m × n)
        var bias = Scratch<P>()     // a bias given for the call, widened (m)

        init(rank r: Int) throws(LoLDUError) {
            effectiveCoef = try HeapBuffer(zeros: r)
            forwardCoef = try HeapBuffer(repeating: .nan, count: r)
            coef = try HeapBuffer(zeros: r)
            scores = try HeapBuffer(zeros: r)
        }

        var bytes: Int {
            let p = MemoryLayout<P>.stride
            return (effectiveCoef.count + forwardCoef.count + coef.count + scores.count) * p
                + h.bytes + g.bytes + work.bytes + input.bytes + input2.bytes + output.bytes + scaled.bytes + large.bytes
                + gradient.bytes + bias.bytes
        }
    }

    private func localState() throws(LoLDUError) -> Local {
        if let local { return local }
        let made = try Local(rank: rank)
        local = made
        return made
    }

    private func same(_ a: UnsafePointer<P>, _ b: UnsafePointer<P>) -> Bool {
        for k in 0..<rank where a[k] != b[k] { return false }
        return true
    }

    private func effectiveIsFresh(_ s: Local, _ c: UnsafePointer<P>) -> Bool {
        s.effectiveValid && same(s.effectiveCoef.pointer, c)
    }

    /// Makes sure the cached `W_eff` holds `c`, built `exact`ly or as a step's product (never the
    /// other kind: what a step computes does not depend on an earlier merge); everything it
    /// needs is allocated before the cache is touched.
    private func refreshEffective(_ s: Local, _ c: UnsafePointer<P>, exact: Bool = false) throws(LoLDUError) -> UnsafePointer<G> {
        let built = exact || G.self == P.self
        if effectiveIsFresh(s, c), s.effectiveExact == built, let effective = s.effective { return UnsafePointer(effective.pointer) }
        let cache: HeapBuffer<G>
        if let effective = s.effective { cache = effective } else { cache = try HeapBuffer<G>(count: m * n) }
        let scaled = try s.scaled.get(m * rank)
        let wide = G.self == P.self ? nil : try s.large.get(m * n)
        s.effective = cache
        factors.buildEffective(r: rank, c, exact: exact, into: cache.pointer, scaled: scaled, wide: wide)
        s.effectiveCoef.pointer.update(from: c, count: rank)
        s.effectiveValid = true
        s.effectiveExact = built
        return UnsafePointer(cache.pointer)
    }

    /// The weight a disabled or merged adapter multiplies by, or `nil` when `z` is live.
    private var fixedWeight: UnsafePointer<G>? {
        if !enabled { return factors.weightOperand }
        if merged, let effective = local?.effective { return UnsafePointer(effective.pointer) }
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
    private func forwardIsMerged(_ s: Local, batch: Int, keepsH: Bool, _ c: UnsafePointer<P>) -> Bool {
        if same(s.forwardCoef.pointer, c) {
            s.forwardsAtCoef += 1
        } else {
            s.forwardCoef.pointer.update(from: c, count: rank)
            s.forwardsAtCoef = 0
        }
        let planned = plan(batch: batch, keepsH: keepsH)
        guard path == .auto else { return planned != .factored }
        if planned != .factored || effectiveIsFresh(s, c) { return true }
        let costs = CostModel(m: m, n: n, rank: rank, batch: batch)
        return Double(s.forwardsAtCoef) * (costs.project + costs.gather) >= costs.rebuild
    }

    /// Where a result of `count` values is computed before it is rounded to `E`: `out` itself
    /// when `E` is the compute type, else work space.
    private func computeBuffer(_ out: UnsafeMutablePointer<E>, count: Int, _ scratch: inout Scratch<P>) throws(LoLDUError) -> UnsafeMutablePointer<P> {
        if E.computesInPlace { return UnsafeMutableRawPointer(out).assumingMemoryBound(to: P.self) }
        return try scratch.get(count)
    }

    // MARK: Forward and backward

    /// `y = x W_effᵀ + b` for `batch` rows: `x` is `batch × n`, `y` is `batch × m`, row-major.
    /// When `hOut` is given (`batch × r`) it receives `h = x U_rᵀ`, which ``backward`` can reuse.
    /// `b` is the layer's own bias, or `callBias` (`m` values, read during the call) for a layer
    /// created without one (`state` otherwise: one bias per layer).
    public func forward(
        batch: Int, x: UnsafePointer<E>, y: UnsafeMutablePointer<E>, h hOut: UnsafeMutablePointer<P>?,
        bias callBias: UnsafePointer<E>? = nil
    ) throws(LoLDUError) {
        try exclusive { () throws(LoLDUError) in try forwardAlone(batch: batch, x: x, y: y, h: hOut, bias: callBias) }
    }

    public func checkUsable() throws(LoLDUError) { try callLock.checkUsable() }

    /// Runs `body` holding ``callLock``.
    private func exclusive(_ body: () throws(LoLDUError) -> Void) throws(LoLDUError) {
        try callLock.run(body)
    }

    private func forwardAlone(
        batch: Int, x: UnsafePointer<E>, y: UnsafeMutablePointer<E>, h hOut: UnsafeMutablePointer<P>?, bias callBias: UnsafePointer<E>?
    ) throws(LoLDUError) {
        try factors.checkCallBias(callBias)
        guard batch > 0 else { return }
        let (m, n, r) = (self.m, self.n, rank)
        let s = try localState()
        var weight = factors.weightOperand
        var factored: UnsafePointer<P>? = nil  // c, when the low-rank term is added here
        if let fixed = fixedWeight {
            weight = fixed
        } else {
            coefficients(into: s.coef.pointer)
            let c = UnsafePointer(s.coef.pointer)
            if forwardIsMerged(s, batch: batch, keepsH: hOut != nil, c) {
                weight = try refreshEffective(s, c)
            } else {
                factored = c
            }
        }
        // Everything this call needs, before anything is written.
        let wideX = E.self == G.self ? nil : try s.input.get(batch * n)
        let out = try computeBuffer(y, count: batch * m, &s.output)
        let wideBias = callBias == nil || E.computesInPlace ? nil : try s.bias.get(m)
        var h = hOut
        var work: UnsafeMutablePointer<G>? = nil
        if factored != nil {
            if h == nil { h = try s.h.get(batch * r) }
            work = G.self == P.self && hOut == nil
                ? UnsafeMutableRawPointer(h!).assumingMemoryBound(to: G.self) : try s.work.get(batch * r)
        }

        let xG = asOperand(x, count: batch * n, work: wideX)
        factors.multiplyWeight(batch: batch, x: xG, weight: weight, bias: factors.forwardBias(callBias, wide: wideBias), into: out)
        if let h { factors.project(batch: batch, r: r, x: xG, into: h) }
        if let c = factored, let h, let work {
            factors.addLowRank(batch: batch, r: r, h: h, .init(coefficients: .table(c), rows: nil), work: work, into: out)
        }
        if !E.computesInPlace { E.narrow(out, to: y, count: batch * m) }
    }

    /// Backward of ``forward`` for upstream gradient `dy` (`batch × m`).
    ///
    /// Writes `dX = dY W_eff` to `dx` (`batch × n`) when given; accumulates `dz`, `dσ`
    /// (when trainable) into ``grads()`` and `db` into ``biasGrad()``. `h` may be the `x U_rᵀ`
    /// that ``forward`` wrote for the same `x`; otherwise it is recomputed. A disabled or merged
    /// adapter does not depend on `z`: its `dz`, `dσ` are left unchanged.
    ///
    /// With `gradsOut` (`rank + 1` values), this call's `dz`, `dσ` are written there instead
    /// (zeros for a disabled or merged adapter) and `db` is not computed: for frameworks that
    /// accumulate gradients themselves.
    public func backward(
        batch: Int, x: UnsafePointer<E>, dy: UnsafePointer<E>,
        dx: UnsafeMutablePointer<E>?, h hIn: UnsafePointer<P>?, gradsOut: UnsafeMutablePointer<P>? = nil
    ) throws(LoLDUError) {
        try exclusive { () throws(LoLDUError) in try backwardAlone(batch: batch, x: x, dy: dy, dx: dx, h: hIn, gradsOut: gradsOut) }
    }

    private func backwardAlone(
        batch: Int, x: UnsafePointer<E>, dy: UnsafePointer<E>,
        dx: UnsafeMutablePointer<E>?, h hIn: UnsafePointer<P>?, gradsOut: UnsafeMutablePointer<P>?
    ) throws(LoLDUError) {
        guard batch > 0 else {
            gradsOut?.zero(count: rank + 1)
            return
        }
        let (m, n, r) = (self.m, self.n, rank)
        let s = try localState()
        let grads: UnsafeMutablePointer<P>
        if let gradsOut { grads = gradsOut } else { grads = try self.grads() }
        let db = gradsOut == nil ? try biasGrad() : nil
        let wideDY = E.self == G.self ? nil : try s.input2.get(batch * m)
        if let weight = fixedWeight {
            let out = try dx.map { dx throws(LoLDUError) in try computeBuffer(dx, count: batch * n, &s.output) }
            gradsOut?.zero(count: r + 1)  // after every allocation: a failed call writes nothing
            let dyG = asOperand(dy, count: batch * m, work: wideDY)
            if let dx, let out {
                factors.multiplyWeightBackward(batch: batch, dy: dyG, weight: weight, into: out)
                if !E.computesInPlace { E.narrow(out, to: dx, count: batch * n) }
            }
            accumulateBiasGradient(dy, batch: batch, into: db)
            return
        }

        coefficients(into: s.coef.pointer)
        let c = UnsafePointer(s.coef.pointer)
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
                && (effectiveIsFresh(s, c) || costs.rebuild < costs.gather + costs.project)
            let activations = (dx != nil && !dxMerged ? 0 : costs.gather) + (hIn == nil ? costs.project : 0)
            dzFromWeight = costs.weightGradient < activations
        }

        // Everything this call needs, before anything is written.
        let needG = !dzFromWeight || (dx != nil && !dxMerged)
        let g: UnsafeMutablePointer<P>? = needG ? try s.g.get(batch * r) : nil
        let work: UnsafeMutablePointer<P>? =
            dzFromWeight ? try s.h.get(r * n) : (hIn == nil ? try s.h.get(batch * r) : nil)
        let gradient: UnsafeMutablePointer<P>? = dzFromWeight ? try s.large.get(m * n) : nil
        let gradientOperand: UnsafeMutablePointer<G>? =
            dzFromWeight ? (G.self == P.self ? UnsafeMutableRawPointer(gradient!).assumingMemoryBound(to: G.self) : try s.gradient.get(m * n)) : nil
        let mergedWeight: UnsafePointer<G>? = dx != nil && dxMerged ? try refreshEffective(s, c) : nil
        let out = try dx.map { dx throws(LoLDUError) in try computeBuffer(dx, count: batch * n, &s.output) }
        let gWork: UnsafeMutablePointer<G>? = dx != nil && !dxMerged
            ? (G.self == P.self ? UnsafeMutableRawPointer(g!).assumingMemoryBound(to: G.self) : try s.work.get(batch * r)) : nil
        let wideX = E.self == G.self || (!dzFromWeight && hIn != nil) ? nil : try s.input.get(batch * n)
        gradsOut?.zero(count: r + 1)

        let dyG = asOperand(dy, count: batch * m, work: wideDY)
        let xG: UnsafePointer<G>? = wideX == nil && E.self != G.self ? nil : asOperand(x, count: batch * n, work: wideX)
        // s_k = Σ_b h_bk g_bk = (Aᵀ dYᵀ x U_rᵀ)_kk; then dz = σ s and dσ = z · s.
        if let g { factors.gather(batch: batch, r: r, dy: dyG, into: g) }
        let scores = s.scores.pointer
        if let gradient, let gradientOperand, let work, let xG {
            G.multiply(transA: true, transB: false, m: m, n: n, k: batch, a: dyG, lda: m, b: xG, ldb: n,
                       accumulate: false, c: gradient, ldc: n)
            G.narrow(gradient, to: gradientOperand, count: m * n)  // none when G is P
            factors.weightScores(r: r, operands: UnsafePointer(gradientOperand), work: work, into: scores)
        } else if let g {
            let h: UnsafePointer<P>
            if let hIn { h = hIn } else if let work, let xG {
                factors.project(batch: batch, r: r, x: xG, into: work)
                h = UnsafePointer(work)
            } else { return }  // unreachable: work holds h whenever h is not given
            scores.zero(count: r)
            factors.accumulateScores(batch: batch, r: r, h: h, g: g, rows: nil, into: scores)
        }
        accumulateScores(scores, into: grads)
        accumulateBiasGradient(dy, batch: batch, into: db)

        guard let dx, let out else { return }
        if let mergedWeight {
            factors.multiplyWeightBackward(batch: batch, dy: dyG, weight: mergedWeight, into: out)
        } else if let g, let gWork {
            factors.multiplyWeightBackward(batch: batch, dy: dyG, weight: factors.weightOperand, into: out)
            factors.addLowRankBackward(batch: batch, r: r, g: g, .init(coefficients: .table(c), rows: nil), work: gWork, into: out)
        }
        if !E.computesInPlace { E.narrow(out, to: dx, count: batch * n) }
    }

    /// `db += Σ_b dY`.
    func accumulateBiasGradient(_ dy: UnsafePointer<E>, batch: Int, into db: UnsafeMutablePointer<P>?) {
        guard let db else { return }
        withUnsafeTemporaryAllocation(of: P.self, capacity: m) { row in
            for b in 0..<batch {
                E.widen(dy + b * m, to: row.baseAddress!, count: m)
                P.add(row.baseAddress!, into: db, count: m)
            }
        }
    }

    /// `dz += σ s`, and `dσ += z · s` when `σ` is trainable.
    func accumulateScores(_ s: UnsafePointer<P>, into dz: UnsafeMutablePointer<P>) {
        let r = rank
        if config.trainSigma { dz[r] += P.dot(params, s, count: r) }
        P.addScaled(params[r], s, into: dz, count: r)
    }

    /// Weight-space backward: for a layer that uses `W_eff` in another way (convolution,
    /// embedding), maps its weight gradient `dW` (`m × n`) to `dz` and `dσ` (accumulated).
    /// With `gradsOut`, this call's `dz`, `dσ` are written there instead (zeros when disabled
    /// or merged).
    public func weightBackward(_ dw: UnsafePointer<E>, gradsOut: UnsafeMutablePointer<P>? = nil) throws(LoLDUError) {
        try exclusive { () throws(LoLDUError) in try weightBackwardAlone(dw, gradsOut: gradsOut) }
    }

    private func weightBackwardAlone(_ dw: UnsafePointer<E>, gradsOut: UnsafeMutablePointer<P>?) throws(LoLDUError) {
        let grads: UnsafeMutablePointer<P>
        if let gradsOut { grads = gradsOut } else { grads = try self.grads() }
        guard fixedWeight == nil else {
            gradsOut?.zero(count: rank + 1)
            return
        }
        let s = try localState()
        let work = try s.h.get(rank * n)
        let wide = E.computesInPlace ? nil : try s.large.get(m * n)
        gradsOut?.zero(count: rank + 1)  // after every allocation: a failed call writes nothing
        let gradient: UnsafePointer<P>
        if let wide {
            E.widen(dw, to: wide, count: m * n)
            gradient = UnsafePointer(wide)
        } else {
            gradient = UnsafeRawPointer(dw).assumingMemoryBound(to: P.self)
        }
        factors.weightScores(r: rank, gradient, work: work, into: s.scores.pointer)
        accumulateScores(s.scores.pointer, into: grads)
    }

    /// Writes the weight the layer currently computes with (`m × n`): `W_eff`, the merged
    /// weight while merged, `W` while disabled.
    public func writeEffectiveWeight(_ out: UnsafeMutablePointer<E>) throws(LoLDUError) {
        try exclusive { () throws(LoLDUError) in try writeEffectiveWeightAlone(out) }
    }

    private func writeEffectiveWeightAlone(_ out: UnsafeMutablePointer<E>) throws(LoLDUError) {
        let (m, n) = (self.m, self.n)
        if !enabled {
            out.update(from: factors.weight, count: m * n)
            return
        }
        let s = try localState()
        coefficients(into: s.coef.pointer)
        let c = UnsafePointer(s.coef.pointer)
        let fitsType = merged || fits(c)  // (a merged weight was checked when merged)
        let source: UnsafePointer<G>
        var image: HeapBuffer<G>? = nil
        if merged || (effectiveIsFresh(s, c) && s.effectiveExact), let effective = s.effective {
            source = UnsafePointer(effective.pointer)
        } else {
            // Built without touching the cache: into the caller's buffer when it certainly fits
            // and needs no rounding; else into an image in the GEMM type, checked before `out`
            // is written.
            let scaled = try s.scaled.get(m * rank)
            let wide = G.self == P.self ? nil : try s.large.get(m * n)
            if G.self == E.self && fitsType {
                factors.buildEffective(r: rank, c, exact: true, into: UnsafeMutableRawPointer(out).assumingMemoryBound(to: G.self),
                                       scaled: scaled, wide: wide)
                return
            }
            let target: UnsafeMutablePointer<G>
            if wide == nil {  // G is P: the work buffer holds the image
                target = UnsafeMutableRawPointer(try s.large.get(m * n)).assumingMemoryBound(to: G.self)
            } else {
                image = try HeapBuffer<G>(count: m * n)
                target = image!.pointer
            }
            factors.buildEffective(r: rank, c, exact: true, into: target, scaled: scaled, wide: wide)
            source = UnsafePointer(target)
        }
        guard fitsType || Self.representable(source, count: m * n) else {
            throw LoLDUError(.notFinite, "the effective weight is not finite in \(E.dtype.name) (sigma or z too large); nothing written")
        }
        withExtendedLifetime(image) {
            if G.self == E.self {
                UnsafeMutableRawPointer(out).assumingMemoryBound(to: G.self).update(from: source, count: m * n)
            } else {
                E.narrow(UnsafeRawPointer(source).assumingMemoryBound(to: P.self), to: out, count: m * n)
            }
        }
    }

    /// Writes the frozen residual `W_res = W − σ₀ A diag(z_ref) U_r` (`m × n`, in `P`). Uses
    /// buffers of its own: it changes nothing in the adapter.
    public func writeResidual(_ out: UnsafeMutablePointer<P>) throws(LoLDUError) {
        let (m, n, r) = (self.m, self.n, rank)
        let negated = try HeapBuffer<P>(count: r), scaled = try HeapBuffer<P>(count: m * r)
        for k in 0..<r { negated.pointer[k] = -reference(k) }
        E.widen(factors.weight, to: out, count: m * n)
        for i in 0..<m {
            P.hadamard(factors.lower.pointer + i * factors.rank, negated.pointer, into: scaled.pointer + i * r, count: r)
        }
        P.multiply(transA: false, transB: false, m: m, n: n, k: r, a: scaled.pointer, lda: r,
               b: factors.upper.pointer, ldb: n, accumulate: true, c: out, ldc: n)
    }

    // MARK: State

    /// Bakes the current update into a weight used by every call until ``unmerge()``.
    /// The pretrained `W` is kept, so unmerging is exact; merging twice is a no-op. Refuses
    /// (as PEFT's `safe_merge`) a merged weight that would not be finite.
    public func merge() throws(LoLDUError) {
        try exclusive { () throws(LoLDUError) in try mergeAlone() }
    }

    private func mergeAlone() throws(LoLDUError) {
        guard !merged else { return }
        let s = try localState()
        coefficients(into: s.coef.pointer)
        let weight = try refreshEffective(s, s.coef.pointer, exact: true)
        guard fits(s.coef.pointer) || Self.representable(weight, count: m * n) else {
            s.effectiveValid = false
            throw LoLDUError(.notFinite, "the merged weight would not be finite in \(E.dtype.name) (sigma or z too large); not merged")
        }
        merged = true
    }

    /// Whether `W_eff` for coefficients `c` certainly fits the element type, by the bound of
    /// ``LDUFactors/magnitudes()`` (with room for the GEMM's rounding): `O(r)` per call, so that
    /// only an adapter near the type's end pays ``representable(_:count:)``'s pass.
    func fits(_ c: UnsafePointer<P>) -> Bool {
        let (w, a, u) = factors.magnitudes()
        var sum = 0.0
        for k in 0..<rank { sum += Double(c[k].magnitude) }
        let bound = w + sum * a * u
        return bound.isFinite && bound <= 0.5 * E.dtype.largestFinite
    }

    /// Whether `count` values of `W_eff` in the GEMM type are finite and stay finite when
    /// rounded to the element type (float16 ends at 65504; bfloat16 rounds the largest float32
    /// values up to infinity).
    static func representable(_ values: UnsafePointer<G>, count: Int) -> Bool {
        guard G.allFinite(values, count: count, copyingTo: nil) else { return false }
        guard !E.computesInPlace, G.self == P.self else { return true }  // stored as E already
        let wide = UnsafeRawPointer(values).assumingMemoryBound(to: P.self)
        return withUnsafeTemporaryAllocation(of: E.self, capacity: 4096) { chunk in
            for start in stride(from: 0, to: count, by: 4096) {
                let k = Swift.min(4096, count - start)
                E.narrow(wide + start, to: chunk.baseAddress!, count: k)
                if !E.allFinite(chunk.baseAddress!, count: k, copyingTo: nil) { return false }
            }
            return true
        }
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
    private func checkCoefficients(z: UnsafePointer<P>, sigma: P) throws(LoLDUError) {
        for k in 0..<rank where !(sigma * z[k] - reference(k)).isFinite {
            throw LoLDUError(.notFinite, "sigma * z[\(k)] = \(sigma) * \(z[k]) overflows \(P.dtype.name)")
        }
    }

    public func setZ(_ z: UnsafePointer<P>) throws(LoLDUError) {
        try setParameters(z: z, sigma: sigma, changing: "z")
    }

    public func setSigma(_ value: P) throws(LoLDUError) {
        try setParameters(z: params, sigma: value, changing: "sigma")
    }

    /// Sets `z` (`rank` values) and `σ` together: everything is checked before anything is
    /// written, so a refused pair leaves both unchanged.
    public func setParameters(z: UnsafePointer<P>, sigma value: P, changing what: String = "z and sigma") throws(LoLDUError) {
        try checkMutable(what)
        try checkFinite(z, count: rank, name: "z")
        guard value.isFinite else { throw LoLDUError(.notFinite, "sigma must be finite in \(P.dtype.name), got \(value)") }
        try checkCoefficients(z: z, sigma: value)
        if z != UnsafePointer(params) { params.update(from: z, count: rank) }
        params[rank] = value
    }

    /// The first trainable value that is NaN or ±Inf, or whose coefficient `σ z_k − σ₀ z_ref,k`
    /// overflows (as `"z[k]"` or `"sigma"`); `nil` when all are usable.
    public var firstNonFiniteParameter: String? {
        let s = sigma
        if !s.isFinite { return "sigma" }
        for k in 0..<rank where !params[k].isFinite || !(s * params[k] - reference(k)).isFinite { return "z[\(k)]" }
        return nil
    }

    /// Whether `z` or `σ` were written while merged, through memory taken before the merge
    /// (`loldu_params`, a numpy view): the merged weight computes with the coefficients it
    /// merged, so a checkpoint of these values would not be what the layer computes.
    public var changedWhileMerged: Bool {
        guard merged, let s = local else { return false }
        return withUnsafeTemporaryAllocation(of: P.self, capacity: rank) { c in
            coefficients(into: c.baseAddress!)
            return !same(s.effectiveCoef.pointer, c.baseAddress!)
        }
    }

    /// Bytes held: the copies of `W` and the bias, the frozen factors (shared with clones and
    /// derived adapters), this adapter's own state, the cached merged weight, and scratch.
    public var memory: (weight: Int, factors: Int, state: Int, mergedCache: Int, scratch: Int) {
        let p = MemoryLayout<P>.stride
        let own = (rank + 1 + (zRef == nil ? 0 : rank) + (gradStorage == nil ? 0 : rank + 1)
            + (biasGradStorage == nil ? 0 : m)) * p
        let local = self.local
        return (factors.weightBytes + (factors.bias?.count ?? 0) * p, factors.factorBytes, own,
                (local?.effective?.count ?? 0) * MemoryLayout<G>.stride, local?.bytes ?? 0)
    }
}
