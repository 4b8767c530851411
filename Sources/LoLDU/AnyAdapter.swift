/// An ``Adapter`` of any element type, behind untyped pointers: what a C handle points to.
///
/// Every raw pointer refers to elements of ``dtype`` (weights, activations) or of its
/// ``DType/parameterType`` (parameters, gradients, `h`, factors); the caller (the C ABI layer)
/// has already checked that they are non-null where required and aligned for that type.
public protocol AnyAdapter: AnyObject, Sendable {
    var dtype: DType { get }
    var m: Int { get }
    var n: Int { get }
    var rank: Int { get }
    /// The rank of the shared factors (the largest rank an adapter derived from this one may have).
    var factorRank: Int { get }
    var config: AdapterConfig { get }
    var hasBias: Bool { get }
    /// A bias given for one forward is only for layers created without one (`state` otherwise).
    func checkCallBias(_ bias: UnsafeRawPointer?) throws(LoLDUError)
    /// `state` in the child of a fork made while another thread was inside one of the
    /// adapter's locked calls (every call on an adapter checks it).
    func checkUsable() throws(LoLDUError)
    var enabled: Bool { get }
    var merged: Bool { get }
    var path: ComputePath { get set }
    var trainableCount: Int { get }
    /// Whether the factors keep the caller's `W` instead of a copy (a derived adapter: its base's).
    var borrowsWeight: Bool { get }
    var degeneratePivots: Int { get }
    var sigmaValue: Double { get }
    /// Which library runs this adapter's GEMMs.
    var backend: GEMMBackend { get }
    /// `z` (`rank` values) then `σ`, at a fixed address for the adapter's lifetime.
    var paramsPointer: UnsafeMutableRawPointer { get }
    /// `dz` then `dσ`, at a fixed address (allocated on first request).
    func gradsPointer() throws(LoLDUError) -> UnsafeMutableRawPointer
    /// `db`, at a fixed address (allocated on first request); nil without bias.
    func biasGradPointer() throws(LoLDUError) -> UnsafeMutableRawPointer?
    var memory: (weight: Int, factors: Int, state: Int, mergedCache: Int, scratch: Int) { get }
    /// The identity of the frozen factors, shared by clones and derived adapters.
    var factorsIdentity: ObjectIdentifier { get }

    func forward(batch: Int, x: UnsafeRawPointer, y: UnsafeMutableRawPointer, h: UnsafeMutableRawPointer?,
                 bias: UnsafeRawPointer?) throws(LoLDUError)
    /// With `grads`, this call's `dz`, `dσ` go there (``Adapter/backward``'s `gradsOut`).
    func backward(batch: Int, x: UnsafeRawPointer, dy: UnsafeRawPointer, dx: UnsafeMutableRawPointer?, h: UnsafeRawPointer?,
                  grads: UnsafeMutableRawPointer?) throws(LoLDUError)
    /// ``Adapter/groupedForward`` with this adapter as the base and `adapters` the group
    /// (`mismatch` unless they share this adapter's factors, naming `adapters[listIndex[i]]`).
    func groupedForward(_ adapters: [any AnyAdapter], listIndex: [Int], rows: UnsafePointer<Int32>, batch: Int,
                        x: UnsafeRawPointer, y: UnsafeMutableRawPointer, bias: UnsafeRawPointer?) throws(LoLDUError)
    func groupedBackward(_ adapters: [any AnyAdapter], listIndex: [Int], rows: UnsafePointer<Int32>, batch: Int,
                         x: UnsafeRawPointer, dy: UnsafeRawPointer, dx: UnsafeMutableRawPointer?,
                         grads: [UnsafeMutableRawPointer?]?) throws(LoLDUError)
    /// With `grads`, this call's `dz`, `dσ` go there.
    func weightBackward(rawPointer dw: UnsafeRawPointer, grads: UnsafeMutableRawPointer?) throws(LoLDUError)
    func writeEffectiveWeight(_ out: UnsafeMutableRawPointer) throws(LoLDUError)
    func writeResidual(_ out: UnsafeMutableRawPointer) throws(LoLDUError)
    func writeFactor(_ factor: Factor, _ out: UnsafeMutableRawPointer)
    func writePivots(_ out: UnsafeMutablePointer<Int32>)
    /// `c = σ z − σ₀ z_ref` (`rank` values of the parameter type): `ΔW = A diag(c) U_r`.
    func writeCoefficients(_ out: UnsafeMutableRawPointer)
    /// Whether `W_eff` certainly fits the element type, by a bound on its magnitude (no product;
    /// false says only that the bound cannot tell).
    var effectiveWeightSurelyFits: Bool { get }
    /// How much the adapter moved the pretrained weight at creation (``Adapter/initialChange()``).
    func initialChange() throws(LoLDUError) -> Double
    func setZ(rawPointer z: UnsafeRawPointer) throws(LoLDUError)
    func setSigma(_ value: Double) throws(LoLDUError)
    func plan(batch: Int, keepsH: Bool) -> ComputePath
    func zeroGrad()
    func merge() throws(LoLDUError)
    func unmerge()
    func setEnabled(_ on: Bool)
    func cloneAdapter() throws(LoLDUError) -> any AnyAdapter
    /// A new adapter on the same factors with its own configuration (rank ≤ ``factorRank``).
    func derive(_ config: AdapterConfig) throws(LoLDUError) -> any AnyAdapter
    /// This adapter (configuration, `z`, `σ`, factorisation) over the weight rounded to `dtype`
    /// (float32, bfloat16 and float16 convert among themselves).
    func converted(to dtype: DType) throws(LoLDUError) -> any AnyAdapter
    func checkMutable(_ what: String) throws(LoLDUError)
    /// Sets `z` (`rank` values) and `σ`, rounded to the parameter type, both or neither.
    func setParameters(z: HeapBuffer<Double>, sigma: Double) throws(LoLDUError)
    /// The first trainable value that is not finite (`"z[k]"`, `"sigma"`), if any.
    var firstNonFiniteParameter: String? { get }
    /// ``Adapter/changedWhileMerged``.
    var changedWhileMerged: Bool { get }
    /// ``fingerprint(_:)`` of the base weight's values, and of this adapter's pivots.
    var weightFingerprint: String { get }
    var pivotsFingerprint: String { get }
}

/// The frozen factors a caller can read.
public enum Factor: Sendable {
    case lower      // A = P L_r, m × r (parameter type)
    case diagonal   // D_r, r (parameter type)
    case upper      // U_r, r × n (parameter type)
    case weight     // the pretrained W, m × n (element type)
    case bias       // b, m (element type)
}

/// Something that builds an adapter once told its element type `E` and GEMM operand type `G`.
protocol AdapterMaker {
    func make<E: Element, G: GEMMOperand>(_: E.Type, _: G.Type) throws(LoLDUError) -> any AnyAdapter where G.Compute == E.Compute
}

extension AdapterMaker {
    /// Builds the adapter for element type `dtype` with the GEMM operands this CPU gets for it
    /// (``GEMMBackend``): the one table from dtypes to Swift types.
    func make(_ dtype: DType) throws(LoLDUError) -> any AnyAdapter {
        try BLASWorkBuffers.ensure()  // (before the first BLAS call: the factorisation, or timing bf16's GEMMs)
        switch (dtype, GEMMBackend.backend(for: dtype)) {
        case (.float32, _): return try make(Float.self, Float.self)
        case (.float64, _): return try make(Double.self, Double.self)
        case (.bfloat16, .widened): return try make(BFloat16.self, Float.self)
        case (.bfloat16, _): return try make(BFloat16.self, BFloat16.self)
        case (.float16, _): return try make(Float16.self, Float.self)
        }
    }
}

/// Creates an adapter whose weight has element type `dtype`.
public func makeAdapter(
    dtype: DType, m: Int, n: Int, weight: UnsafeRawPointer, bias: UnsafeRawPointer?, config: AdapterConfig
) throws(LoLDUError) -> any AnyAdapter {
    struct Factoring: AdapterMaker {
        let m: Int, n: Int, weight: UnsafeRawPointer, bias: UnsafeRawPointer?, config: AdapterConfig
        func make<E: Element, G: GEMMOperand>(_: E.Type, _: G.Type) throws(LoLDUError) -> any AnyAdapter where G.Compute == E.Compute {
            try Adapter<E, G>(m: m, n: n, weight: weight.assumingMemoryBound(to: E.self),
                              bias: bias?.assumingMemoryBound(to: E.self), config: config)
        }
    }
    return try Factoring(m: m, n: n, weight: weight, bias: bias, config: config).make(dtype)
}

/// Builds `source`'s adapter for another element type with the same compute type: the
/// factorisation shared, the weight and bias rounded once, the definition copied.
private struct Converting<E: Element, G: GEMMOperand>: AdapterMaker where G.Compute == E.Compute {
    let source: Adapter<E, G>

    func make<E2: Element, G2: GEMMOperand>(_: E2.Type, _: G2.Type) throws(LoLDUError) -> any AnyAdapter where G2.Compute == E2.Compute {
        guard E2.Compute.self == E.Compute.self else {
            throw .invalid("dtype = \(E2.dtype.name): cannot convert a \(E.dtype.name) adapter (src) to it: the parameters would change type")
        }
        let f = source.factors
        // Same compute type (checked): the parts are the same types, reinterpreted statically.
        let parts = unsafeBitCast(f.factorization, to: LDUFactors<E2, G2>.Factorization.self)
        var bias: HeapBuffer<E2.Compute>? = nil
        if let source = f.bias {  // rounded to E2 too, as autocast rounds it
            let rounded = try HeapBuffer<E2>(count: f.m), wide = try HeapBuffer<E2.Compute>(count: f.m)
            E2.narrow(UnsafeRawPointer(source.pointer).assumingMemoryBound(to: E2.Compute.self), to: rounded.pointer, count: f.m)
            do {
                try checkFinite(UnsafePointer(rounded.pointer), count: f.m, name: "bias")
            } catch {
                throw LoLDUError(.notFinite, "dtype = \(E2.dtype.name): the bias does not fit it once rounded (\(error.message))")
            }
            E2.widen(rounded.pointer, to: wide.pointer, count: f.m)
            bias = wide
        }
        let factors = try LDUFactors<E2, G2>(m: f.m, n: f.n, sharing: parts, sourceFingerprint: f.weightFingerprint,
                                             bias: bias) { out in
            withUnsafeTemporaryAllocation(of: E.Compute.self, capacity: 4096) { chunk in
                for start in stride(from: 0, to: f.m * f.n, by: 4096) {
                    let count = Swift.min(4096, f.m * f.n - start)
                    E.widen(f.weight + start, to: chunk.baseAddress!, count: count)
                    E2.narrow(UnsafeRawPointer(chunk.baseAddress!).assumingMemoryBound(to: E2.Compute.self), to: out + start, count: count)
                }
            }
        }
        return try Adapter<E2, G2>(factors: factors, definition: source.definition)
    }
}

extension Adapter: AnyAdapter {
    public var dtype: DType { E.dtype }
    public var factorRank: Int { factors.rank }
    public var hasBias: Bool { factors.bias != nil }
    public func checkCallBias(_ bias: UnsafeRawPointer?) throws(LoLDUError) {
        try factors.checkCallBias(bias?.assumingMemoryBound(to: E.self))
    }
    public var degeneratePivots: Int { factors.degeneratePivots }
    public var borrowsWeight: Bool { factors.borrowsWeight }
    public var sigmaValue: Double { Double(sigma) }
    public var backend: GEMMBackend {
        guard G.self == E.self else { return .widened }
        switch E.dtype {
        case .bfloat16, .float16: return .oneDNN
        case .float32: return GEMMBackend.float32
        case .float64: return .openBLAS
        }
    }
    public var paramsPointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(params) }
    public func gradsPointer() throws(LoLDUError) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(try grads()) }
    public func biasGradPointer() throws(LoLDUError) -> UnsafeMutableRawPointer? { try biasGrad().map { UnsafeMutableRawPointer($0) } }
    public var factorsIdentity: ObjectIdentifier { ObjectIdentifier(factors) }

    public func forward(batch: Int, x: UnsafeRawPointer, y: UnsafeMutableRawPointer, h: UnsafeMutableRawPointer?,
                        bias: UnsafeRawPointer?) throws(LoLDUError) {
        try forward(batch: batch, x: x.assumingMemoryBound(to: E.self), y: y.assumingMemoryBound(to: E.self),
                    h: h?.assumingMemoryBound(to: P.self), bias: bias?.assumingMemoryBound(to: E.self))
    }

    public func backward(batch: Int, x: UnsafeRawPointer, dy: UnsafeRawPointer, dx: UnsafeMutableRawPointer?, h: UnsafeRawPointer?,
                         grads: UnsafeMutableRawPointer?) throws(LoLDUError) {
        try backward(batch: batch, x: x.assumingMemoryBound(to: E.self), dy: dy.assumingMemoryBound(to: E.self),
                     dx: dx?.assumingMemoryBound(to: E.self), h: h?.assumingMemoryBound(to: P.self),
                     gradsOut: grads?.assumingMemoryBound(to: P.self))
    }

    /// The group's adapters as this type, all on this adapter's factors; `adapters[i]` is the
    /// caller's `adapters[listIndex[i]]` (for messages).
    private func group(_ adapters: [any AnyAdapter], listIndex: [Int], rows: UnsafePointer<Int32>) throws(LoLDUError) -> Group {
        var typed: [Adapter] = []
        typed.reserveCapacity(adapters.count)
        for (i, adapter) in adapters.enumerated() {
            guard let same = adapter as? Adapter, same.factors === factors else {
                let name = "adapters[\(listIndex[i])]"
                if adapter.dtype != dtype {
                    throw LoLDUError(.mismatch, "\(name) is \(adapter.dtype.name) but adapters[0] is \(dtype.name); a grouped call takes adapters of one element type")
                }
                throw LoLDUError(.mismatch, "\(name) does not share the frozen factors of adapters[0]; group only adapters cloned or derived from one base")
            }
            typed.append(same)
        }
        return Group(adapters: typed, rows: rows)
    }

    // The grouped calls are specialised for the pairings of `AdapterMaker.make`: reached through
    // `any AnyAdapter`, generic code would handle every adapter of a group through value
    // witnesses and metadata look-ups (0.5 µs per adapter). Float64 stays generic.
    @_specialize(where E == Float, G == Float)
    @_specialize(where E == BFloat16, G == BFloat16)
    @_specialize(where E == BFloat16, G == Float)
    @_specialize(where E == Float16, G == Float)
    public func groupedForward(_ adapters: [any AnyAdapter], listIndex: [Int], rows: UnsafePointer<Int32>, batch: Int,
                               x: UnsafeRawPointer, y: UnsafeMutableRawPointer, bias: UnsafeRawPointer?) throws(LoLDUError) {
        try Self.groupedForward(try group(adapters, listIndex: listIndex, rows: rows), base: self, batch: batch,
                                x: x.assumingMemoryBound(to: E.self), y: y.assumingMemoryBound(to: E.self),
                                bias: bias?.assumingMemoryBound(to: E.self))
    }

    @_specialize(where E == Float, G == Float)
    @_specialize(where E == BFloat16, G == BFloat16)
    @_specialize(where E == BFloat16, G == Float)
    @_specialize(where E == Float16, G == Float)
    public func groupedBackward(_ adapters: [any AnyAdapter], listIndex: [Int], rows: UnsafePointer<Int32>, batch: Int,
                                x: UnsafeRawPointer, dy: UnsafeRawPointer, dx: UnsafeMutableRawPointer?,
                                grads: [UnsafeMutableRawPointer?]?) throws(LoLDUError) {
        try Self.groupedBackward(try group(adapters, listIndex: listIndex, rows: rows), base: self, batch: batch,
                                 x: x.assumingMemoryBound(to: E.self), dy: dy.assumingMemoryBound(to: E.self),
                                 dx: dx?.assumingMemoryBound(to: E.self),
                                 gradsOut: grads.map { $0.map { $0?.assumingMemoryBound(to: P.self) } })
    }

    public func weightBackward(rawPointer dw: UnsafeRawPointer, grads: UnsafeMutableRawPointer?) throws(LoLDUError) {
        try weightBackward(dw.assumingMemoryBound(to: E.self), gradsOut: grads?.assumingMemoryBound(to: P.self))
    }

    public func writeEffectiveWeight(_ out: UnsafeMutableRawPointer) throws(LoLDUError) {
        try writeEffectiveWeight(out.assumingMemoryBound(to: E.self))
    }

    public func writeResidual(_ out: UnsafeMutableRawPointer) throws(LoLDUError) {
        try writeResidual(out.assumingMemoryBound(to: P.self))
    }

    public func writeFactor(_ factor: Factor, _ out: UnsafeMutableRawPointer) {
        let (m, n, r, stride) = (self.m, self.n, rank, factors.rank)
        switch factor {
        case .lower:
            let o = out.assumingMemoryBound(to: P.self)
            for i in 0..<m { (o + i * r).update(from: factors.lower.pointer + i * stride, count: r) }
        case .upper: out.assumingMemoryBound(to: P.self).update(from: factors.upper.pointer, count: r * n)
        case .diagonal:
            factors.diagonal.withUnsafeBufferPointer { out.assumingMemoryBound(to: P.self).update(from: $0.baseAddress!, count: r) }
        case .weight: out.assumingMemoryBound(to: E.self).update(from: factors.weight, count: m * n)
        case .bias: if let b = factors.bias { E.narrow(b.pointer, to: out.assumingMemoryBound(to: E.self), count: m) }
        }
    }

    public func writePivots(_ out: UnsafeMutablePointer<Int32>) {
        factors.pivots.withUnsafeBufferPointer { out.update(from: $0.baseAddress!, count: rank) }
    }

    public func writeCoefficients(_ out: UnsafeMutableRawPointer) {
        coefficients(into: out.assumingMemoryBound(to: P.self))
    }

    public var effectiveWeightSurelyFits: Bool {
        withUnsafeTemporaryAllocation(of: P.self, capacity: Swift.max(rank, 1)) { c in
            coefficients(into: c.baseAddress!)
            return fits(UnsafePointer(c.baseAddress!))
        }
    }

    public func setZ(rawPointer z: UnsafeRawPointer) throws(LoLDUError) {
        try setZ(z.assumingMemoryBound(to: P.self))
    }

    public func setSigma(_ value: Double) throws(LoLDUError) {
        try setSigma(P(value))
    }

    public func cloneAdapter() throws(LoLDUError) -> any AnyAdapter { try clone() }

    public func derive(_ config: AdapterConfig) throws(LoLDUError) -> any AnyAdapter {
        try Adapter(factors: factors, config: config)
    }

    public func converted(to dtype: DType) throws(LoLDUError) -> any AnyAdapter {
        try Converting(source: self).make(dtype)
    }

    public func setParameters(z values: HeapBuffer<Double>, sigma: Double) throws(LoLDUError) {
        let z = try HeapBuffer<P>(count: values.count)
        for k in 0..<values.count { z.pointer[k] = P(values[k]) }
        try withExtendedLifetime(z) { () throws(LoLDUError) in try setParameters(z: z.pointer, sigma: P(sigma)) }
    }

    public var weightFingerprint: String { factors.weightFingerprint }
    public var pivotsFingerprint: String { factors.pivotsFingerprint(rank: rank) }
}
